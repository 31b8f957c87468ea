"""The training program: config -> data -> compiled step -> CLU logs / Orbax checkpoints -> report.

``run(config, workdir, mode)`` is what ``main.py`` calls. A run resumes from its latest complete
checkpoint automatically (same step, learning rate, data position and rng, so a killed and
restarted run ends bit-identical to an uninterrupted one on CPU); SIGTERM saves and exits
cleanly; a non-finite loss stops the run before anything non-finite is saved.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, metrics as clu_metrics, parameter_overview, periodic_actions

from lmoe_jax import checkpoint, losses, parallel, train
from lmoe_jax.models import create_model

MODES = ('train', 'eval', 'train_and_eval')
PARALLELISMS = ('jit', 'pmap')


class ConfigError(ValueError):
    """A config value that cannot work; the message says which and what to set."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; the last good checkpoint is left intact."""


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
    if int(config.get('baseline_epochs', 0)) < 0:
        raise ConfigError(f'config.baseline_epochs={config.baseline_epochs} must be >= 0.')
    if config.init_from and not os.path.isdir(checkpoint.checkpoint_dir(config.init_from)):
        raise ConfigError(f'config.init_from={config.init_from!r} has no checkpoints/ folder; '
                          'point it to the workdir of a finished run (e.g. the baseline stage).')
    for name in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                 'keep_checkpoints', 'eval_batch_size'):
        if int(config[name]) <= 0:
            raise ConfigError(f'config.{name}={config[name]} must be > 0.')


def config_to_dict(config) -> dict:
    """JSON-safe copy (tuples become lists) stored beside every checkpoint."""
    return json.loads(json.dumps(config.to_dict(), default=list))


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(d)


def _identity(config) -> dict:
    """What a checkpoint used by init_from must share with this run."""
    return {'model.name': config.model.name, 'model.width': config.model.width,
            'data.dataset': config.data.dataset, 'data.num_id_classes': config.data.num_id_classes,
            'data.split': config.data.split,
            'data.id_classes': (list(config.data.id_classes) if config.data.id_classes is not None
                                else None)}


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


def enable_compilation_cache(config, workdir: str) -> None:
    cache = config.get('compilation_cache_dir')
    if cache == '':
        return
    cache = cache or os.path.join(os.path.abspath(workdir), 'jax_cache')
    jax.config.update('jax_compilation_cache_dir', cache)
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
        total = max(int(round(float(config.num_epochs) * steps_per_epoch)), 1)
    bn_axis = parallel.PMAP_AXIS if config.parallelism == 'pmap' else None
    model = create_model(config.model, info.num_id_classes, bn_axis_name=bn_axis)
    return Setup(config=config, mesh=parallel.make_mesh(), model=model, info=info,
                 method=method_from_config(config), total_steps=total,
                 steps_per_epoch=steps_per_epoch)


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


def collection_to_scalars(collection) -> dict[str, float]:
    return {f'train/{k.replace("__", "/")}': float(v) for k, v in collection.compute().items()}


EvalMetrics = clu_metrics.Collection.create(accuracy=clu_metrics.Average.from_output('correct'))


def make_eval_step(apply_fn, mesh):
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
    """Set by SIGTERM (TPU preemption): the loop saves and exits cleanly at the next step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            del frame
            logging.warning('signal %d received: saving a checkpoint and stopping', signum)
            self.requested = True
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int, sync_every: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % sync_every:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


def check_finite(metrics_host: dict, step: int, mngr) -> None:
    bad = sorted(k for k, v in metrics_host.items()
                 if k.startswith('loss/') and not np.isfinite(v))
    if bad:
        last = mngr.latest_step()
        raise NonFiniteLossError(
            f'non-finite loss at step {step}: {", ".join(bad)} = '
            f'{", ".join(str(metrics_host[k]) for k in bad)}. Training stopped; the last good '
            f'checkpoint ({"step " + str(last) if last is not None else "none yet"}) is intact. '
            'Lower the learning rate, check the data (labels in range?) or the loss weights.')


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def _batches(config, start_step: int) -> Iterator[dict]:
    from lmoe_jax import data
    per_process = int(config.batch_size) // jax.process_count()
    return iter(data.train_stream(config.data, batch_size=per_process, seed=int(config.seed),
                                  start_step=start_step))


def train_stage(config, workdir: str, stop: '_StopFlag | None' = None) -> dict:
    """Train one stage into ``workdir``; resume if it has checkpoints. Returns a summary.

    ``stop``: the SIGTERM flag (``run`` installs it before anything else, so a signal during
    start-up is honoured at the first step).
    """
    os.makedirs(workdir, exist_ok=True)
    setup = make_setup(config)
    mesh, method = setup.mesh, setup.method
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                  asynchronous=True)
    mngr = checkpoint.manager(workdir, keep=int(config.keep_checkpoints))
    config_dict = config_to_dict(config)
    state = initial_state(setup)
    resumed = mngr.latest_step() is not None
    if resumed:
        state = checkpoint.restore(mngr, state)
        logging.info('resumed from %s at step %d', mngr.directory, int(state.step))
    elif config.init_from:
        state = checkpoint.load_variables_from(config.init_from, state, expect=_identity(config))
        logging.info('initialised params and batch stats from %s', config.init_from)
    start = int(jax.device_get(state.step))
    total = setup.total_steps
    if start >= total:
        logging.info('%s: already trained for %d steps', workdir, total)
        mngr.close()
        writer.close()
        return {'steps': start, 'workdir': workdir}

    if is_main and not resumed:
        parameter_overview.log_parameter_overview(state.params)
        writer.write_hparams({k: (str(v) if isinstance(v, (list, tuple, type(None))) else v)
                              for k, v in _flatten(config_dict).items()})
    logging.info('method %s: %d steps (%d per epoch), batch %d ID + %d outliers, %d devices, %s',
                 method.name, total, setup.steps_per_epoch, config.batch_size,
                 config.batch_size if method.needs_ood or method.needs_mix else 0,
                 jax.device_count(), config.parallelism)

    val_sets = _validation_sets(config)
    eval_step = make_eval_step(setup.model.apply, mesh)
    # one key for every step (train_step folds in the step): pmap takes it from the host,
    # jit as a replicated global array
    step_key = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
    use_pmap = config.parallelism == 'pmap'
    if use_pmap:
        step_fn = parallel.pmap_train_step(method)
        run_state = parallel.stack_for_pmap(state)
        rng = step_key
    else:
        step_fn = parallel.jit_train_step(method, mesh)
        run_state = state
        rng = parallel.replicate(step_key, mesh)

    def global_state():
        return parallel.unreplicate(run_state, mesh) if use_pmap else run_state

    def val_accuracy():
        if 'id_val' not in val_sets:
            return None
        return validation_accuracy(eval_step, global_state().variables, val_sets['id_val'], mesh)

    hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=int(config.log_every_steps))]
    if config.get('profile') and is_main:
        hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=workdir))
    collection, collection_cls = None, None
    stream = _batches(config, start)
    pending = None  # (step, metrics) of the step before: checked one step late, no stall
    last_val = None
    stopped_early = False
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(_StopFlag())
        for step in range(start + 1, total + 1):
            local = next(stream)
            if use_pmap:
                run_state, metrics = step_fn(run_state, parallel.shard_for_pmap(local), rng)
                metrics = parallel.metrics_from_pmap(metrics)
            else:
                run_state, metrics = step_fn(run_state, parallel.global_batch(local, mesh), rng)
            if pending is not None:
                check_finite(jax.device_get(pending[1]), pending[0], mngr)
            pending = (step, metrics)
            collection_cls = collection_cls or make_train_collection(metrics)
            update = collection_cls.single_from_model_output(
                **{_metric_field(k): v for k, v in metrics.items()})
            collection = update if collection is None else collection.merge(update)
            for hook in hooks:
                hook(step)
            if step % int(config.log_every_steps) == 0 or step == total:
                writer.write_scalars(step, collection_to_scalars(collection))
                collection = None
            is_last = step == total
            want_eval = step % int(config.eval_every_steps) == 0 or is_last
            want_save = step % int(config.checkpoint_every_steps) == 0 or is_last or want_eval
            preempted = stop.should_stop(step, int(config.log_every_steps))
            if want_save or preempted:
                check_finite(jax.device_get(metrics), step, mngr)
                if want_eval:
                    last_val = val_accuracy()
                    if last_val is not None:
                        writer.write_scalars(step, {'val/id_accuracy': last_val})
                checkpoint.save(mngr, global_state(), config_dict,
                                val_accuracy=last_val if want_eval else None,
                                force=is_last or preempted)
            if preempted and not is_last:
                logging.warning('stopped at step %d on request; restart to resume', step)
                stopped_early = True
                break
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()
    writer.close()
    final_step = int(jax.device_get(global_state().step))
    return {'steps': final_step, 'workdir': workdir, 'preempted': stopped_early,
            'val_accuracy': last_val}


def _validation_sets(config) -> dict:
    from lmoe_jax import data
    if not float(config.data.get('val_fraction', 0.0) or 0.0):
        return {}
    sets = data.validation_datasets(config.data, batch_size=_eval_batch(config))
    return {s.name: s for s in sets}


def _eval_batch(config) -> int:
    """Per-process eval batch, rounded up to a multiple of the local device count."""
    per_process = max(int(config.eval_batch_size) // jax.process_count(), 1)
    n = jax.local_device_count()
    return -(-per_process // n) * n


def _flatten(d: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


# --------------------------------------------------------------------------------------------------
# Stages, evaluation, the entry point
# --------------------------------------------------------------------------------------------------

def baseline_stage_config(config) -> ml_collections.ConfigDict:
    """Stage 1 of the MixOE protocol: cross-entropy only, ``baseline_epochs`` epochs."""
    stage = copy.deepcopy(config)
    with stage.unlocked():
        stage.method = 'baseline'
        stage.num_epochs = int(config.baseline_epochs)
        stage.num_train_steps = -1
        stage.baseline_epochs = 0
        if config.get('baseline_learning_rate') is not None:
            stage.learning_rate = float(config.baseline_learning_rate)
    return stage


def evaluate_run(config, workdir: str, *, step: int | None = None) -> dict:
    """Evaluate the best (or ``step``) checkpoint of a run; writes the report into the workdir."""
    from lmoe_jax import data, evaluate
    from lmoe_jax.ood import report
    setup = make_setup(config)
    state = initial_state(setup, load_pretrained=False)  # the checkpoint replaces every weight
    mngr = checkpoint.manager(workdir, read_only=True, async_save=False)
    if mngr.latest_step() is None:
        raise checkpoint.CheckpointError(
            f'no checkpoint in {checkpoint.checkpoint_dir(workdir)}: train first (--mode=train).')
    step = checkpoint.best_step(mngr) if step is None else int(step)
    if step not in mngr.all_steps():
        raise checkpoint.CheckpointError(f'no checkpoint at step {step}; available: '
                                         f'{list(mngr.all_steps())}')
    state = checkpoint.restore(mngr, state, step)
    logging.info('evaluating %s at step %d', workdir, step)
    batch = _eval_batch(config)
    eval_sets = data.eval_datasets(config.data, batch_size=batch)
    fit_sets = {'train': data.id_train_eval_dataset(config.data, batch_size=batch)}
    val = [s for s in _validation_sets(config).values() if s.name == 'id_val']
    if val:
        fit_sets['val'] = val[0]
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    score_names = tuple(config.scores)
    results = evaluate.evaluate(
        apply_fn=setup.model.apply, variables=state.variables, eval_sets=eval_sets,
        fit_sets=fit_sets, workdir=workdir, scores=score_names, writer=writer, step=step,
        batch_sharding=parallel.data_sharded(setup.mesh), seed=int(config.seed))
    writer.close()
    if is_main:
        print(f'\nOOD report of {workdir} (step {step}, method {config.method}):')
        print(report.format_msp_table(results))
        print(f'All scores: {os.path.join(workdir, "ood_report.md")}')
    return results


def run(config, workdir: str, mode: str = 'train_and_eval', *, eval_step: int | None = None):
    """The whole program: optional baseline stage, the method's stage, then the evaluation."""
    validate_config(config, mode=mode)
    enable_compilation_cache(config, workdir)
    t0 = time.time()
    with _StopFlag() as stop:
        summary = _run_stages(config, workdir, mode, stop, eval_step)
    logging.info('done in %.1f s', time.time() - t0)
    return summary


def _run_stages(config, workdir: str, mode: str, stop: _StopFlag, eval_step: int | None) -> dict:
    summary = {}
    if mode in ('train', 'train_and_eval'):
        if int(config.get('baseline_epochs', 0) or 0) > 0 and not config.init_from:
            base_dir = os.path.join(workdir, 'baseline')
            logging.info('stage 1: baseline (cross-entropy) for %d epochs in %s',
                         config.baseline_epochs, base_dir)
            summary['baseline'] = train_stage(baseline_stage_config(config), base_dir, stop)
            if summary['baseline'].get('preempted'):
                return summary
            config = copy.deepcopy(config)
            with config.unlocked():
                config.init_from = base_dir
            logging.info('stage 2: %s fine-tuned from the baseline', config.method)
        summary['train'] = train_stage(config, workdir, stop)
        if summary['train'].get('preempted'):
            return summary
    if mode in ('eval', 'train_and_eval'):
        summary['eval'] = evaluate_run(config, workdir, step=eval_step)
    return summary
