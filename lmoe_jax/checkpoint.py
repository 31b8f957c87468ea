"""Orbax checkpoints of a run: the TrainState as sharded global arrays, with the config beside it.

Layout: ``<workdir>/checkpoints/<step>/{state,config}``. Orbax writes each step into a temporary
folder and renames it only once complete, so a run killed mid-save leaves no checkpoint that
can be restored by mistake. The manager keeps the last ``keep`` steps plus the best one by
validation accuracy (``metrics={'val_accuracy': ...}`` at save time).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as policies

from lmoe_jax import train

BEST_METRIC = 'val_accuracy'


class CheckpointError(ValueError):
    """A checkpoint that cannot serve the request (missing, or from another model)."""


def as_path(path) -> epath.Path:
    """A local or ``gs://`` path as an ``epath.Path``; local paths made absolute (Orbax needs it)."""
    path = epath.Path(path)
    return path if '://' in str(path) else path.resolve()


def checkpoint_dir(workdir) -> epath.Path:
    return as_path(workdir) / 'checkpoints'


def _best_metric(metrics: Any) -> float:
    """Validation accuracy; a non-finite one ranks below every real one (never "best")."""
    value = float(metrics[BEST_METRIC])
    return value if math.isfinite(value) else -math.inf


def manager(workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False,
            save_every: Sequence[int] = (), save_at: Sequence[int] = ()) -> ocp.CheckpointManager:
    """The run's CheckpointManager: keep the last ``keep`` plus the best by validation accuracy.

    ``save_every`` / ``save_at``: the steps its ``should_save`` (and a ``save`` without
    ``force``) accepts, multiples of any of ``save_every`` and the steps ``save_at``; with
    neither, every step.
    """
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=max(int(keep), 1)),
        policies.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    save_policy = None
    if save_every or save_at:
        save_policy = policies.AnySavePolicy(
            [policies.FixedIntervalPolicy(int(n)) for n in save_every]
            + [policies.SpecificStepsPolicy(tuple(int(s) for s in save_at))])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, save_decision_policy=save_policy,
        best_fn=_best_metric, best_mode='max',
        enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only)
    handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


@contextlib.contextmanager
def reading(workdir) -> Iterator[ocp.CheckpointManager]:
    """A read-only manager of ``workdir``'s checkpoints, closed on exit."""
    mngr = manager(workdir, read_only=True, async_save=False)
    try:
        yield mngr
    finally:
        mngr.close()


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


def read_variables(mngr: ocp.CheckpointManager, step: int) -> dict:
    """params and batch_stats of ``step`` as host numpy arrays, whatever model wrote them."""
    meta = mngr.item_metadata(step)['state']
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return {'params': state['state']['params'], 'batch_stats': state['state']['batch_stats']}


def best_step(mngr: ocp.CheckpointManager) -> int | None:
    """The step with the highest validation accuracy (Orbax's ``best_fn``), else the latest."""
    best = mngr.best_step()
    return mngr.latest_step() if best is None else best


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def non_finite_leaves(tree) -> list[str]:
    """Paths of the floating-point leaves of ``tree`` that hold a NaN or inf (empty: all finite)."""
    floats = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)}
    if not floats or bool(_all_finite(floats)):
        return []
    return [k for k, x in floats.items() if not bool(_all_finite({'x': x}))]


def read_config(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The config saved beside checkpoint ``step`` (as the dict ``save`` was given)."""
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def saved_config(workdir: str, step: int | None = None) -> dict:
    """The config stored beside a checkpoint of ``workdir`` (latest step by default)."""
    with reading(workdir) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f'no checkpoint in {checkpoint_dir(workdir)}: is {workdir!r} '
                                  'the workdir of a finished run?')
        return read_config(mngr, step)


def config_mismatch(saved: dict, expect: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first dotted key of ``expect`` (e.g. 'model.width') whose value differs in the saved
    config, as ``(key, saved value, expected value)``; None when all agree (a missing key reads
    as None, a tuple as a list, as JSON stores them)."""
    flat = traverse_util.flatten_dict(saved, sep='.')
    for key, value in expect.items():
        theirs = flat.get(key)
        theirs = list(theirs) if isinstance(theirs, tuple) else theirs
        if theirs != value:
            return key, theirs, value
    return None


def load_variables_from(workdir, state: train.TrainState, *,
                        expect: dict[str, Any]) -> tuple[train.TrainState, int]:
    """Stage 2: params and batch stats of another run's BEST checkpoint, not its optimiser.

    Best = highest ID validation accuracy (the latest where none was measured). ``expect`` lists
    what must agree (e.g. model name, width, class split); any difference or a different
    parameter tree is refused with a message naming the mismatch. Returns (state, step used).
    """
    with reading(workdir) as mngr:
        step = best_step(mngr)
        if step is None:
            raise CheckpointError(f'init_from={str(workdir)!r} has no checkpoint; point it to the '
                                  'workdir of a finished run (e.g. the baseline stage).')
        mismatch = config_mismatch(read_config(mngr, step), expect)
        if mismatch:
            key, theirs, value = mismatch
            raise CheckpointError(
                f'init_from={str(workdir)!r} holds a checkpoint with {key}={theirs!r}, but this '
                f'run has {key}={value!r}; fine-tune from a run of the same model and class split.')
        meta = mngr.item_metadata(step)['state']
        _check_same_tree(meta['params'], state.params, 'params')
        _check_same_tree(meta['batch_stats'], state.batch_stats, 'batch_stats')
        # The other run's optimiser may differ: restore its whole tree as described by its
        # metadata, placed like this run's params, and keep params and batch stats only.
        sharding = jax.tree.leaves(state.params)[0].sharding
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                              meta)
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))['state']
    return state.replace(params=restored['params'], batch_stats=restored['batch_stats']), step


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
