"""Prepare every dataset a config needs, once, before training; say what is missing and where.

    python -m lmoe_jax.data.prepare --config=configs/nabirds.py \\
        [--data_dir=gs://BUCKET/tensorflow_datasets] [--manual_dir=/mnt/disks/data/manual]

Prepares the ID dataset, the auxiliary outliers and every coarse OOD set of the config into
its data_dir (TFDS), continuing past a dataset that cannot be prepared so one run lists
everything missing. Prints one line per dataset (found or prepared now, size on disk, images,
classes, time) and, for a missing one, one line saying what to place where. Exit status 0 when
every dataset is ready, 2 otherwise.

On a TPU slice run it once from one VM into a gs:// data_dir, then launch the slice: the
trainer's own preparation (``trainer.prepare_datasets``: process 0 prepares while the others
wait) calls ``prepare_all`` too and finds everything prepared.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any, Callable, Optional

from etils import epath

from lmoe_jax.data import image_lists, sources
from lmoe_jax.data.files import DataFileError
from lmoe_jax.data.sources import DataConfigError, DatasetNotReadyError, _get

ROLES = ('ID', 'outliers', 'coarse OOD')
MISSING_EXIT = 2
MIXOE_REPO = 'https://github.com/zjysteven/MixOE'


class ListsNotSetError(DataConfigError):
    """A MixOE config whose image lists are not set (config.data.mixoe_info is None)."""


@dataclasses.dataclass(frozen=True)
class Status:
    """What preparing one dataset found."""

    name: str
    role: str  # one of ROLES ('ID + coarse OOD' style joins when a name plays several)
    seconds: float
    error: Optional[Exception] = None  # DatasetNotReadyError / DataConfigError when not ready
    prepared_now: bool = False
    location: str = ''  # the prepared version folder
    size_bytes: int = 0
    num_images: int = 0
    num_classes: Optional[int] = None
    lists: Optional[dict] = None  # MixOE image lists checked: split -> listed images
    hint: str = ''  # missing: what to place where (one line)

    @property
    def ready(self) -> bool:
        return self.error is None


def needed(data_config) -> list[tuple[str, str]]:
    """(dataset name, role) of every dataset the config reads, each name once, ID first."""
    coarse = _get(data_config, 'coarse_ood', ()) or ()
    if isinstance(coarse, str):
        coarse = (coarse,)
    roles: dict[str, list[str]] = {}
    for name, role in ((_get(data_config, 'dataset'), 'ID'),
                       (_get(data_config, 'outlier_dataset'), 'outliers'),
                       *((n, 'coarse OOD') for n in coarse)):
        if name:
            roles.setdefault(str(name), []).append(role)
    return [(name, ' + '.join(r)) for name, r in roles.items()]


def _size_on_disk(folder: epath.Path) -> int:
    return sum((epath.Path(d) / f).stat().length for d, _, files in folder.walk() for f in files)


def _one_line(text: str) -> str:
    return ' '.join(str(text).split())


def _cause(error: Exception) -> str:
    """'<type>: <first line>' of what went wrong; for a dataset that could not be prepared the
    cause sources.open_builder wrapped, not its header."""
    if isinstance(error, DatasetNotReadyError):
        if error.__cause__ is not None:
            error = error.__cause__
        else:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            if len(lines) > 1:
                return lines[1]  # sources._not_ready_message: header, then '<type>: <cause>'
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0] if lines else ""}'


def _hint(name: str, builder, error: Exception) -> str:
    """One line: what to place where (project builders) or how TFDS gets it (the catalog)."""
    kind = sources.preparation(name)
    if isinstance(error, ListsNotSetError):
        return (f'git clone {MIXOE_REPO} and add --config.data.mixoe_info=<the clone>/info '
                '(its train / val / test lists of every benchmark).')
    if isinstance(error, DataFileError):
        return ("config.data.mixoe_info (or image_lists) must name MixOE's info/ folder, whose "
                "paths are relative to the dataset's image folder; see docs/data.md.")
    if builder is None or isinstance(error, DataConfigError):
        return 'fix the config value named above.'
    if kind == 'manual':
        return (f'into the manual directory {builder.manual_root}: '
                f'{_one_line(builder.MANUAL_DOWNLOAD_INSTRUCTIONS)}')
    if kind == 'offline':
        return _one_line(getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', '') or
                         'built from local files: see the cause above.')
    return (f'TFDS downloads it: run this command on a machine with internet '
            f'(or `tfds build {name} --data_dir={builder.data_dir_root}`), '
            f'catalog page https://www.tensorflow.org/datasets/catalog/{name}')


def _lists_dir(name: str, role: str, data_config) -> tuple[Optional[str], bool]:
    """(the image lists folder of this dataset's role, whether the config has a place for one)."""
    if role.startswith('ID'):
        return _get(data_config, 'image_lists', None), 'image_lists' in data_config
    coarse = _get(data_config, 'coarse_ood_image_lists', None) or {}
    if 'coarse OOD' in role:
        return _get(coarse, name, None), name in coarse
    return None, False


def check_lists(name: str, role: str, builder, data_config) -> Optional[dict]:
    """Read the dataset's MixOE image lists and check that the prepared dataset holds every
    listed image; {split: listed images}, or None when the config reads no lists."""
    directory, has_place = _lists_dir(name, role, data_config)
    if not directory:
        if has_place and 'mixoe_info' in data_config:
            raise ListsNotSetError(
                f'config.data.mixoe_info is not set: this config reads MixOE\'s image lists '
                f'for {name} (its info/ folder): git clone {MIXOE_REPO} and pass '
                '--config.data.mixoe_info=<the clone>/info.')
        return None
    lists = image_lists.read_lists(directory)
    names = {split: sources.file_names_of(builder, split) for split in builder.info.splits}
    for selection in lists.values():
        image_lists.splits_holding(selection, names)  # raises naming the unknown images
    return {split: len(selection.names) for split, selection in lists.items()}


def prepare_one(name: str, role: str, data_config) -> Status:
    """Prepare (or find) one dataset and check its image lists; never raises for a dataset that
    is missing."""
    t0 = time.perf_counter()
    builder = None
    try:
        builder = sources.make_builder(name, data_config)
        was_prepared = builder.is_prepared()
        builder = sources.open_builder(name, data_config)
        lists = check_lists(name, role, builder, data_config)
        if role.startswith('ID') and lists is None:
            sources.check_num_classes(builder, name, int(_get(data_config, 'num_classes')))
    except (DatasetNotReadyError, DataConfigError, DataFileError) as e:
        return Status(name, role, time.perf_counter() - t0, error=e, hint=_hint(name, builder, e))
    features = builder.info.features
    return Status(
        name, role, time.perf_counter() - t0, prepared_now=not was_prepared,
        location=str(builder.data_dir), size_bytes=_size_on_disk(epath.Path(builder.data_dir)),
        num_images=sum(int(s.num_examples) for s in builder.info.splits.values()),
        num_classes=int(features['label'].num_classes) if 'label' in features else None,
        lists=lists)


def prepare_all(data_config, *, report: Optional[Callable[[Status], Any]] = None) -> list:
    """Prepare every dataset of ``needed(data_config)``; ``report`` is called after each one."""
    statuses = []
    for name, role in needed(data_config):
        statuses.append(prepare_one(name, role, data_config))
        if report is not None:
            report(statuses[-1])
    return statuses


def raise_if_missing(statuses) -> None:
    """The trainer's stop: the one error as it was, or one error that names every dataset."""
    errors = [s.error for s in statuses if not s.ready]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise DatasetNotReadyError(
            f'{len(errors)} datasets are not ready (`python -m lmoe_jax.data.prepare '
            '--config=...` lists them):\n\n' + '\n\n'.join(str(e) for e in errors))


def _size(num_bytes: int) -> str:
    for unit, scale in (('GiB', 1 << 30), ('MiB', 1 << 20), ('KiB', 1 << 10)):
        if num_bytes >= scale:
            return f'{num_bytes / scale:.1f} {unit}'
    return f'{num_bytes} B'


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f'{seconds:.1f} s'
    minutes, secs = divmod(int(round(seconds)), 60)
    return f'{minutes} min {secs:02d} s' if minutes < 60 else f'{minutes // 60} h {minutes % 60:02d} min'


def format_status(status: Status) -> str:
    """The report line(s) of one dataset: one line when ready, a second ('->') when missing."""
    head = f'{status.name} ({status.role})'
    if status.ready:
        found = 'prepared now' if status.prepared_now else 'already prepared'
        classes = f', {status.num_classes:,} classes' if status.num_classes is not None else ''
        lists = ''
        if status.lists:
            counts = ' / '.join(f'{split} {n:,}' for split, n in status.lists.items())
            lists = f'; MixOE lists: {counts} images, all found'
        return (f'[ready]   {head}: {found} in {status.location}, {_size(status.size_bytes)}, '
                f'{status.num_images:,} images{classes}{lists}, {_duration(status.seconds)}')
    return (f'[MISSING] {head}: {_one_line(_cause(status.error))} ({_duration(status.seconds)})\n'
            f'          -> {status.hint}')


def summary(statuses) -> str:
    missing = [s.name for s in statuses if not s.ready]
    if not missing:
        return f'all {len(statuses)} datasets are ready.'
    return (f'{len(statuses) - len(missing)} of {len(statuses)} datasets ready; missing: '
            f'{", ".join(missing)}. Place what the lines above say, then run this command again.')


class _QuietTfds:
    """Drops TFDS warnings that say nothing to act on here (shown with --verbose)."""

    BENIGN = ('has no dataset_info.json', 'Using custom data configuration',
              'FeatureConnector.dtype` is deprecated')

    def filter(self, record) -> bool:
        return not any(text in record.getMessage() for text in self.BENIGN)


def main(argv) -> int:
    """The command: prepare, print the report, return the exit status."""
    del argv
    from absl import flags, logging
    flag_values = flags.FLAGS
    config = flag_values.config
    if config is None:
        print('error: --config=configs/X.py is required.', file=sys.stderr)
        return MISSING_EXIT
    data_config = config.data
    with data_config.unlocked():
        for knob in ('data_dir', 'manual_dir'):
            if flag_values[knob].value is not None:
                data_config[knob] = flag_values[knob].value
    if not flag_values.verbose:  # warnings stay (e.g. unreadable images skipped), INFO goes
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(_QuietTfds())
    from ml_collections import config_flags
    print(f'Preparing the datasets of {config_flags.get_config_filename(flag_values["config"])} into '
          f'{_get(data_config, "data_dir") or "the TFDS default data_dir"} (manual directory: '
          f'{_get(data_config, "manual_dir") or "<data_dir>/downloads/manual"}).', flush=True)
    report = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # TFDS's own prints: stdout is the report
        statuses = prepare_all(data_config,
                               report=lambda s: print(format_status(s), file=report, flush=True))
    print(summary(statuses), flush=True)
    return 0 if all(s.ready for s in statuses) else MISSING_EXIT


def _run() -> None:
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
    flags.DEFINE_string('data_dir', None, 'TFDS data_dir (local or gs://); overrides '
                        'config.data.data_dir.')
    flags.DEFINE_string('manual_dir', None, 'Where the hand-downloaded files are; overrides '
                        'config.data.manual_dir.')
    flags.DEFINE_bool('verbose', False, 'Show the libraries\' warnings and INFO logs.')
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == '__main__':
    _run()
