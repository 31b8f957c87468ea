"""Where each dataset comes from: its TFDS builder, splits, and a prepared-or-clear-error load.

Every dataset reaches the pipelines through ``open_builder`` (prepares the project's offline
builders on first use, checks that a prepared copy still matches its source files, wraps any
failure in one message that names the dataset, the expected files and where to put them) and
``read`` (one process's part of a split, images left encoded so nothing is decoded before it is
needed).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from lmoe_jax.data import builders  # registers the project's builders with TFDS
from lmoe_jax.data import image_lists, provenance
from lmoe_jax.data.builders.common import can_reach


class DatasetNotReadyError(RuntimeError):
    """A dataset is neither prepared nor preparable here (missing or bad source files)."""


class DataConfigError(ValueError):
    """config.data disagrees with the data (class counts, unknown dataset, bad value)."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Which TFDS splits play 'train' and 'test' for a dataset."""

    train_split: str = 'train'
    test_split: str = 'test'


# TFDS catalog datasets whose splits are not plain 'train' / 'test'; the project's own builders
# declare theirs (builders/common.py).
SPECS = {
    'oxford_flowers102': SourceSpec(train_split='train+validation'),
    'dtd': SourceSpec(train_split='train+validation'),
    'places365_small': SourceSpec(test_split='validation'),  # its 'test' split has no labels
}


def spec(name: str) -> SourceSpec:
    cls = builders.project_builder(name)
    if cls is not None:
        return SourceSpec(cls.TRAIN_SPLIT, cls.TEST_SPLIT)
    return SPECS.get(name, SourceSpec())


def preparation(name: str) -> Optional[str]:
    """'offline' or 'manual' for the project's builders (builders/common.py), None for the catalog."""
    cls = builders.project_builder(name)
    return cls.PREPARATION if cls is not None else None


def source_dir_knob(name: str) -> Optional[str]:
    """The config.data knob holding a project builder's source directory, or None."""
    cls = builders.project_builder(name)
    return cls.SOURCE_DIR_KNOB if cls is not None else None


def _get(cfg: Any, key: str, default=None):
    getter = getattr(cfg, 'get', None)
    return getter(key, default) if getter else getattr(cfg, key, default)


DOWNLOAD_PROBE_HOST = 'storage.googleapis.com'  # TFDS's mirror; also a proxy for "online at all"


def _would_download() -> bool:
    """False under tfds.testing.mock_data, which replaces download_and_prepare with a no-op."""
    method = tfds.core.DatasetBuilder.download_and_prepare
    return not getattr(method, '__module__', '').startswith('tensorflow_datasets.testing')


def _not_ready_message(name: str, builder, cfg, cause: BaseException) -> str:
    data_dir = builder.data_dir_root if hasattr(builder, 'data_dir_root') else _get(cfg, 'data_dir')
    lines = [f"Dataset '{name}' is not prepared in {data_dir} and could not be prepared here:",
             f'  {type(cause).__name__}: {cause}']
    if preparation(name) == 'offline':
        lines.append('It is built from local files (see the message above for which and where).')
    elif preparation(name) == 'manual':
        lines.append('Manual download:\n' + str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS))
    else:
        lines.append(
            f'On a machine with internet run `tfds build {name} --data_dir={data_dir}` (or '
            f'`python -c "import tensorflow_datasets as tfds; tfds.builder(\'{name}\', '
            f'data_dir=\'{data_dir}\').download_and_prepare()"`) and copy the folder '
            f'{epath.Path(str(data_dir)) / name}/ here, keeping its version subfolder.')
        manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
        if manual:
            lines.append('Manual download instructions from TFDS:\n' + str(manual))
    return '\n'.join(lines)


def _source_changed(name: str, builder, source: provenance.Source, cfg) -> Optional[str]:
    """Why the prepared ``builder`` must be rebuilt from ``source``, or None to reuse it.

    Raises DataConfigError when the configured source directory is missing files and is not
    the one the prepared copy was built from: neither rebuilding nor reusing would be right.
    """
    recorded = provenance.read_record(builder)
    if source.files is not None:  # the whole source is here: compare its content
        if recorded is None:
            return 'it has no record of the source it was built from'
        changes = provenance.differences(recorded, provenance.fingerprint(source))
        return '; '.join(changes) or None
    knob = source_dir_knob(name)
    built_from = recorded['source'] if recorded else 'an unrecorded source'
    if knob and _get(cfg, knob) and (recorded is None or recorded['source'] != source.location):
        raise DataConfigError(
            f"config.data.{knob}={_get(cfg, knob)} lacks {', '.join(source.missing)}, and the "
            f"prepared '{name}' in {builder.data_dir} was built from {built_from}. Put the files "
            f'there to rebuild from them, set config.data.{knob} back to '
            f'{built_from if recorded else "the directory it was built from"} to use the prepared '
            f'copy, or delete {builder.data_dir} and point config.data.{knob} at the files.')
    logging.info("%s: source files not found here (%s missing); using the copy prepared in %s "
                 'from %s.', name, ', '.join(source.missing), builder.data_dir, built_from)
    return None


def make_builder(name: str, cfg: Any) -> tfds.core.DatasetBuilder:
    """The TFDS builder of ``name`` with the config's directories, neither prepared nor checked."""
    kwargs = {'data_dir': _get(cfg, 'data_dir')}
    knob = source_dir_knob(name)
    if knob:
        kwargs['source_dir'] = _get(cfg, knob)
    if preparation(name) == 'manual':
        kwargs['allow_download'] = bool(_get(cfg, 'download', True))
        kwargs['manual_dir'] = _get(cfg, 'manual_dir')
    tfds_name, name_kwargs = builders.builder_args(name)  # 'folder:<path>' -> image_tree
    try:
        return tfds.builder(tfds_name, **kwargs, **name_kwargs)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataConfigError(
            f"Unknown dataset '{name}': use a TFDS catalog name (e.g. caltech_birds2011), one of "
            f"the project's builders {sorted(builders.PROJECT_BUILDERS)} or 'folder:<path>'.") from e


def open_builder(name: str, cfg: Any) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of ``name`` (prepared now if possible), or one clear error.

    A project builder whose prepared copy no longer matches its source files (another source
    directory, a changed file, no record) is rebuilt with a warning; see provenance.py.
    """
    builder = make_builder(name, cfg)
    source = builder.source() if hasattr(builder, 'source') and _would_download() else None
    was_prepared = builder.is_prepared()
    rebuild = _source_changed(name, builder, source, cfg) if source and was_prepared else None
    catalog = preparation(name) is None
    if catalog and not _get(cfg, 'download', True) and not builder.is_prepared():
        raise DatasetNotReadyError(_not_ready_message(
            name, builder, cfg, RuntimeError('config.data.download is False')))
    if catalog and not builder.is_prepared() and _would_download() \
            and not can_reach(DOWNLOAD_PROBE_HOST):
        raise DatasetNotReadyError(_not_ready_message(
            name, builder, cfg, RuntimeError(f'no network: cannot resolve {DOWNLOAD_PROBE_HOST}')))
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if rebuild:
        logging.warning("Rebuilding '%s' in %s from %s: %s.", name, builder.data_dir,
                        source.location, rebuild)
        # regenerate and re-extract (a replaced archive may sit at the old path); nothing to download
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    download_config = tfds.download.DownloadConfig(
        manual_dir=_get(cfg, 'manual_dir') or None, download_mode=mode)
    record = provenance.fingerprint(source) if source and (rebuild or not was_prepared) else None
    try:
        builder.download_and_prepare(download_config=download_config)  # no-op once prepared
    except Exception as e:  # noqa: BLE001 - every failure gets the same actionable message
        raise DatasetNotReadyError(_not_ready_message(name, builder, cfg, e)) from e
    if record is not None and builder.is_prepared():
        provenance.write_record(builder, record)
    if rebuild:  # a fresh builder reads the new files' info; cached labels are stale
        forget_labels(builder)
        builder = make_builder(name, cfg)
    return builder


def check_num_classes(builder, name: str, expected: int) -> int:
    """Fail at start-up when config.data.num_classes disagrees with the dataset's label feature."""
    actual = builder.info.features['label'].num_classes
    if int(expected) != int(actual):
        raise DataConfigError(
            f"config.data.num_classes={expected} but dataset '{name}' has {actual} classes; "
            f'set config.data.num_classes={actual} (and num_id_classes below it).')
    return actual


def file_name_feature(builder) -> str:
    """The builder's feature holding each image's relative path (what image lists name): the
    project builders declare it; catalog datasets may have TFDS's usual 'image/filename'."""
    feature = getattr(builder, 'FILE_NAME_FEATURE', None)
    if not feature and 'image/filename' in getattr(builder.info, 'features', {}):
        feature = 'image/filename'
    if not feature:
        raise DataConfigError(f"dataset '{builder.name}' records no image file names, so "
                              'config.data.image_lists cannot select its images.')
    return feature


def read(builder, split, *, with_image: bool = True, shuffle_files: bool = False,
         file_seed: Optional[int] = None, reshuffle: bool = False,
         select: Optional[image_lists.Selection] = None,
         with_file_name: bool = False) -> tf.data.Dataset:
    """A split (or a part of one) as {'image': encoded bytes, 'label': int64}, no decoding.

    ``select``: only the images of an image list, labelled as the list says (image_lists.py).
    ``with_file_name``: the file name feature is kept too.
    """
    features = {'label': True}
    decoders = None
    if with_image:
        features['image'] = True
        decoders = {'image': tfds.decode.SkipDecoding()}
    if select is not None or with_file_name:
        features[file_name_feature(builder)] = True
    read_config = tfds.ReadConfig(
        shuffle_seed=file_seed if shuffle_files else None,
        shuffle_reshuffle_each_iteration=reshuffle if shuffle_files else None,
        try_autocache=False, skip_prefetch=True)
    ds = builder.as_dataset(
        split=split, shuffle_files=shuffle_files, read_config=read_config,
        decoders=tfds.decode.PartialDecoding(features, decoders=decoders))
    if select is not None:
        ds = image_lists.select(ds, select, file_name_feature(builder))
    return ds


_LABEL_CACHE: dict = {}


def forget_labels(builder) -> None:
    """Drop the cached labels of a prepared dataset folder (after it was rebuilt)."""
    for key in [k for k in _LABEL_CACHE if k[0] == str(builder.data_dir)]:
        del _LABEL_CACHE[key]


def labels_of(builder, split, select: Optional[image_lists.Selection] = None) -> np.ndarray:
    """All labels of a split (part) in read order, without touching the images; with ``select``
    only the listed images' list labels.

    Cached per prepared dataset folder, split and selection, so the many size queries of a run
    read once.
    """
    key = None
    if builder.is_prepared():  # never cache mocked or half-built data
        key = (str(builder.data_dir), str(split), select.key if select is not None else None)
        if key in _LABEL_CACHE:
            return _LABEL_CACHE[key]
    # The same features as the image reads (images left encoded): mocked data then agrees too.
    ds = read(builder, split, select=select).map(_label).batch(1024)  # big batches preallocate
    parts = [np.asarray(b) for b in ds.as_numpy_iterator()]
    labels = np.concatenate(parts) if parts else np.zeros([0], np.int64)
    if key is not None:
        _LABEL_CACHE[key] = labels
    return labels


def _label(example):
    return example['label']


def file_names_of(builder, split) -> np.ndarray:
    """The file names (bytes) of a split in read order; cached like labels_of."""
    key = (str(builder.data_dir), str(split), 'file names')
    if builder.is_prepared() and key in _LABEL_CACHE:
        return _LABEL_CACHE[key]
    feature = file_name_feature(builder)

    def file_name(example):
        return example[feature]

    ds = read(builder, split, with_image=False, with_file_name=True).map(file_name).batch(1024)
    parts = [np.asarray(b) for b in ds.as_numpy_iterator()]
    names = np.concatenate(parts) if parts else np.zeros([0], object)
    if builder.is_prepared():
        _LABEL_CACHE[key] = names
    return names


def num_examples(builder, split) -> int:
    """Examples in a split: from the dataset info when known, else by counting labels."""
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError, AttributeError):
        return int(len(labels_of(builder, split)))


def slice_split(split: str, fraction_kept: float, builder, *, keep_head: bool) -> str:
    """The first ``fraction_kept`` of each '+'-joined component (or the rest when not keep_head)."""
    out = []
    for component in split.split('+'):
        n = num_examples(builder, component)
        cut = n - int(round((1.0 - fraction_kept) * n))
        out.append(f'{component}[:{cut}]' if keep_head else f'{component}[{cut}:]')
    return '+'.join(out)
