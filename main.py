"""lmoe_jax entry point: train (optionally two-stage), checkpoint, resume, evaluate.

  python main.py --config=configs/cub.py --workdir=runs/cub_lmoe
  python main.py --config=configs/cub.py --config.method=mixoe_mixup --config.batch_size=64 ...
  python main.py --mode=eval --workdir=runs/cub_lmoe            # config read from the checkpoint
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file (optional with --mode=eval).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, TensorBoard, report.')
flags.DEFINE_enum('mode', 'train_and_eval', ['train', 'eval', 'train_and_eval'], 'What to run.')
flags.DEFINE_integer('step', None, '--mode=eval: checkpoint step to evaluate (default: the best).')
flags.DEFINE_bool('distributed', None, 'Call jax.distributed.initialize() (default: when the '
                  'environment says this is one of several processes, e.g. a TPU pod slice).')
flags.DEFINE_string('coordinator_address', None, 'Multi-process without cluster auto-detection: '
                    'host:port of process 0 (with --num_processes and --process_id).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (see --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process index (see --coordinator_address).')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def _wants_distributed() -> bool:
    if FLAGS.distributed is not None:
        return FLAGS.distributed
    if FLAGS.coordinator_address:
        return True
    return any(v in os.environ for v in ('TPU_WORKER_HOSTNAMES', 'JAX_COORDINATOR_ADDRESS',
                                         'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    import jax
    if _wants_distributed():
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one process logs
    from lmoe_jax import checkpoint, trainer
    from lmoe_jax.data import DataConfigError, DatasetNotReadyError
    from lmoe_jax.models.pretrained import PretrainedMismatchError

    config = FLAGS.config
    try:
        if config is None:
            if FLAGS.mode != 'eval':
                raise trainer.ConfigError('--config=configs/X.py is required to train.')
            config = trainer.config_from_dict(checkpoint.saved_config(FLAGS.workdir))
        trainer.run(config, FLAGS.workdir, FLAGS.mode, eval_step=FLAGS.step)
    except (trainer.ConfigError, DataConfigError, DatasetNotReadyError, checkpoint.CheckpointError,
            PretrainedMismatchError, FileNotFoundError, trainer.NonFiniteLossError) as e:
        logging.error('%s', e)
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    app.run(main)
