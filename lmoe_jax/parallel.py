"""Mesh and sharding helpers, and the two ways to run the train step on many devices.

Default (``parallelism='jit'``): one ``jax.jit`` program over a 1-D ``Mesh`` with axis ``data``;
the batch is a global array sharded along ``data``, the state is replicated. Multi-host: each
process passes its own per-host batch and ``global_batch`` assembles the global array.

``parallelism='pmap'``: the same ``train_step`` body under ``jax.pmap`` with gradients averaged
over the device axis and BatchNorm statistics synchronised across it (the model is built with
``bn_axis_name=PMAP_AXIS``), so it computes what jit computes over the global batch. State
leaves ``pmap`` through ``unreplicate``, which gives global replicated arrays that Orbax can save.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmoe_jax import losses, train

DATA_AXIS = 'data'
PMAP_AXIS = 'batch'
PyTree = Any


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices, axis ``data``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_size(global_batch_size: int, num_devices: int | None = None) -> None:
    """Refuse at start-up a batch that cannot be split evenly over the devices and processes."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ValueError(
            f'batch_size={global_batch_size} is not divisible by the {num_devices} devices; '
            f'set --config.batch_size to a multiple of {num_devices}.')
    if global_batch_size % jax.process_count():
        raise ValueError(f'batch_size={global_batch_size} is not divisible by the '
                         f'{jax.process_count()} processes.')


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global arrays sharded along ``data`` (multi-host safe)."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Host values (identical on every process) -> global arrays replicated over the mesh."""
    sharding = replicated(mesh)

    def put(x):
        if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


# --------------------------------------------------------------------------------------------------
# jit over a mesh (default)
# --------------------------------------------------------------------------------------------------

def jit_train_step(method: losses.Method, mesh: Mesh) -> Callable:
    """The compiled step: ``(state, batch, rng) -> (state, metrics)``; state donated."""
    state_sh, data_sh = replicated(mesh), data_sharded(mesh)
    step = functools.partial(train.train_step, method=method, mesh=mesh)
    return jax.jit(step, in_shardings=(state_sh, data_sh, state_sh),
                   out_shardings=(state_sh, state_sh), donate_argnums=(0,))


def init_state(rng: jax.Array, model, tx, lr_fn, image_shape, mesh: Mesh) -> train.TrainState:
    """Initialise the TrainState directly as replicated global arrays (no host copy)."""
    init = functools.partial(train.create_train_state, model=model, tx=tx, lr_fn=lr_fn,
                             image_shape=tuple(image_shape))
    return jax.jit(init, out_shardings=replicated(mesh))(rng)


# --------------------------------------------------------------------------------------------------
# pmap
# --------------------------------------------------------------------------------------------------

def pmap_train_step(method: losses.Method) -> Callable:
    """``jax.pmap`` of the same step; expects per-device stacked state/batch (see helpers below).

    The model must be built with ``bn_axis_name=PMAP_AXIS`` so BatchNorm normalises with the
    statistics of the global batch, as jit does.
    """
    step = functools.partial(train.train_step, method=method, axis_name=PMAP_AXIS)
    return jax.pmap(step, axis_name=PMAP_AXIS, in_axes=(0, 0, None), donate_argnums=(0,))


def _leading_axis_sharding(devices) -> NamedSharding:
    """One slice of the leading (device) axis per local device: the layout pmap expects."""
    return NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))


def stack_for_pmap(tree: PyTree, devices=None) -> PyTree:
    """Replicate a state onto the local devices with a leading device axis, for pmap."""
    devices = jax.local_devices() if devices is None else devices
    n = len(devices)
    sharding = _leading_axis_sharding(devices)

    def put(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x, (n, *x.shape)), sharding)

    return jax.tree.map(put, tree)


def shard_for_pmap(local_batch: dict[str, np.ndarray], devices=None) -> dict[str, jax.Array]:
    """[B_local, ...] -> [n_local_devices, B_local / n, ...] placed one slice per device."""
    devices = jax.local_devices() if devices is None else devices
    n = len(devices)
    sharding = _leading_axis_sharding(devices)
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        if v.shape[0] % n:
            raise ValueError(f'per-host batch of {v.shape[0]} does not split over {n} devices')
        out[k] = jax.device_put(v.reshape(n, v.shape[0] // n, *v.shape[1:]), sharding)
    return out


def unreplicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """pmap output (leading device axis, identical copies) -> global replicated arrays.

    Orbax cannot save pmap's host-local arrays; these global arrays it can.
    """
    def first_copy(x):
        return np.asarray(x.addressable_shards[0].data)[0]

    return replicate(jax.tree.map(first_copy, tree), mesh)


def metrics_from_pmap(metrics: PyTree) -> PyTree:
    """Metrics are pmean-ed inside the step: every device holds the same value; keep one."""
    return jax.tree.map(lambda x: x[0], metrics)
