"""Helpers for tests that run the trainer or main.py: tiny configs on fake data, the CLI, a
child process's environment, reading a run's params back with plain Orbax."""
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

import data_fixtures as fx
from configs import tiny
from lmoe_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_data_dirs(root) -> dict:
    """Fake Fashion-MNIST and Animal-MNIST files under ``root``: the config.data fields."""
    fx.write_fake_fashion(str(root / 'fashion'), num_train=400, num_test=60)
    fx.write_fake_animals(str(root / 'animals'), num=80, duplicates=0)
    return {'fashion_mnist_dir': str(root / 'fashion'), 'animal_mnist_dir': str(root / 'animals'),
            'data_dir': str(root / 'tfds')}


def tiny_config(data_dirs, **overrides):
    c = tiny.get_config()
    c.data.update(data_dirs)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def cli(data_dirs, workdir, *extra, config='configs/tiny.py'):
    return [sys.executable, os.path.join(ROOT, 'main.py'), f'--config={os.path.join(ROOT, config)}',
            f'--workdir={workdir}', '--mode=train',
            *[f'--config.data.{k}={v}' for k, v in data_dirs.items()], *extra]


def xla_flags(devices: int) -> str:
    """This process's XLA flags (an ISA limit, say) with the CPU device count set to ``devices``."""
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    return ' '.join([*flags, f'--xla_force_host_platform_device_count={devices}'])


def env(devices=8, **extra):
    """A child's environment: this one's, ``devices`` CPU devices, the repo importable."""
    e = dict(os.environ)
    e['XLA_FLAGS'] = xla_flags(devices)
    e['JAX_PLATFORMS'] = 'cpu'
    e['PYTHONPATH'] = ROOT
    e.update(extra)
    return e


def final_params(workdir):
    """The params of a run's latest checkpoint, as numpy, read back with plain Orbax."""
    mngr = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir), item_handlers={
        'state': ocp.StandardCheckpointHandler()})
    step = mngr.latest_step()
    meta = mngr.item_metadata(step)['state']
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return step, jax.tree.map(np.asarray, state['state']['params'])
