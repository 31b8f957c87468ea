"""Orbax checkpoints of a run: the TrainState as sharded global arrays, with the config beside it.

Layout: ``<workdir>/checkpoints/<step>/{state,config}``. Orbax writes each step into a temporary
folder and renames it only once complete, so a run killed mid-save leaves no checkpoint that
can be restored by mistake. The manager keeps the last ``keep`` steps plus the best one by
validation accuracy (``metrics={'val_accuracy': ...}`` at save time).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from lmoe_jax import train

BEST_METRIC = 'val_accuracy'


class CheckpointError(ValueError):
    """A checkpoint that cannot serve the request (missing, or from another model)."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'checkpoints')


def _best_metric(metrics: Any) -> float:
    return float(metrics[BEST_METRIC])


def manager(workdir: str, *, keep: int = 3, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    """The run's CheckpointManager: keep the last ``keep`` plus the best by validation accuracy."""
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=max(int(keep), 1)),
        policies.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_best_metric, best_mode='max',  # best_fn: store metrics enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only)
    handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def _saveable(state: train.TrainState) -> dict:
    """The arrays of a TrainState (the static apply_fn / tx / lr_fn are rebuilt from config)."""
    return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
            'opt_state': state.opt_state}


def save(mngr: ocp.CheckpointManager, state: train.TrainState, config_dict: dict, *,
         val_accuracy: float | None = None, force: bool = False) -> bool:
    """Start an (asynchronous) save of ``state`` at its step; returns whether one was started."""
    step = int(jax.device_get(state.step))
    if step in mngr.all_steps():
        return False
    metrics = {BEST_METRIC: float(val_accuracy)} if val_accuracy is not None else None
    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_saveable(state)),
        config=ocp.args.JsonSave(config_dict)), metrics=metrics, force=force)


def restore(mngr: ocp.CheckpointManager, state: train.TrainState,
            step: int | None = None) -> train.TrainState:
    """Restore ``step`` (default: latest) into the shardings and structure of ``state``."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f'no checkpoint in {mngr.directory}')
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saveable(state))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']
    return state.replace(**restored)


def best_step(mngr: ocp.CheckpointManager) -> int | None:
    """The step with the highest validation accuracy, or the latest when none has one."""
    best, best_value = None, -np.inf
    for step in mngr.all_steps():
        metrics = mngr.metrics(step)
        if metrics and BEST_METRIC in metrics and float(metrics[BEST_METRIC]) > best_value:
            best, best_value = step, float(metrics[BEST_METRIC])
    return mngr.latest_step() if best is None else best


def saved_config(workdir: str, step: int | None = None) -> dict:
    """The config stored beside a checkpoint of ``workdir`` (latest step by default)."""
    mngr = manager(workdir, read_only=True, async_save=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f'no checkpoint in {checkpoint_dir(workdir)}: is {workdir!r} the '
                              'workdir of a finished run?')
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def load_variables_from(workdir: str, state: train.TrainState, *,
                        expect: dict[str, Any]) -> train.TrainState:
    """Stage 2: params and batch stats of another run's latest checkpoint, not its optimiser.

    ``expect`` lists what must agree (e.g. model name, width, num_classes); any difference or a
    different parameter tree is refused with a message naming the mismatch.
    """
    other = saved_config(workdir)
    for key, value in expect.items():
        theirs = _lookup(other, key)
        if theirs != value:
            raise CheckpointError(
                f'init_from={workdir!r} holds a checkpoint with {key}={theirs!r}, but this run has '
                f'{key}={value!r}; fine-tune from a run of the same model and class split.')
    mngr = manager(workdir, read_only=True, async_save=False)
    step = mngr.latest_step()
    meta = mngr.item_metadata(step)['state']
    _check_same_tree(meta['params'], state.params, 'params')
    _check_same_tree(meta['batch_stats'], state.batch_stats, 'batch_stats')
    # The other run's optimiser may differ: restore its whole tree as described by its metadata,
    # placed like this run's params, and keep params and batch stats only.
    sharding = jax.tree.leaves(state.params)[0].sharding
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']
    return state.replace(params=restored['params'], batch_stats=restored['batch_stats'])


def _lookup(config: dict, dotted: str) -> Any:
    node = config
    for part in dotted.split('.'):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def _check_same_tree(saved_meta: Any, current: Any, what: str) -> None:
    saved = {jax.tree_util.keystr(p): tuple(getattr(v, 'shape', ()))
             for p, v in jax.tree_util.tree_leaves_with_path(saved_meta)}
    mine = {jax.tree_util.keystr(p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_leaves_with_path(current)}
    for key in sorted(set(saved) | set(mine)):
        if saved.get(key) != mine.get(key):
            raise CheckpointError(
                f'checkpoint {what} do not match this model at {key}: checkpoint has '
                f'{saved.get(key, "nothing")}, model has {mine.get(key, "nothing")}. '
                'init_from needs a run of the same architecture and class count.')
