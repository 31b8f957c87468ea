"""Mesh and sharding helpers, and the runner: one interface, two ways to run the train step.

A :class:`Runner` does three things, so that the training loop has no mode branches:

* ``place(state)``: a TrainState of global replicated arrays (``init_state``, an Orbax restore)
  -> the state its ``step`` takes;
* ``step(state, local_batch)``: one optimiser step on this process's part of the global batch
  (numpy, ``[B / process_count, ...]``) -> ``(state, metrics)``; metrics are replicated scalars,
  averaged over the global batch;
* ``global_state(state)``: the state as global replicated arrays, which Orbax saves and the
  evaluation reads (its ``mesh`` shards the evaluation batches).

:class:`JitRunner` (``parallelism='jit'``, the default): one ``jax.jit`` program over a 1-D
``Mesh`` with axis ``data``; each process's batch becomes its part of a global array
(``jax.make_array_from_process_local_data``), the state stays replicated.

:class:`PmapRunner` (``parallelism='pmap'``): the same ``train_step`` under ``jax.pmap`` over the
local devices, gradients and metrics averaged over the device axis and BatchNorm statistics
synchronised across it (the model is built with ``bn_axis_name=runner.bn_axis_name``), so it
computes what jit computes over the global batch. As in flax's ImageNet example the batch is
split with ``flax.training.common_utils.shard`` and the rng is broadcast; the state is
broadcast too (``in_axes=None``) and comes back unstacked (``out_axes=None``: every device holds
the same values), so nothing is stacked per device. Its outputs live on this process's devices
only; ``global_state`` makes them global with Orbax's
``fully_replicated_host_local_array_to_global_array``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import orbax.checkpoint as ocp
from flax.training import common_utils

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
    """``jax.pmap`` of the same step over the local devices: ``(state, sharded batch, rng)``;
    state and rng broadcast, the batch ``[n_local_devices, B_device, ...]``; state donated.

    The state comes back unstacked (``out_axes=None`` keeps device 0's copy, and every copy is
    the same: gradients are ``pmean``-ed and BatchNorm, built with ``bn_axis_name=PMAP_AXIS``,
    normalises with the global batch's statistics).
    """
    step = functools.partial(train.train_step, method=method, axis_name=PMAP_AXIS)
    return jax.pmap(step, axis_name=PMAP_AXIS, in_axes=(None, 0, None), out_axes=None,
                    donate_argnums=(0,))


# --------------------------------------------------------------------------------------------------
# The runner: one interface, two implementations
# --------------------------------------------------------------------------------------------------

class Runner:
    """Place the state, run a step on a host-local batch, give the global state (module doc).

    ``mesh``: all devices along ``data``, for evaluation batches and global arrays.
    ``bn_axis_name``: what the model's BatchNorm must average over (``create_model``).
    """
    name = ''
    bn_axis_name: str | None = None

    def __init__(self, method: losses.Method, rng: jax.Array, mesh: Mesh | None = None):
        self.method = method
        self.mesh = make_mesh() if mesh is None else mesh

    def place(self, state: train.TrainState) -> train.TrainState:
        raise NotImplementedError

    def step(self, state, local_batch: dict[str, np.ndarray]) -> tuple[Any, dict[str, jax.Array]]:
        raise NotImplementedError

    def global_state(self, state) -> train.TrainState:
        raise NotImplementedError


class JitRunner(Runner):
    """``jax.jit`` over ``mesh``: batch sharded along ``data``, state replicated and donated."""
    name = 'jit'

    def __init__(self, method, rng, mesh=None):
        super().__init__(method, rng, mesh)
        self._step = jit_train_step(method, self.mesh)
        self._rng = replicate(rng, self.mesh)

    def place(self, state):
        return jax.device_put(state, replicated(self.mesh))

    def step(self, state, local_batch):
        return self._step(state, global_batch(local_batch, self.mesh), self._rng)

    def global_state(self, state):
        return state


class PmapRunner(Runner):
    """``jax.pmap`` over the local devices (flax ImageNet style); ``mesh`` must span all devices."""
    name = 'pmap'
    bn_axis_name = PMAP_AXIS

    def __init__(self, method, rng, mesh=None):
        super().__init__(method, rng, mesh)
        if self.mesh.devices.size != jax.device_count():
            raise ValueError('pmap runs on every device: pass no mesh or one over jax.devices().')
        self._step = pmap_train_step(method)
        self._rng = rng

    def place(self, state):
        """This process's copy of each (replicated) array, on the local devices where pmap
        leaves its outputs: the first and later steps then take one layout (one compilation)."""
        local = NamedSharding(Mesh(np.asarray(jax.local_devices()), (PMAP_AXIS,)), P())
        return jax.tree.map(lambda x: jax.device_put(x.addressable_data(0), local), state)

    def step(self, state, local_batch):
        return self._step(state, common_utils.shard(dict(local_batch)), self._rng)

    def global_state(self, state):
        return jax.tree.map(ocp.utils.fully_replicated_host_local_array_to_global_array, state)


RUNNERS = {'jit': JitRunner, 'pmap': PmapRunner}


def make_runner(parallelism: str, method: losses.Method, rng: jax.Array,
                mesh: Mesh | None = None) -> Runner:
    """The runner of ``config.parallelism`` ('jit' or 'pmap'); ``rng``: the step key (the same on
    every process; ``train_step`` folds in the step)."""
    if parallelism not in RUNNERS:
        raise ValueError(f'parallelism={parallelism!r}; use one of {", ".join(RUNNERS)}.')
    return RUNNERS[parallelism](method, rng, mesh)
