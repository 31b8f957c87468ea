"""OOD evaluation of a classifier over an ID test set, fine-grained OOD and coarse OOD sets.

One path, each step a plain function: model -> outputs (:func:`make_forward`,
:func:`model_outputs`: logits, features, ODIN) -> scores (:func:`score_outputs`) -> metrics
(:func:`build_metrics`) -> report (``lmoe_jax.ood.report``). Two entries use it:

* :func:`evaluate` — what a training run ends with (``main.py --mode=eval``).
* :func:`ood_metrics` — for notebooks: from logits (and features) in hand, or from a model and
  numpy arrays or tf.data datasets.

Returned metrics dict (fractions in [0, 1]; JSON-serialisable)::

    {'id_set': str, 'id_accuracy': float | None,
     'kinds': {set: 'id' | 'fine_ood' | 'coarse_ood' | 'ood'}, 'num_images': {set: int},
     'scores': {score: {ood_set | 'fine_mean' | 'coarse_mean' | 'ood_mean': {metric: value}}},
     'config': {...}}

Metric keys: ``openood_auroc``, ``openood_fpr95``, ``openood_aupr_in``, ``openood_aupr_out``
(OpenOOD v1.5, OOD positive) and ``mixoe_tnr95``, ``mixoe_auroc``, ``mixoe_aupr_in`` with
``*_std`` (MixOE's evaluation, ID positive, 10 subsamples); see ``lmoe_jax.ood.metrics``.

Multi-host: every process feeds its own part of each batch (the eval sets give every process as
many padded, masked batches); outputs come back replicated, so every process computes the same
metrics, and only process 0 writes files and metric-writer output.
"""
import dataclasses
import functools
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
from clu import periodic_actions
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from lmoe_jax import parallel
from lmoe_jax.ood import fitting
from lmoe_jax.ood import metrics as metrics_lib
from lmoe_jax.ood import report as report_lib
from lmoe_jax.ood import scores as scores_lib
from lmoe_jax.ood import sources

DEFAULT_SCORES = scores_lib.ALL_SCORES
EvalSet = sources.EvalSet
format_table = report_lib.format_table
format_msp_table = report_lib.format_msp_table
Outputs = Dict[str, Optional[np.ndarray]]  # 'logits' [N, K], 'features' [N, D], 'odin' [N], 'label' [N]


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Hyper-parameters of the scores; defaults are OpenOOD v1.5's.

    ``odin_input_std``: how the model's inputs were normalised, needed by ODIN: 'imagenet',
    'none' (see ``scores.normalization_std``) or one std per channel.
    """
    energy_temperature: float = 1.0
    odin_temperature: float = 1000.0
    odin_epsilon: float = 0.0014
    odin_input_std: Union[None, str, Tuple[float, ...]] = None
    gen_gamma: float = 0.1
    gen_top_m: int = 100
    vim_dim: Optional[int] = None  # None: D // 8 (256 for 2048-d features)
    react_percentile: float = 90.0
    react_temperature: float = 1.0
    react_sample_size: int = 4_000_000  # activation values kept to estimate the percentile

    def __post_init__(self):  # hashable (a static argument of jit): per-channel stds as a tuple
        if self.odin_input_std is not None and not isinstance(self.odin_input_std, str):
            object.__setattr__(self, 'odin_input_std', tuple(float(s) for s in self.odin_input_std))


def _check_scores(scores: Sequence[str], config: ScoreConfig) -> Tuple[str, ...]:
    scores = tuple(scores)
    unknown = [s for s in scores if s not in scores_lib.ALL_SCORES]
    if unknown or not scores or len(set(scores)) != len(scores):
        raise ValueError(f'unknown, repeated or no scores {list(scores)}; '
                         f'choose from {list(scores_lib.ALL_SCORES)}.')
    if 'odin' in scores and config.odin_input_std is None:
        raise ValueError("ODIN steps in pixel units, so it needs how inputs were normalised: set "
                         "odin_input_std ('imagenet', 'none' or per-channel stds; a run's is "
                         'scores.normalization_std_from_config(config.data)), or drop odin.')
    return scores


# ----------------------------------------------------------------------------- model -> outputs


def make_forward(apply_fn: Callable, *, features: bool, odin: Optional[ScoreConfig] = None,
                 sharding: Optional[NamedSharding] = None) -> Callable:
    """jitted ``(variables, {'image', 'label', 'mask'}) -> {'logits', 'features'?, 'odin'?,
    'label', 'mask'}``; with ``sharding`` (batch along ``data``) the outputs come back replicated."""
    def forward(variables, batch):
        images = batch['image']
        if features:
            logits, feats = apply_fn(variables, images, train=False, return_features=True)
        else:
            logits, feats = apply_fn(variables, images, train=False), None
        out = {'logits': jnp.asarray(logits, jnp.float32), 'label': batch['label'], 'mask': batch['mask']}
        if feats is not None:
            out['features'] = jnp.asarray(feats, jnp.float32)
        if odin is not None:
            std = odin.odin_input_std
            std = scores_lib.normalization_std(std, images.shape[-1]) if isinstance(std, str) else std
            out['odin'] = scores_lib.odin(lambda x: apply_fn(variables, x, train=False), images,
                                          odin.odin_temperature, odin.odin_epsilon, input_std=std)
        return out
    return jax.jit(forward, out_shardings=None if sharding is None else NamedSharding(sharding.mesh, P()))


def _default_sharding(sharding: Optional[NamedSharding]) -> Optional[NamedSharding]:
    """The batch sharding to use: the given one; with several processes, the trainer's (all
    devices along 'data', each process feeding its own part)."""
    if sharding is None and jax.process_count() > 1:
        return parallel.data_sharded(parallel.make_mesh())
    return sharding


def model_outputs(forward: Callable, variables: Any, source: sources.BatchSource, *, sharding=None,
                  max_batches: Optional[int] = None, total_batches: Optional[int] = None,
                  what: str = 'eval', log_every_s: float = 10.0) -> Iterator[Outputs]:
    """Host outputs of each batch, real rows only: this process's part of every batch when
    ``sharding`` spans processes, gathered so that every process yields the same rows."""
    progress = periodic_actions.ReportProgress(num_train_steps=total_batches, every_secs=log_every_s)
    start, count = time.perf_counter(), 0
    for i, (batch, mask) in enumerate(sources.iterate_real_rows(source, max_batches)):
        label = batch.get('label', np.full(len(mask), -1, np.int32))
        host = {'image': np.asarray(batch['image'], np.float32), 'mask': mask,
                'label': np.asarray(label, np.int32)}
        if sharding is not None:
            host = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}
        out = jax.device_get(forward(variables, host))
        keep = np.asarray(out.pop('mask'), bool)
        count += int(keep.sum())
        progress(i + 1)
        yield {k: np.asarray(v)[keep] for k, v in out.items()}
    logging.info('%s: %d images in %.1fs', what, count, time.perf_counter() - start)


def concat_outputs(batches: Iterator[Outputs], what: str) -> Outputs:
    batches = list(batches)
    if not batches or not sum(len(b['logits']) for b in batches):
        raise ValueError(f'{what}: the set yielded no real (unmasked) images; check its data source.')
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ----------------------------------------------------------------------------- outputs -> scores


def compute_scores(logits, features, stats: Mapping[str, Mapping[str, Any]], scores: Sequence[str],
                   config: ScoreConfig) -> Dict[str, jax.Array]:
    """Every requested score but ODIN (computed with the model) of one batch; pure, jittable."""
    fns = {'msp': lambda: scores_lib.msp(logits),
           'max_logit': lambda: scores_lib.max_logit(logits),
           'energy': lambda: scores_lib.energy(logits, config.energy_temperature),
           'gen': lambda: scores_lib.gen(logits, config.gen_gamma, config.gen_top_m),
           'kl_matching': lambda: scores_lib.kl_matching(logits, **stats['kl_matching']),
           'mahalanobis': lambda: scores_lib.mahalanobis(features, **stats['mahalanobis']),
           'vim': lambda: scores_lib.vim(logits, features, **stats['vim']),
           'react': lambda: scores_lib.react(features, **stats['react'],
                                             temperature=config.react_temperature)}
    return {name: fns[name]() for name in scores if name != 'odin'}


@functools.partial(jax.jit, static_argnames=('scores', 'config'))
def _scores_jit(logits, features, stats, scores, config):
    return compute_scores(logits, features, stats, scores, config)


def score_outputs(outputs: Outputs, stats, scores: Sequence[str], config: ScoreConfig,
                  chunk: int = 1024) -> Dict[str, np.ndarray]:
    """{score: float64 [N]} of a set's outputs, in padded chunks of one shape (one compilation)."""
    n = len(outputs['logits'])
    size = min(chunk, n)
    pad = lambda x, i: None if x is None else sources.pad_rows(x[i:i + size], size)  # noqa: E731
    parts = [jax.device_get(_scores_jit(pad(outputs['logits'], i), pad(outputs.get('features'), i), stats,
                                        tuple(scores), config)) for i in range(0, n, size)]
    out = {s: np.concatenate([p[s] for p in parts])[:n] for s in parts[0]}
    if 'odin' in scores:
        out['odin'] = outputs['odin']
    return {s: np.asarray(out[s], np.float64) for s in scores}


# ----------------------------------------------------------------------------- scores -> metrics -> report


def _mean_rows(rows: Dict[str, Dict[str, float]], kinds: Mapping[str, str]) -> Dict[str, Dict[str, float]]:
    means = {}
    for kind, row_name in report_lib.MEAN_ROWS.items():
        members = [rows[n] for n, k in kinds.items() if k == kind and n in rows]
        if members:
            means[row_name] = {key: float(np.mean([m[key] for m in members])) for key in members[0]}
    return means


def build_metrics(set_scores: Mapping[str, Mapping[str, np.ndarray]], kinds: Mapping[str, str],
                  id_name: str, id_accuracy: Optional[float], *, num_subsamples: int = 10, seed: int = 0,
                  config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The metrics dict from per-set score arrays (host, float64)."""
    result = {'id_set': id_name, 'id_accuracy': id_accuracy, 'kinds': dict(kinds),
              'num_images': {n: int(len(next(iter(s.values())))) for n, s in set_scores.items()},
              'scores': {}, 'config': {'num_subsamples': num_subsamples, 'seed': seed, **(config or {})}}
    for score in report_lib.ordered_scores(list(set_scores[id_name])):
        rows = {}
        for name, values in set_scores.items():
            if name == id_name:
                continue
            try:
                rows[name] = metrics_lib.all_metrics(set_scores[id_name][score], values[score],
                                                     num_subsamples, seed)
            except ValueError as err:
                raise ValueError(f"score '{score}', sets '{id_name}' vs '{name}': {err}") from None
        rows.update(_mean_rows(rows, kinds))
        result['scores'][score] = rows
    return result


def _report_config(scores, score_config: ScoreConfig, stats) -> Dict[str, Any]:
    config = {'scores': list(scores), **dataclasses.asdict(score_config)}
    if isinstance(config['odin_input_std'], tuple):
        config['odin_input_std'] = [float(s) for s in config['odin_input_std']]
    if 'vim' in stats:
        config['vim_alpha'] = float(stats['vim']['alpha'])
        config['vim_dim'] = int(stats['vim']['origin'].shape[0] - stats['vim']['null_space'].shape[1])
    if 'react' in stats:
        config['react_threshold'] = float(stats['react']['threshold'])
    return config


def fit_statistics(scores, config: ScoreConfig, fc_params, train, val, seed: int = 0):
    """What the fitted scores need, from streams of outputs (see ``lmoe_jax.ood.fitting``)."""
    return fitting.fit_score_statistics(
        train, scores=scores, fc_params=fc_params, val_stream=val, vim_dim=config.vim_dim,
        react_percentile=config.react_percentile, react_sample_size=config.react_sample_size, seed=seed)


def _metrics_and_report(set_outputs: Mapping[str, Outputs], kinds: Mapping[str, str], id_name: str, stats,
                        scores, config: ScoreConfig, *, num_subsamples, seed, workdir, writer, step, plots):
    """Outputs -> scores -> metrics, and the report from process 0 only."""
    set_scores = {name: score_outputs(out, stats, scores, config) for name, out in set_outputs.items()}
    labels = set_outputs[id_name].get('label')
    labelled = labels is not None and bool(np.all(labels >= 0))  # -1: no label given
    accuracy = metrics_lib.top1_accuracy(set_outputs[id_name]['logits'], labels) if labelled else None
    metrics = build_metrics(set_scores, kinds, id_name, accuracy, num_subsamples=num_subsamples, seed=seed,
                            config=_report_config(scores, config, stats))
    if jax.process_index() == 0:
        if workdir is not None:
            report_lib.write_report(workdir, metrics, set_scores, writer=writer, step=step, plots=plots)
        elif writer is not None:
            report_lib.send_to_writer(writer, metrics, {}, step)
    return metrics


# ----------------------------------------------------------------------------- evaluate()


def _check_eval_sets(eval_sets) -> Tuple[str, Dict[str, str]]:
    for s in eval_sets:
        if not sources.is_eval_set(s):
            raise ValueError(f'eval_sets must hold objects with name, kind and batches; '
                             f'got {type(s).__name__}.')
        if s.kind not in sources.KINDS:
            raise ValueError(f"eval set '{s.name}' has kind {s.kind!r}; use one of {sources.KINDS}.")
    names = [s.name for s in eval_sets]
    if len(set(names)) != len(names):
        raise ValueError(f'eval set names must be unique; got {names}.')
    ids = [s.name for s in eval_sets if s.kind == 'id']
    if len(ids) != 1 or len(eval_sets) < 2:
        raise ValueError(f"evaluation needs exactly one 'id' set and at least one OOD set; got kinds "
                         f'{[(s.name, s.kind) for s in eval_sets]}.')
    return ids[0], {s.name: s.kind for s in eval_sets}


def _fit_sources(fit_sets) -> Tuple[Optional[sources.BatchSource], Optional[sources.BatchSource]]:
    if fit_sets is None:
        return None, None
    if isinstance(fit_sets, Mapping) and ('train' in fit_sets or 'val' in fit_sets):
        return tuple(None if fit_sets.get(k) is None else sources.as_batch_source(fit_sets[k])
                     for k in ('train', 'val'))
    return sources.as_batch_source(fit_sets), None


def _resolve_fc(fc_params, variables, scores):
    if not any(s in ('vim', 'react') for s in scores) or fc_params is not None:
        return fc_params
    try:
        fc = variables['params']['fc']
        return {'kernel': fc['kernel'], 'bias': fc['bias']}
    except (KeyError, TypeError):
        raise ValueError("ViM and ReAct need the final Dense layer: pass fc_params=(kernel, bias) "
                         "(the model has no variables['params']['fc']), or drop those scores.") from None


def evaluate(*, apply_fn: Callable, variables: Any, eval_sets: Sequence[Any], fit_sets: Any = None,
             workdir: Optional[str] = None, scores: Sequence[str] = DEFAULT_SCORES, writer: Any = None,
             step: int = 0, fc_params: Any = None, score_config: ScoreConfig = ScoreConfig(),
             num_subsamples: int = 10, seed: int = 0, plots: bool = True,
             max_fit_batches: Optional[int] = None, batch_sharding: Any = None,
             log_every_s: float = 10.0) -> Dict[str, Any]:
    """Evaluate OOD detection of ``apply_fn(variables, x, train=False)`` and write the report.

    Args:
      apply_fn, variables: the model; ``return_features=True`` must give (logits, features)
        when Mahalanobis, ViM or ReAct is scored.
      eval_sets: objects with ``name``, ``kind`` ('id' once; 'fine_ood', 'coarse_ood' or 'ood')
        and ``batches()`` -> iterator of {'image', 'label', 'mask'} (see ``lmoe_jax.ood.sources``);
        an optional ``num_batches`` feeds the progress log.
      fit_sets: ID data for the fitted scores: ``{'train': ..., 'val': ...}`` (train with labels
        for Mahalanobis/ViM/ReAct, val for KL-matching, defaulting to train) or one source for
        both. Each entry may be anything ``as_batch_source`` reads. Needed only for those scores.
      workdir: where process 0 writes ood_report.{json,md,csv}, ood_scores.npz, ood_plots/*.png.
      scores: names from ``lmoe_jax.ood.scores.ALL_SCORES``; MSP leads every table.
      writer: optional CLU metric writer (process 0 only): scalars ``ood/<score>/<set>/<metric>``,
        plot images and the MSP table as text, at ``step``.
      fc_params: (kernel [D, K], bias [K]) of the final layer for ViM/ReAct; defaults to
        ``variables['params']['fc']``.
      score_config: score hyper-parameters; ``odin_input_std`` is required with ODIN.
      num_subsamples, seed: the MixOE protocol's subsampling.
      plots: write PNGs (and send them to the writer).
      max_fit_batches: cap on the fit-data batches read (None: all).
      batch_sharding: ``NamedSharding(mesh, P('data'))`` to spread each batch over the devices;
        with several processes it defaults to all devices, each process feeding its own part.
      log_every_s: period of the progress log lines.

    Returns:
      The metrics dict described in this module's docstring (the same on every process).
    """
    scores = _check_scores(scores, score_config)
    id_name, kinds = _check_eval_sets(list(eval_sets))
    fc_params = _resolve_fc(fc_params, variables, scores)
    train, val = _fit_sources(fit_sets)
    fitted = [s for s in scores if s in scores_lib.FITTED_SCORES]
    if fitted and train is None and val is None:
        raise ValueError(f'scores {fitted} are fitted on ID data: pass fit_sets={{"train": ..., "val": ...}} '
                         '(ID training images with labels), or leave them out of scores.')
    sharding = _default_sharding(batch_sharding)
    with_features = any(s in scores_lib.FEATURE_SCORES for s in scores)
    run = functools.partial(model_outputs, variables=variables, sharding=sharding, log_every_s=log_every_s)
    stats = {}
    if fitted:
        fit_forward = make_forward(apply_fn, features=with_features, sharding=sharding)
        stream = lambda src, what: None if src is None else (  # noqa: E731
            lambda: run(fit_forward, source=src, max_batches=max_fit_batches, what=what))
        stats = fit_statistics(scores, score_config, fc_params, stream(train, 'fit[train]'),
                               stream(val, 'fit[val]'), seed)
    forward = make_forward(apply_fn, features=with_features, sharding=sharding,
                           odin=score_config if 'odin' in scores else None)
    set_outputs = {s.name: concat_outputs(run(forward, source=s.batches, what=f'eval[{s.name}]',
                                              total_batches=getattr(s, 'num_batches', None)), s.name)
                   for s in eval_sets}
    return _metrics_and_report(set_outputs, kinds, id_name, stats, scores, score_config,
                               num_subsamples=num_subsamples, seed=seed, workdir=workdir, writer=writer,
                               step=step, plots=plots)


# ----------------------------------------------------------------------------- ood_metrics()


def _outputs(data, name: str) -> Outputs:
    """Precomputed model outputs: logits [N, K], or (logits, labels), or a dict with 'logits'
    and optionally 'features' [N, D] and 'label' [N]."""
    if isinstance(data, Mapping):
        if 'logits' not in data:
            raise ValueError(f"'{name}': without apply_fn, pass logits [N, K] or a dict with 'logits' "
                             f"(and optionally 'features', 'label'); got keys {sorted(data)}.")
        logits, feats, labels = data['logits'], data.get('features'), data.get('label')
    elif isinstance(data, tuple) and len(data) == 2:
        (logits, labels), feats = data, None
    else:
        logits, feats, labels = data, None, None
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"'{name}': logits must be a non-empty [N, K] array; got shape {logits.shape}.")
    for other, what in ((feats, 'features'), (labels, 'labels')):
        if other is not None and len(other) != len(logits):
            raise ValueError(f"'{name}': {len(logits)} logits but {len(other)} {what}.")
    return {'logits': logits, 'features': None if feats is None else np.asarray(feats, np.float32),
            'label': None if labels is None else np.asarray(labels).astype(np.int32).reshape(-1)}


def _default_scores(model_mode: bool, has_fit: bool, has_features: bool, has_fc: bool) -> Tuple[str, ...]:
    out = ['msp', 'max_logit', 'energy'] + (['odin'] if model_mode else []) + ['gen']
    if has_fit:
        out.append('kl_matching')
        if has_features:
            out += ['mahalanobis'] + (['vim', 'react'] if has_fc else [])
    return tuple(out)


def ood_metrics(id_data: Any, ood_data: Any, *, apply_fn: Optional[Callable] = None, variables: Any = None,
                fit_data: Any = None, val_data: Any = None, scores: Optional[Sequence[str]] = None,
                kinds: Optional[Mapping[str, str]] = None, fc_params: Any = None,
                input_normalization: Union[None, str, Sequence[float]] = None,
                score_config: ScoreConfig = ScoreConfig(), batch_size: int = 256,
                num_subsamples: int = 10, seed: int = 0, workdir: Optional[str] = None,
                plots: bool = True) -> Dict[str, Any]:
    """OOD metrics for notebooks, from model outputs or from a model and data.

    Without ``apply_fn``: every ``*_data`` is logits [N, K], a ``(logits, labels)`` pair or a
    dict ``{'logits', 'features'?, 'label'?}`` (features enable Mahalanobis/ViM/ReAct).
    With ``apply_fn`` and ``variables``: every ``*_data`` is images [N, H, W, C], an
    ``(images, labels)`` pair, a dict with 'image', a tf.data dataset or an EvalSet.

    ``ood_data``: one OOD set or ``{name: data}``; ``kinds`` maps names to 'fine_ood' /
    'coarse_ood' (default 'ood'; the mean rows follow the kinds). ``fit_data``: ID training data
    with labels (Mahalanobis, ViM, ReAct; KL-matching too unless ``val_data`` is given).
    ``input_normalization``: how the images were normalised ('imagenet', 'none' or per-channel
    stds); ODIN needs it and is scored by default only when it is given. ``scores`` defaults to
    every score the inputs allow. ``workdir``: also write the report there. Returns the metrics
    dict of :func:`evaluate`.
    """
    model_mode = apply_fn is not None
    if model_mode and variables is None:
        raise ValueError('pass variables with apply_fn (the model state to evaluate).')
    if input_normalization is not None:
        score_config = dataclasses.replace(score_config, odin_input_std=input_normalization)
    ood_sets = dict(ood_data) if isinstance(ood_data, Mapping) and not _looks_like_one_set(ood_data) \
        else {'ood': ood_data}
    kinds = {name: (kinds or {}).get(name, 'ood') for name in ood_sets}
    id_name = 'id' if 'id' not in ood_sets else 'id_test'
    if fc_params is None and variables is not None:
        try:
            fc_params = _resolve_fc(None, variables, ('vim',))
        except ValueError:
            fc_params = None
    has_fit = fit_data is not None or val_data is not None
    if model_mode:
        if scores is None:
            scores = _default_scores(True, has_fit, fit_data is not None, fc_params is not None)
            scores = tuple(s for s in scores if s != 'odin' or score_config.odin_input_std is not None)
        fit_sets = {k: sources.as_batch_source(v, batch_size)
                    for k, v in (('train', fit_data), ('val', val_data)) if v is not None} or None
        eval_sets = [EvalSet(id_name, 'id', sources.as_batch_source(id_data, batch_size))]
        eval_sets += [EvalSet(n, kinds[n], sources.as_batch_source(d, batch_size))
                      for n, d in ood_sets.items()]
        return evaluate(apply_fn=apply_fn, variables=variables, eval_sets=eval_sets, fit_sets=fit_sets,
                        workdir=workdir, scores=scores, fc_params=fc_params, score_config=score_config,
                        num_subsamples=num_subsamples, seed=seed, plots=plots)

    set_outputs = {id_name: _outputs(id_data, id_name), **{n: _outputs(d, n) for n, d in ood_sets.items()}}
    fit_out = None if fit_data is None else _outputs(fit_data, 'fit_data')
    val_out = None if val_data is None else _outputs(val_data, 'val_data')
    all_features = all(o['features'] is not None for o in set_outputs.values())
    if scores is None:
        scores = _default_scores(False, has_fit, all_features and fit_out is not None and
                                 fit_out['features'] is not None, fc_params is not None)
    if 'odin' in scores:
        raise ValueError('ODIN perturbs the input: it needs apply_fn/variables and images, not logits. '
                         'Drop it from scores.')
    scores = _check_scores(scores, score_config)
    if any(s in scores_lib.FEATURE_SCORES for s in scores) and not all_features:
        raise ValueError('Mahalanobis, ViM and ReAct need features for every set: pass dicts with '
                         "'logits' and 'features', or drop those scores.")
    if 'mahalanobis' in scores and (fit_out is None or fit_out['label'] is None):
        raise ValueError("Mahalanobis needs labelled ID training outputs: fit_data={'logits', "
                         "'features', 'label'}.")
    stream = lambda o: None if o is None else (lambda: iter([o]))  # noqa: E731
    stats = fit_statistics(scores, score_config, fc_params, stream(fit_out), stream(val_out), seed)
    return _metrics_and_report(set_outputs, {id_name: 'id', **kinds}, id_name, stats, scores, score_config,
                               num_subsamples=num_subsamples, seed=seed, workdir=workdir, writer=None, step=0,
                               plots=plots)


def _looks_like_one_set(data: Mapping) -> bool:
    """A dict that is itself one set ({'logits': ...} or {'image': ...}), not {name: set}."""
    return any(k in data for k in ('logits', 'image', 'features', 'label'))
