"""lmoe_jax entry point: train (optionally two-stage), checkpoint, resume, evaluate.

  python main.py --config=configs/cub.py --workdir=gs://BUCKET/cub_lmoe
  python main.py --config=configs/cub.py --config.method=mixoe_mixup --config.batch_size=64 ...
  python main.py --mode=eval --workdir=runs/cub_lmoe            # config read from the checkpoint

The terminal shows one line per log interval, checkpoint, validation and evaluation set, then the
report. ``--verbose`` adds the libraries' INFO logs (Orbax, TFDS, XLA, ...). A mistake a user can
make ends with one ``error:`` line and exit code 2 (the traceback too with ``--verbose``).
"""
import errno
import logging as pylogging
import os
import sys
import threading
import time
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

STARTED = time.perf_counter()  # jax, TensorFlow and the data load later: start-up counts from here

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file (optional with --mode=eval).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (local or gs://): checkpoints, logs, '
                    'TensorBoard, report.')
flags.DEFINE_enum('mode', 'train_and_eval', ['train', 'eval', 'train_and_eval'], 'What to run.')
flags.DEFINE_integer('step', None, '--mode=eval: checkpoint step to evaluate (default: the best).')
flags.DEFINE_bool('verbose', False, 'Show the INFO logs of every library (and tracebacks of '
                  'user errors).')
flags.DEFINE_bool('distributed', None, 'Call jax.distributed.initialize() (default: when the '
                  'environment says this is one of several processes, e.g. a TPU pod slice).')
flags.DEFINE_string('coordinator_address', None, 'Multi-process without cluster auto-detection: '
                    'host:port of process 0 (with --num_processes and --process_id).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (see --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process index (see --coordinator_address).')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS

USAGE_EXIT = 2


def _fail(message: str) -> None:
    """The one line a user mistake ends with."""
    if FLAGS.is_parsed() and FLAGS.verbose:
        traceback.print_exc()
    print(f'error: {message}', file=sys.stderr, flush=True)
    # Saves were finished or cleaned up on the way here; skip the interpreter's teardown, which
    # would log the libraries' leftover background errors after this line.
    sys.stdout.flush()
    os._exit(USAGE_EXIT)


def _parse_flags(argv):
    """absl's parser, with a flag mistake reported as one ``error:`` line and exit 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except OSError as e:  # ml_collections: the --config file cannot be loaded
        message = _config_load_error(e)
    except (AttributeError, KeyError) as e:  # ml_collections: --config.X names no field
        message = 'a --config.* flag names no config field: ' + \
            str(e).strip('\'"').replace('\\n', ' ').replace('\\', '')
    print(f'error: {message}\n(python main.py --helpshort lists the flags; configs/default.py '
          'lists every config field)', file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


def _load_config():
    """``--config`` loads lazily: a config file that cannot be loaded surfaces here."""
    config = FLAGS.config
    if config is None:
        return None
    try:
        config.get('method')
    except OSError as e:
        _fail(_config_load_error(e))
    return config


def _config_load_error(e: OSError) -> str:
    """ml_collections' multi-line load error, cut to the line that names the cause."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = [line for line in lines if 'Errno' in line or 'Error' in line.split(':')[0]]
    return f'cannot load the --config file: {(cause or lines)[-1]}'



# Library WARNINGs that say nothing to act on in this program (shown with --verbose).
BENIGN_WARNINGS = (
    'FeatureConnector.dtype` is deprecated',  # TFDS, on every dataset load
    'CheckpointManagerOptions.read_only=True',  # Orbax: our read-only managers are on purpose
    'Given directory is read only',
    'Requested `tracked_metric`; did not provide metrics',  # Orbax: a save between validations
    'has no dataset_info.json',  # TFDS, while a dataset is first prepared
    'Using custom data configuration',  # TFDS, per folder:<path> dataset (its own config)
    'oneDNN custom operations are on',  # TensorFlow's C++ start-up notes, not affected by
    'All log messages before absl::InitializeLog()',  # TF_CPP_MIN_LOG_LEVEL
)


def _import_tensorflow_quietly() -> None:
    """TensorFlow's C++ start-up notes ignore TF_CPP_MIN_LOG_LEVEL: import it with stderr in a
    temporary file and pass on every line that is not one of the known notes."""
    import tempfile
    with tempfile.TemporaryFile(mode='w+b') as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors='replace').splitlines():
                if not any(text in line for text in BENIGN_WARNINGS):
                    print(line, file=sys.stderr)


# A full disk surfaces first in the libraries' background threads (CLU's summary writer: "Failed
# to flush N events ... Could not flush events file"; Orbax's save finalizer), then as the error
# that ends the run with our one `error:` line: their lines repeat it (shown with --verbose).
EXPLAINED_BY_OUR_ERROR_LINE = ('no space left on device',)  # matched in lower case


class _Readable(pylogging.Filter):
    """Without --verbose: drop the benign warnings above and the library errors our error line
    explains, and log any other library error as one line, not a traceback."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        if any(text in message for text in BENIGN_WARNINGS) or any(
                text in f'{message} {error}'.lower() for text in EXPLAINED_BY_OUR_ERROR_LINE):
            return False
        if error is not None:
            record.msg, record.args = f'{message} ({type(error).__name__}: {error})', ()
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_libraries(verbose: bool) -> None:
    """Warnings and errors always show; INFO chatter only with --verbose."""
    if verbose:
        logging.set_verbosity(logging.INFO)
        return
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ INFO/WARNING lines
    _import_tensorflow_quietly()
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_Readable())
    # errors of library threads and callbacks (TensorStore's on a full disk): one line each
    threading.excepthook = lambda a: logging.error('a background thread failed: %s: %s',
                                                   a.exc_type.__name__, a.exc_value)
    sys.unraisablehook = lambda u: logging.error('ignored in a library callback: %s: %s',
                                                 u.exc_type.__name__, u.exc_value)
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()


# errno -> what to do; TensorStore (Orbax's array writer) reports these as ValueErrors whose text
# carries the OS message, so the text is matched too.
_STORAGE_ERRORS = {
    errno.ENOSPC: ('No space left on device', 'no space left on the device while writing {path}: '
                   'free some space or use another --workdir; restart to resume from the last '
                   'checkpoint.'),
    errno.EROFS: ('Read-only file system', 'cannot write {path} (read-only file system): use a '
                  '--workdir you can write to.'),
    errno.EACCES: ('Permission denied', 'cannot write {path} (permission denied): use a '
                   '--workdir you can write to.'),
}


def _storage_error_message(error: BaseException) -> str | None:
    """The message for a full disk or an unwritable workdir behind ``error`` (Orbax and CLU wrap
    the errors of their background threads), or None for anything else."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for code, (text, message) in _STORAGE_ERRORS.items():
            if getattr(error, 'errno', None) == code or text in str(error):
                return message.format(path=getattr(error, 'filename', None) or FLAGS.workdir)
        error = error.__cause__ or error.__context__
    return None


def main(argv):
    if len(argv) > 1:
        _fail(f'unexpected arguments: {argv[1:]}')
    _quiet_libraries(FLAGS.verbose)
    config = _load_config()
    import jax
    if _wants_distributed():
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    from lmoe_jax import checkpoint, trainer
    from lmoe_jax.data import DataConfigError, DatasetNotReadyError
    from lmoe_jax.models.pretrained import PretrainedMismatchError, PretrainedUnavailableError

    user_errors = (trainer.ConfigError, DataConfigError, DatasetNotReadyError,
                   checkpoint.CheckpointError, PretrainedMismatchError, PretrainedUnavailableError,
                   FileNotFoundError, trainer.NonFiniteLossError)
    try:
        if config is None:
            if FLAGS.mode != 'eval':
                raise trainer.ConfigError('--config=configs/X.py is required to train.')
            config = trainer.config_from_dict(checkpoint.saved_config(FLAGS.workdir))
        summary = trainer.run(config, FLAGS.workdir, FLAGS.mode, eval_step=FLAGS.step,
                              started=STARTED)
    except user_errors as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001  a full disk or read-only workdir, however wrapped
        message = _storage_error_message(e)
        if message is None:
            raise
        _fail(message)
    if any(isinstance(v, dict) and v.get('preempted') for v in summary.values()) or \
            summary.get('preempted'):
        # Preempted: the checkpoint is on disk (checked by the trainer) and the logs are flushed.
        # Leave now: a TPU VM gives ~30 s, and tf.data's reader threads take longer to tear down.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _wants_distributed() -> bool:
    if FLAGS.distributed is not None:
        return FLAGS.distributed
    if FLAGS.coordinator_address:
        return True
    return any(v in os.environ for v in ('TPU_WORKER_HOSTNAMES', 'JAX_COORDINATOR_ADDRESS',
                                         'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


if __name__ == '__main__':
    app.run(main, flags_parser=_parse_flags)
