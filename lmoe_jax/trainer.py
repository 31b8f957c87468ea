"""The training program: config -> data -> compiled step -> CLU logs / Orbax checkpoints -> report.

``run(config, workdir, mode)`` is what ``main.py`` calls. A run resumes from its latest complete
checkpoint automatically (same step, learning rate, data position and rng, so a killed and
restarted run ends bit-identical to an uninterrupted one on CPU); SIGTERM saves and exits
cleanly (during evaluation it stops the evaluation, which a restart redoes); a non-finite
objective or gradient stops the run, after any save in flight has finished, and non-finite
parameters are never saved. Every path goes through ``etils.epath``, so the workdir may be
``gs://``. The terminal gets one line per log interval, checkpoint, validation and evaluation
set (``console``); library chatter is absl INFO, shown with ``--verbose``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, metrics as clu_metrics, parameter_overview, periodic_actions
from etils import epath
from flax import traverse_util

from lmoe_jax import checkpoint, losses, parallel, train
from lmoe_jax.models import create_model

MODES = ('train', 'eval', 'train_and_eval')
PARALLELISMS = ('jit', 'pmap')


class ConfigError(ValueError):
    """A config value that cannot work; the message says which and what to set."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite objective, gradient or parameter; the run stopped."""


class EvaluationInterrupted(RuntimeError):
    """SIGTERM arrived during the evaluation; nothing was written, a restart redoes it."""


def console(message: str) -> None:
    """One line for the person at the terminal (process 0 only; stdout, flushed)."""
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

def method_from_config(config) -> losses.Method:
    overrides = config.loss.to_dict() if 'loss' in config else {}
    return losses.get_method(config.method, overrides)


def validate_config(config, *, mode: str = 'train') -> None:
    """Fail at start-up with one clear message per problem a user can cause."""
    if mode not in MODES:
        raise ConfigError(f'--mode={mode!r} is not one of {", ".join(MODES)}.')
    try:
        method_from_config(config)
    except ValueError as e:
        raise ConfigError(f'config.method / config.loss: {e}') from None
    try:
        create_model(config.model, 2)
    except ValueError as e:
        raise ConfigError(f'config.model: {e}') from None
    if config.parallelism not in PARALLELISMS:
        raise ConfigError(f'config.parallelism={config.parallelism!r}; use one of '
                          f'{", ".join(PARALLELISMS)}.')
    try:
        parallel.check_batch_size(int(config.batch_size))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mode != 'eval' and int(config.num_train_steps) <= 0 and float(config.num_epochs) <= 0:
        raise ConfigError('set config.num_epochs > 0 or config.num_train_steps > 0.')
    for name in ('learning_rate', 'weight_decay', 'end_learning_rate'):
        if float(config[name]) < 0:
            raise ConfigError(f'config.{name}={config[name]} must be >= 0.')
    if float(config.get('baseline_epochs', 0) or 0) < 0:
        raise ConfigError(f'config.baseline_epochs={config.baseline_epochs} must be >= 0.')
    if config.init_from and not checkpoint.checkpoint_dir(config.init_from).is_dir():
        raise ConfigError(f'config.init_from={config.init_from!r} has no checkpoints/ folder; '
                          'point it to the workdir of a finished run (e.g. the baseline stage).')
    _validate_data_config(config.data)
    for name in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                 'keep_checkpoints', 'eval_batch_size'):
        if int(config[name]) <= 0:
            raise ConfigError(f'config.{name}={config[name]} must be > 0.')


def _validate_data_config(data_config) -> None:
    """Class split and image sizes: cheap checks that otherwise fail deep inside tf.data."""
    from lmoe_jax import data
    try:
        data.class_split(int(data_config.num_classes), int(data_config.num_id_classes),
                         int(data_config.get('split', 0) or 0), data_config.get('id_classes'),
                         data_config.get('ignore_classes'))
        data.transform_from_config(data_config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def config_to_dict(config) -> dict:
    """JSON-safe copy (tuples become lists) stored beside every checkpoint."""
    return json.loads(json.dumps(config.to_dict(), default=list))


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(d)


def _identity(config) -> dict:
    """What a checkpoint used by init_from must share with this run."""
    return {'model.name': config.model.name, 'model.width': config.model.width,
            'data.image_size': config.data.image_size, 'data.dataset': config.data.dataset, 'data.num_id_classes': config.data.num_id_classes,
            'data.split': config.data.split,
            'data.id_classes': (list(config.data.id_classes) if config.data.id_classes is not None
                                else None),
            'data.ignore_classes': (list(config.data.ignore_classes)
                                    if config.data.get('ignore_classes') is not None else None)}


# --------------------------------------------------------------------------------------------------
# Setup shared by training and evaluation
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    config: Any
    mesh: Any
    model: Any
    info: Any
    method: losses.Method
    total_steps: int
    steps_per_epoch: int
    runner: parallel.Runner


def enable_compilation_cache(config, workdir: str) -> None:
    """JAX's persistent cache of XLA programs, so a restart does not compile again: in
    ``config.compilation_cache_dir``, else ``$JAX_COMPILATION_CACHE_DIR`` (one cache shared by
    many runs, e.g. a sweep or a test session), else ``<workdir>/jax_cache``; '' leaves JAX's
    own setting alone."""
    cache = config.get('compilation_cache_dir')
    if cache == '':
        return
    cache = (cache or os.environ.get('JAX_COMPILATION_CACHE_DIR')
             or str(checkpoint.as_path(workdir) / 'jax_cache'))
    jax.config.update('jax_compilation_cache_dir', str(cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def make_setup(config) -> Setup:
    from lmoe_jax import data  # TensorFlow loads here, not at import time
    info = data.dataset_info(config.data, process_count=jax.process_count())
    # every process must agree on the epoch length: the data module takes the smallest part
    steps_per_epoch = max(info.steps_per_epoch(int(config.batch_size) // jax.process_count()), 1)
    if int(config.num_train_steps) > 0:
        total = int(config.num_train_steps)
    else:
        total = max(int(round(float(config.num_epochs) * steps_per_epoch)), 1)  # 0.5 epochs: fine
    method = method_from_config(config)
    # one key for every step (train_step folds in the step)
    step_key = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
    runner = parallel.make_runner(config.parallelism, method, step_key)
    model = create_model(config.model, info.num_id_classes, bn_axis_name=runner.bn_axis_name)
    return Setup(config=config, mesh=runner.mesh, model=model, info=info, method=method,
                 total_steps=total, steps_per_epoch=steps_per_epoch, runner=runner)


def initial_state(setup: Setup, *, load_pretrained: bool = True) -> train.TrainState:
    """Fresh replicated TrainState; ImageNet weights from ``config.model.pretrained`` if set."""
    config = setup.config
    tx, lr_fn = train.make_optimizer(config, setup.total_steps)
    # 'rbg' for initialisation only: threefry compiles ~7x slower for the many parameter shapes
    # of model.init on CPU (3 s vs 21 s for the demo CNN); training draws use the default impl.
    rng = jax.random.key(int(config.seed), impl='rbg')
    state = parallel.init_state(rng, setup.model, tx, lr_fn, setup.info.image_shape, setup.mesh)
    if load_pretrained and config.model.get('pretrained'):
        from lmoe_jax.models import pretrained
        variables = pretrained.maybe_load_pretrained(jax.device_get(state.variables), config.model)
        state = state.replace(**parallel.replicate(
            {'params': variables['params'], 'batch_stats': variables['batch_stats']}, setup.mesh))
        state = state.replace(opt_state=jax.jit(tx.init, out_shardings=parallel.replicated(
            setup.mesh))(state.params))
    return state


# --------------------------------------------------------------------------------------------------
# Train metrics (clu.metrics), validation accuracy
# --------------------------------------------------------------------------------------------------

def _metric_field(name: str) -> str:
    return name.replace('/', '__')


def make_train_collection(names):
    return clu_metrics.Collection.create(
        **{_metric_field(n): clu_metrics.Average.from_output(_metric_field(n)) for n in names})


def make_metric_accumulator(names) -> Callable:
    """``accumulate(collection_or_None, step_metrics) -> collection``, one jitted call a step.

    CLU's ``single_from_model_output`` + ``merge`` run eagerly dispatch a few tiny ops per
    metric: 11 ms a step for LMoE's nine metrics on 2 CPU cores (benchmarks/loop_overheads.py),
    a quarter of a demo stage-1 step.
    """
    collection_cls = make_train_collection(names)

    def single(metrics):
        return collection_cls.single_from_model_output(
            **{_metric_field(k): v for k, v in metrics.items()})

    first = jax.jit(single)
    merge = jax.jit(lambda collection, metrics: collection.merge(single(metrics)))
    return lambda collection, metrics: (first(metrics) if collection is None
                                        else merge(collection, metrics))


def collection_to_scalars(collection) -> dict[str, float]:
    return {f'train/{k.replace("__", "/")}': float(v) for k, v in collection.compute().items()}


EvalMetrics = clu_metrics.Collection.create(accuracy=clu_metrics.Average.from_output('correct'))


def make_eval_step(apply_fn):
    @jax.jit
    def eval_step(variables, images, labels, mask):
        logits = apply_fn(variables, images, train=False)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return EvalMetrics.single_from_model_output(correct=correct, mask=mask)
    return eval_step


def validation_accuracy(eval_step, variables, eval_set, mesh) -> float:
    """Top-1 accuracy over an eval set (padded rows masked out), all processes together."""
    total = None
    for batch in eval_set.batches():
        arrays = parallel.global_batch(
            {'image': batch['image'], 'label': batch['label'], 'mask': batch['mask']}, mesh)
        m = eval_step(variables, arrays['image'], arrays['label'], arrays['mask'])
        total = m if total is None else total.merge(m)
    return float(total.compute()['accuracy']) if total is not None else float('nan')


# --------------------------------------------------------------------------------------------------
# Signals and safety
# --------------------------------------------------------------------------------------------------

class _StopFlag:
    """SIGTERM (TPU preemption): the train loop saves and exits at the next step; inside
    ``interrupting()`` (the evaluation) the signal raises ``EvaluationInterrupted`` at once."""

    def __init__(self):
        self.requested = False
        self._interrupt = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            del frame
            self.requested = True
            if self._interrupt:
                self._interrupt = False
                raise EvaluationInterrupted(f'signal {signum} during the evaluation')
            console(f'signal {signum} received: saving a checkpoint and stopping')
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @contextlib.contextmanager
    def interrupting(self):
        if self.requested:
            raise EvaluationInterrupted('stop requested before the evaluation')
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False

    def should_stop(self, step: int, sync_every: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % sync_every:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


# What must stay finite: the weighted objective and the gradient. A single term may be inf with
# weight 0 (it then contributes exactly 0), so terms alone never stop a run.
GUARDED_METRICS = ('loss/total', 'grad_norm')


def non_finite_metrics(metrics_host: dict) -> dict:
    return {k: float(metrics_host[k]) for k in GUARDED_METRICS
            if k in metrics_host and not np.isfinite(metrics_host[k])}


def intact_checkpoint(mngr) -> str:
    """What is really on disk (once the saves in flight are finished): the latest step, read
    back and checked finite; said as a phrase for the stop message."""
    mngr.reload()
    step = mngr.latest_step()
    if step is None:
        return 'no checkpoint was saved yet'
    bad = checkpoint.non_finite_leaves(checkpoint.read_variables(mngr, step))
    if bad:
        return f'the latest checkpoint (step {step}) is NOT finite ({len(bad)} arrays)'
    return f'the latest checkpoint, step {step}, was read back from disk and is finite'


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def _batches(config, method: losses.Method, start_step: int) -> Iterator[dict]:
    """This process's train batches; a method that uses no outlier gets none (stage 1)."""
    from lmoe_jax import data
    per_process = int(config.batch_size) // jax.process_count()
    return iter(data.train_stream(config.data, batch_size=per_process, seed=int(config.seed),
                                  start_step=start_step, outliers=method.needs_outliers))


def check_workdir_writable(workdir) -> epath.Path:
    """Create the workdir (local or gs://) and prove it takes a file, before any work is done."""
    path = checkpoint.as_path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            probe = path / f'.write_test.{time.time_ns()}'
            probe.write_text('ok')
            probe.unlink()
    except OSError as e:
        raise ConfigError(f'the workdir {str(path)!r} is not writable ({e.strerror or e}); '
                          'use a --workdir you can write to.') from None
    return path


def _check_resume_identity(workdir, saved: dict, config) -> None:
    """Resuming needs the same model and data layout; say so before Orbax's shape errors do."""
    mismatch = checkpoint.config_mismatch(saved, _identity(config))
    if mismatch:
        key, theirs, value = mismatch
        raise checkpoint.CheckpointError(
            f'{workdir} holds a run with {key}={theirs!r}, but this config has {key}={value!r}. '
            'To train this config, use a new --workdir; to resume that run, use the config it '
            f'was started with (saved beside its checkpoints; --mode=eval reads it).')


class _TerminalLine(metric_writers.MetricWriter):
    """The per-interval terminal line (stage, step/total, steps/s, ETA, loss, ID accuracy), fed
    by the writes that also go to TensorBoard: CLU's ``ReportProgress`` writes its rate
    (``steps_per_sec``) at each log step, then the loop writes the train scalars."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.rate = stage, total, None

    def write_scalars(self, step, scalars):
        if 'steps_per_sec' in scalars:
            self.rate = float(scalars['steps_per_sec'])
        if 'train/loss/total' not in scalars:
            return
        width = len(str(self.total))
        if self.rate:  # none before CLU's first interval is complete (the stage's first step)
            speed = f'{self.rate:6.2f} steps/s  ETA {_duration((self.total - step) / self.rate):>6}'
        else:
            speed = 'first step (compiled)'
        console(f'[{self.stage}] step {step:>{width}}/{self.total} {100 * step / self.total:5.1f}%  '
                f'{speed}  loss {scalars["train/loss/total"]:.4f}'
                f'  acc {100 * scalars.get("train/accuracy", math.nan):5.1f}%')

    def write_summaries(self, step, values, metadata=None): pass
    def write_images(self, step, images): pass
    def write_videos(self, step, videos): pass
    def write_audios(self, step, audios, *, sample_rate): pass
    def write_texts(self, step, texts): pass
    def write_histograms(self, step, arrays, num_buckets=None): pass
    def write_hparams(self, hparams): pass
    def flush(self): pass
    def close(self): pass


@dataclasses.dataclass(frozen=True)
class _Due:
    """What follows a step. ``save`` already includes every validation step and the last step
    (they are in the manager's save policy, ``_save_policy``) and a stop request."""
    log: bool
    validate: bool
    save: bool
    stop: bool  # stop early on request (SIGTERM), after saving


def _save_policy(config, total: int) -> dict:
    """The steps Orbax's manager saves at (``checkpoint.manager(save_every=, save_at=)``): every
    ``checkpoint_every_steps`` and ``eval_every_steps`` (a validated step is a candidate for
    "best", so it must be on disk) and the last step."""
    return {'save_every': (int(config.checkpoint_every_steps), int(config.eval_every_steps)),
            'save_at': (total,)}


def _due(step: int, total: int, config, mngr, stop: '_StopFlag') -> _Due:
    """Every periodic decision of the loop, in one place (the same on every process)."""
    last = step == total
    stop_now = stop.should_stop(step, int(config.log_every_steps))
    return _Due(log=last or step % int(config.log_every_steps) == 0,
                validate=last or step % int(config.eval_every_steps) == 0,
                save=stop_now or mngr.should_save(step), stop=stop_now and not last)


class _NonFinite(Exception):
    """Raised inside the loop; ``train_stage`` finishes the saves in flight, then turns it into
    a ``NonFiniteLossError`` that says what is on disk."""

    def __init__(self, step: int, what: dict):
        super().__init__(step, what)
        self.step, self.what = step, what


def _check_finite(step: int, metrics) -> None:
    bad = non_finite_metrics(jax.device_get(metrics))
    if bad:
        raise _NonFinite(step, bad)


def _non_finite_error(stop: _NonFinite, mngr) -> NonFiniteLossError:
    values = ', '.join(f'{k} = {v}' for k, v in stop.what.items())
    on_disk = intact_checkpoint(mngr)
    restart = ('restart: the run resumes from that checkpoint.' if mngr.latest_step() is not None
               else 'restart: with nothing saved, the stage starts again from its initial weights.')
    return NonFiniteLossError(
        f'non-finite values at step {stop.step}: {values}. Training stopped; {on_disk}. Lower the '
        'learning rate (or set config.grad_clip_norm), check the data (labels in range?) or the '
        f'loss weights, then {restart}')


def train_stage(config, workdir, stop: '_StopFlag | None' = None, *, stage: str | None = None) -> dict:
    """Train one stage into ``workdir``; resume if it has checkpoints. Returns a summary.

    Set-up (state, writers, validation sets, hooks), the loop, then the finish (the one place
    where the saves of a successful stage are awaited and checked on disk); on any error the
    save in flight is finished or cleaned up first. ``stop``: the SIGTERM flag (``run`` installs
    it before anything else, so a signal during start-up is honoured at the first step).
    ``stage``: the name shown in terminal lines.
    """
    workdir = check_workdir_writable(workdir)
    setup = make_setup(config)
    stage = stage or setup.method.name
    mngr = checkpoint.manager(workdir, keep=int(config.keep_checkpoints),
                              **_save_policy(config, setup.total_steps))
    writer = None
    try:
        state, fresh = _starting_state(config, setup, mngr, workdir, stage)
        start, total = int(jax.device_get(state.step)), setup.total_steps
        if start >= total:
            console(f'[{stage}] already trained for {total} steps')
            return {'steps': start, 'workdir': str(workdir), 'preempted': False}
        writer = metric_writers.MultiWriter([
            metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() != 0,
                                                 asynchronous=True),
            _TerminalLine(stage, total)])
        if fresh:
            _log_run_description(config, state, writer)
        outliers = config.batch_size if setup.method.needs_outliers else 0
        console(f'[{stage}] {total - start} steps to go ({setup.steps_per_epoch} per epoch), batch '
                f'{config.batch_size} ID + {outliers} outliers, {jax.device_count()} devices '
                f'({jax.process_count()} processes), {config.parallelism}')
        with (contextlib.nullcontext(stop) if stop is not None else _StopFlag()) as stop:
            final, last_val = _train_loop(config, setup, setup.runner.place(state), mngr, writer,
                                          stop, stage, start)
        return _finish(setup.runner.global_state(final), mngr, writer, workdir, stage,
                       last_val, stopped_early=int(jax.device_get(final.step)) < total)
    except _NonFinite as e:
        _finish_saves_quietly(mngr)
        raise _non_finite_error(e, mngr) from None
    except BaseException:
        _finish_saves_quietly(mngr)
        raise
    finally:
        mngr.close()
        if writer is not None:
            writer.close()


def _starting_state(config, setup: Setup, mngr, workdir, stage: str) -> tuple[Any, bool]:
    """The state to train from: the latest checkpoint (resume), else ``init_from``'s best
    weights (stage 2), else a fresh one. Returns ``(state, fresh)``."""
    resume_step = mngr.latest_step()
    if resume_step is not None:
        _check_resume_identity(workdir, checkpoint.read_config(mngr, resume_step), config)
    # ImageNet weights only for a fresh start: a resume or a fine-tune replaces every weight
    state = initial_state(setup, load_pretrained=resume_step is None and not config.init_from)
    if resume_step is not None:
        state = checkpoint.restore(mngr, state)
        console(f'[{stage}] resumed from {mngr.directory} at step {int(state.step)}')
    elif config.init_from:
        state, from_step = checkpoint.load_variables_from(config.init_from, state,
                                                          expect=_identity(config))
        console(f'[{stage}] starting from {config.init_from} (its best checkpoint, step '
                f'{from_step})')
    return state, resume_step is None


def _log_run_description(config, state, writer) -> None:
    """A fresh run's parameter table (absl log) and its config as TensorBoard hparams."""
    if jax.process_index() != 0:
        return
    parameter_overview.log_parameter_overview(state.params)
    flat = traverse_util.flatten_dict(config_to_dict(config), sep='.')
    writer.write_hparams({k: (str(v) if isinstance(v, (list, tuple, type(None))) else v)
                          for k, v in flat.items()})


def _train_loop(config, setup: Setup, run_state, mngr, writer, stop, stage: str,
                start: int) -> tuple[Any, float | None]:
    """Steps ``start + 1 .. total`` (or up to a stop request); returns the runner's state after
    the last step run and the last validation accuracy. Every save it starts is awaited by the
    caller."""
    runner, total = setup.runner, setup.total_steps
    config_dict = config_to_dict(config)
    val_sets = _validation_sets(config)
    eval_step = make_eval_step(setup.model.apply)
    hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=int(config.log_every_steps),
                                             every_secs=None)]
    if config.get('profile') and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=str(mngr.directory.parent)))
    accumulate = collection = pending = last_val = None
    stream = _batches(config, setup.method, start)
    for step in range(start + 1, total + 1):
        run_state, metrics = runner.step(run_state, next(stream))
        if pending is not None:  # the step before, checked now: no stall on the step in flight
            _check_finite(*pending)
        pending = (step, metrics)
        accumulate = accumulate or make_metric_accumulator(metrics)
        collection = accumulate(collection, metrics)
        for hook in hooks:
            hook(step)
        due = _due(step, total, config, mngr, stop)
        if due.log:
            writer.write_scalars(step, collection_to_scalars(collection))
            collection = None
        if due.save:
            _check_finite(step, metrics)
            state = runner.global_state(run_state)
            if due.validate:
                last_val = val_accuracy(eval_step, state, val_sets, setup.mesh)
                if last_val is not None:
                    writer.write_scalars(step, {'val/id_accuracy': last_val})
            _save(mngr, state, config_dict, step, last_val if due.validate else None,
                  force=due.stop, stage=stage)
        if due.stop:
            break
    return run_state, last_val


def _save(mngr, state, config_dict: dict, step: int, val: float | None, *, force: bool,
          stage: str) -> None:
    """Start the (asynchronous) save of a global state; non-finite parameters are never saved."""
    bad = checkpoint.non_finite_leaves(state.variables)
    if bad:
        raise _NonFinite(step, {f'params {bad[0]}': math.nan})
    if checkpoint.save(mngr, state, config_dict, val_accuracy=val, force=force):
        extra = f', ID validation accuracy {100 * val:.2f}%' if val is not None else ''
        console(f'[{stage}] step {step}: checkpoint save started{extra}')


def _finish(state, mngr, writer, workdir, stage: str, last_val, *, stopped_early: bool) -> dict:
    """Wait for the last save, check that the final step is on disk, say so."""
    mngr.wait_until_finished()  # errors of the last (async) save surface here
    writer.flush()
    final_step = int(jax.device_get(state.step))
    mngr.reload()
    on_disk = mngr.latest_step()
    if on_disk != final_step:
        raise checkpoint.CheckpointError(f'the checkpoint of step {final_step} is not on disk in '
                                         f'{mngr.directory} (latest there: {on_disk}).')
    if stopped_early:
        console(f'[{stage}] stopped at step {final_step} on request; checkpoint step {on_disk} is '
                'on disk. Restart the same command to resume.')
    else:
        console(f'[{stage}] done: {final_step} steps; checkpoints on disk: '
                f'{", ".join(map(str, mngr.all_steps()))} (best: step {checkpoint.best_step(mngr)})')
    return {'steps': final_step, 'workdir': str(workdir), 'preempted': stopped_early,
            'val_accuracy': last_val}


def _finish_saves_quietly(mngr) -> None:
    """On the way out after an error: let a save in flight finish (or fail) so that a step that
    was being written is either complete or cleaned up, never left half-written."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001  the original error is the one to report
        logging.warning('a checkpoint save in flight failed too: %s', e)
    if jax.process_index() == 0:
        try:
            for tmp in mngr.directory.glob('*.orbax-checkpoint-tmp*'):
                tmp.rmtree()
        except OSError:
            pass


def val_accuracy(eval_step, state, val_sets: dict, mesh) -> float | None:
    if 'id_val' not in val_sets:
        return None
    return validation_accuracy(eval_step, state.variables, val_sets['id_val'], mesh)


def _validation_sets(config) -> dict:
    from lmoe_jax import data
    if not any(float(config.data.get(k, 0.0) or 0.0) for k in ('val_fraction',
                                                                  'outlier_val_fraction')):
        return {}
    sets = data.validation_datasets(config.data, batch_size=eval_batch_size(config))
    return {s.name: s for s in sets}


def eval_batch_size(config) -> int:
    """Per-process eval batch, rounded up to a multiple of the local device count."""
    per_process = max(int(config.eval_batch_size) // jax.process_count(), 1)
    n = jax.local_device_count()
    return -(-per_process // n) * n


# --------------------------------------------------------------------------------------------------
# Stages, evaluation, the entry point
# --------------------------------------------------------------------------------------------------

def baseline_stage_config(config) -> ml_collections.ConfigDict:
    """Stage 1 of the MixOE protocol: cross-entropy only (every ``config.loss`` override of the
    stage-2 method dropped), ``baseline_epochs`` epochs."""
    stage = copy.deepcopy(config)
    with stage.unlocked():
        stage.method = 'baseline'
        for key in stage.loss.keys():
            stage.loss[key] = None
        stage.num_epochs = float(config.baseline_epochs)
        stage.num_train_steps = -1
        stage.baseline_epochs = 0.0
        if config.get('baseline_learning_rate') is not None:
            stage.learning_rate = float(config.baseline_learning_rate)
    return stage


def restore_for_evaluation(config, workdir, step: int | None = None) -> tuple[Setup, Any, int]:
    """The best (or ``step``) checkpoint of a run, checked to belong to ``config`` and to be
    finite: ``(setup, state, step)``. What ``evaluate_run`` scores; public for studies that
    score more sets with the same weights."""
    workdir = checkpoint.as_path(workdir)
    setup = make_setup(config)
    state = initial_state(setup, load_pretrained=False)  # the checkpoint replaces every weight
    with checkpoint.reading(workdir) as mngr:
        if mngr.latest_step() is None:
            raise checkpoint.CheckpointError(
                f'no checkpoint in {checkpoint.checkpoint_dir(workdir)}: train first (--mode=train).')
        step = checkpoint.best_step(mngr) if step is None else int(step)
        if step not in mngr.all_steps():
            raise checkpoint.CheckpointError(f'no checkpoint at step {step}; available: '
                                             f'{list(mngr.all_steps())}')
        _check_resume_identity(workdir, checkpoint.read_config(mngr, step), config)
        state = checkpoint.restore(mngr, state, step)
        others = [s for s in mngr.all_steps() if s != step]
    bad = checkpoint.non_finite_leaves(state.variables)
    if bad:
        raise checkpoint.CheckpointError(
            f'checkpoint step {step} of {workdir} holds non-finite values ({len(bad)} arrays, e.g. '
            f'{bad[0]}): its report would be meaningless. Evaluate another step (--step=N; saved: '
            f'{others}) or retrain from an earlier one.')
    return setup, state, step


def evaluate_run(config, workdir, *, step: int | None = None,
                 stop: '_StopFlag | None' = None) -> dict:
    """Evaluate the best (or ``step``) checkpoint of a run; process 0 writes the report into
    the workdir, every process returns the metrics. SIGTERM interrupts it (nothing written)."""
    from lmoe_jax import data, evaluate
    from lmoe_jax.ood import report, scores as ood_scores
    workdir = checkpoint.as_path(workdir)
    setup, state, step = restore_for_evaluation(config, workdir, step)
    console(f'[eval] {workdir} at step {step}')
    batch = eval_batch_size(config)
    eval_sets = [_announced(s) for s in data.eval_datasets(config.data, batch_size=batch)]
    fit_sets = {'train': data.id_train_eval_dataset(config.data, batch_size=batch)}
    val = [s for s in _validation_sets(config).values() if s.name == 'id_val']
    if val:
        fit_sets['val'] = val[0]
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_main)
    score_names = tuple(config.scores)
    interrupting = stop.interrupting() if stop is not None else contextlib.nullcontext()
    try:
        with interrupting:
            results = evaluate.evaluate(
                apply_fn=setup.model.apply, variables=state.variables, eval_sets=eval_sets,
                fit_sets=fit_sets, workdir=str(workdir), scores=score_names, writer=writer,
                step=step, batch_sharding=parallel.data_sharded(setup.mesh),
                seed=int(config.seed), score_config=evaluate.ScoreConfig(
                    odin_input_std=ood_scores.normalization_std_from_config(config.data)))
    finally:
        writer.close()
    console(f'\nOOD report of {workdir} (step {step}, method {config.method}):')
    console(report.format_msp_table(results))
    console(f'All scores: {workdir / "ood_report.md"}')
    return results


def _announced(eval_set):
    """The same set, printing one line when its last batch has been scored."""
    def batches():
        t0 = time.perf_counter()
        yield from eval_set.batches()
        console(f'[eval] {eval_set.name}: {eval_set.num_examples} images ({eval_set.kind}) in '
                f'{_duration(time.perf_counter() - t0)}')
    return eval_set._replace(batches=batches)


def prepare_datasets(data_config) -> None:
    """Prepare (or check) every dataset of the config on process 0 while the others wait: TFDS
    preparation writes into the shared data_dir, and two processes preparing at once collide."""
    from lmoe_jax.data import prepare  # the code of `python -m lmoe_jax.data.prepare`
    if jax.process_index() == 0:
        prepare.raise_if_missing(prepare.prepare_all(data_config))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices('lmoe_jax: datasets prepared')


def run(config, workdir, mode: str = 'train_and_eval', *, eval_step: int | None = None,
        started: float | None = None):
    """The whole program: optional baseline stage, the method's stage, then the evaluation.

    Ends with the wall time of each phase (start-up, each stage, evaluation); ``started``: the
    ``time.perf_counter()`` of the program's start (``main.py`` passes it: imports count as
    start-up), else the start-up is counted from this call.
    """
    phases = _Phases(started)
    validate_config(config, mode=mode)
    prepare_datasets(config.data)
    enable_compilation_cache(config, workdir)
    with _StopFlag() as stop:
        summary = _run_stages(config, checkpoint.as_path(workdir), mode, stop, eval_step, phases)
    console(phases.line())
    return summary


class _Phases:
    """Wall time per phase, for the run's last line: ``done in 7m02s (start-up 21s, ...)``."""

    def __init__(self, started: float | None = None):
        self.t0 = time.perf_counter() if started is None else started
        self.mark, self.times = self.t0, []
        self.current = 'start-up'

    def next(self, name: str) -> None:
        now = time.perf_counter()
        self.times.append((self.current, now - self.mark))
        self.current, self.mark = name, now

    def line(self) -> str:
        self.next('')
        parts = ', '.join(f'{name} {_duration(t)}' for name, t in self.times)
        return f'done in {_duration(time.perf_counter() - self.t0)} ({parts})'


def _run_stages(config, workdir: epath.Path, mode: str, stop: _StopFlag,
                eval_step: int | None, phases: _Phases) -> dict:
    summary = {}
    if mode in ('train', 'train_and_eval'):
        if float(config.get('baseline_epochs', 0) or 0) > 0 and not config.init_from:
            base_dir = workdir / 'baseline'
            console(f'stage 1: baseline (cross-entropy only) for {config.baseline_epochs} epochs '
                    f'in {base_dir}')
            phases.next('stage 1')
            summary['baseline'] = train_stage(baseline_stage_config(config), base_dir, stop,
                                              stage='baseline')
            if summary['baseline'].get('preempted'):
                return summary
            config = copy.deepcopy(config)
            with config.unlocked():
                config.init_from = str(base_dir)
            console(f'stage 2: {config.method} fine-tuned from the best baseline checkpoint')
            phases.next('stage 2')
        else:
            phases.next('training')
        summary['train'] = train_stage(config, workdir, stop)
        if summary['train'].get('preempted'):
            return summary
    if mode in ('eval', 'train_and_eval'):
        phases.next('evaluation')
        try:
            summary['eval'] = evaluate_run(config, workdir, step=eval_step, stop=stop)
        except EvaluationInterrupted:
            console('[eval] stopped on request before the report was written; restart the same '
                    'command to redo the evaluation.')
            summary['preempted'] = True
    return summary
