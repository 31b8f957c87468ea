"""Prepared datasets remember their source, so a changed source is noticed, never silently reused.

A project builder that reads local files (idx files, a wheel's pickles, scikit-learn's digits,
the FGVC archive) names them in ``source()``. When the dataset is prepared, a fingerprint of
those files -- the resolved source location and each file's size and SHA-256 -- is written as
``source.json`` into the prepared version folder (beside TFDS's ``dataset_info.json``); every
later open compares it with the files found now (``sources.open_builder`` acts on the result).

SHA-256 of the content rather than size + modification time: copying or reinstalling the same
files (a new venv, ``cp`` without ``-p``) changes mtimes but not content, and an edited file can
keep its size and, within a second, its mtime (epath reports whole seconds). Hashing the demo's
sources (33 MB) takes a few tens of milliseconds per open; the 2.6 GiB FGVC archive, while it
stays in the manual directory, a few seconds.
"""
from __future__ import annotations

import hashlib
import json
from typing import Mapping, NamedTuple, Optional, Sequence

from etils import epath

RECORD_NAME = 'source.json'


class Source(NamedTuple):
    """Where a builder would read its files from here, and which of them are there."""

    location: str  # resolved directory (or URL) of the source
    files: Optional[Mapping[str, epath.Path]]  # name -> path; None unless every file is there
    missing: tuple = ()  # names of the expected files that are not there


def resolved(path: Optional[epath.PathLike]) -> str:
    """``path`` as an absolute, normalised string (gs://... URIs are kept as they are)."""
    if not path:
        return ''
    text = str(path)
    return text.rstrip('/') if '://' in text else str(epath.Path(text).resolve())


def source_in(directory: Optional[epath.PathLike], names: Sequence[str]) -> Source:
    """The files ``names`` of ``directory``; ``files`` is None when any of them is missing."""
    if not directory:
        return Source('', None, tuple(names))
    root = epath.Path(directory)
    paths = {name: root / name for name in names}
    missing = tuple(name for name, path in paths.items() if not path.is_file())
    return Source(resolved(root), None if missing else paths, missing)


def sha256(path: epath.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (hashlib.file_digest needs readinto, GFile lacks it)."""
    digest = hashlib.sha256()
    with epath.Path(path).open('rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(source: Source) -> dict:
    """The record of a complete source: its location and each file's size and SHA-256."""
    if source.files is None:
        return {'source': source.location, 'files': None}
    return {'source': source.location,
            'files': {name: {'size': epath.Path(path).stat().length, 'sha256': sha256(path)}
                      for name, path in sorted(source.files.items())}}


def record_path(builder) -> epath.Path:
    return epath.Path(builder.data_dir) / RECORD_NAME


def read_record(builder) -> Optional[dict]:
    """The recorded source of a prepared dataset, or None when it has none (or an unreadable one)."""
    path = record_path(builder)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    return record if isinstance(record, dict) and 'source' in record else None


def write_record(builder, record: Mapping) -> None:
    """Write the record beside the prepared files (atomic where the file system renames)."""
    path = record_path(builder)
    tmp = path.parent / f'{RECORD_NAME}.tmp'
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)


def differences(recorded: Mapping, current: Mapping) -> list:
    """What changed between two records, one short phrase each (empty when they agree)."""
    out = []
    if recorded.get('source') != current.get('source'):
        out.append(f"source moved from {recorded.get('source')} to {current.get('source')}")
    old, new = recorded.get('files') or {}, current.get('files') or {}
    changed = sorted(n for n in set(old) & set(new) if old[n] != new[n])
    if changed:
        out.append(f"content changed: {', '.join(changed)}")
    if set(old) ^ set(new):
        out.append(f'other files: recorded {sorted(old)}, now {sorted(new)}')
    return out
