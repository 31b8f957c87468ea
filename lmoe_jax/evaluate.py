"""OOD evaluation of a classifier over an ID test set, fine-grained OOD and coarse OOD sets.

Two public entries:

* :func:`evaluate` — what a training run ends with (``main.py --mode=eval``): runs the model once
  per set, computes every score and metric, writes the report to the workdir, returns the metrics.
* :func:`ood_metrics` — for notebooks: the same from logits (or logits + features) already in
  hand, or from ``apply_fn``/``variables`` and numpy arrays or tf.data datasets.

Returned metrics dict (fractions in [0, 1]; JSON-serialisable)::

    {'id_set': str, 'id_accuracy': float | None,
     'kinds': {set: 'id' | 'fine_ood' | 'coarse_ood' | 'ood'}, 'num_images': {set: int},
     'scores': {score: {ood_set | 'fine_mean' | 'coarse_mean' | 'ood_mean': {metric: value}}},
     'config': {...}}

Metric keys: ``openood_auroc``, ``openood_fpr95``, ``openood_aupr_in``, ``openood_aupr_out``
(OOD positive) and ``mixoe_tnr95``, ``mixoe_auroc``, ``mixoe_aupr_in`` with ``*_std`` (ID
positive, 10 subsamples); see ``lmoe_jax.ood.metrics``.
"""
import dataclasses
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from lmoe_jax.ood import fitting
from lmoe_jax.ood import metrics as metrics_lib
from lmoe_jax.ood import report as report_lib
from lmoe_jax.ood import scores as scores_lib
from lmoe_jax.ood import sources

DEFAULT_SCORES = scores_lib.ALL_SCORES
EvalSet = sources.EvalSet
format_table = report_lib.format_table
format_msp_table = report_lib.format_msp_table


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Hyper-parameters of the scores; defaults are OpenOOD v1.5's."""
    energy_temperature: float = 1.0
    odin_temperature: float = 1000.0
    odin_epsilon: float = 0.0014
    odin_input_std: Optional[Tuple[float, ...]] = None  # per-channel std of normalised inputs
    gen_gamma: float = 0.1
    gen_top_m: int = 100
    vim_dim: Optional[int] = None  # None: D // 8 (256 for 2048-d features)
    react_percentile: float = 90.0
    react_temperature: float = 1.0
    react_sample_size: int = 4_000_000  # activation values kept to estimate the percentile


def _check_scores(scores: Sequence[str]) -> Tuple[str, ...]:
    scores = tuple(scores)
    unknown = [s for s in scores if s not in scores_lib.ALL_SCORES]
    if unknown or not scores:
        raise ValueError(f'unknown or no scores {unknown}; choose from {list(scores_lib.ALL_SCORES)}.')
    if len(set(scores)) != len(scores):
        raise ValueError(f'scores listed twice: {list(scores)}.')
    return scores


def compute_scores(logits, features, stats: Mapping[str, Mapping[str, Any]], scores: Sequence[str],
                   config: ScoreConfig, logits_fn: Optional[Callable] = None, images=None) -> Dict[str, jax.Array]:
    """Every requested score of one batch (pure; call it under jit)."""
    out = {}
    for name in scores:
        if name == 'msp':
            out[name] = scores_lib.msp(logits)
        elif name == 'max_logit':
            out[name] = scores_lib.max_logit(logits)
        elif name == 'energy':
            out[name] = scores_lib.energy(logits, config.energy_temperature)
        elif name == 'gen':
            out[name] = scores_lib.gen(logits, config.gen_gamma, config.gen_top_m)
        elif name == 'kl_matching':
            out[name] = scores_lib.kl_matching(logits, **stats['kl_matching'])
        elif name == 'mahalanobis':
            out[name] = scores_lib.mahalanobis(features, **stats['mahalanobis'])
        elif name == 'vim':
            out[name] = scores_lib.vim(logits, features, **stats['vim'])
        elif name == 'react':
            out[name] = scores_lib.react(features, **stats['react'], temperature=config.react_temperature)
        elif name == 'odin':
            if logits_fn is None:
                raise ValueError('ODIN perturbs the input: it needs apply_fn/variables and images, '
                                 'not logits. Drop it from scores.')
            out[name] = scores_lib.odin(logits_fn, images, config.odin_temperature, config.odin_epsilon,
                                        config.odin_input_std)
    return out


def _needs_features(scores: Sequence[str]) -> bool:
    return any(s in scores_lib.FEATURE_SCORES for s in scores)


def _forward(apply_fn, variables, images, with_features: bool):
    if with_features:
        logits, feats = apply_fn(variables, images, train=False, return_features=True)
        return jnp.asarray(logits, jnp.float32), jnp.asarray(feats, jnp.float32)
    return jnp.asarray(apply_fn(variables, images, train=False), jnp.float32), None


def make_model_score_fn(apply_fn: Callable, scores: Sequence[str], config: ScoreConfig):
    """jitted ``(variables, stats, images) -> {score: [B], 'pred': [B]}`` (one forward pass,
    plus ODIN's gradient and second pass when asked for)."""
    with_features = _needs_features(scores)

    def score_batch(variables, stats, images):
        logits, feats = _forward(apply_fn, variables, images, with_features)
        logits_fn = lambda x: apply_fn(variables, x, train=False)  # noqa: E731
        out = compute_scores(logits, feats, stats, scores, config, logits_fn, images)
        out['pred'] = jnp.argmax(logits, axis=-1)
        return out
    return jax.jit(score_batch)


def make_logit_score_fn(scores: Sequence[str], config: ScoreConfig):
    """jitted ``(stats, logits, features) -> {score: [B], 'pred': [B]}`` for precomputed outputs."""
    def score_batch(stats, logits, features):
        logits = jnp.asarray(logits, jnp.float32)
        out = compute_scores(logits, features, stats, scores, config)
        out['pred'] = jnp.argmax(logits, axis=-1)
        return out
    return jax.jit(score_batch)


class _Progress:
    """Log lines with image counts (of ``total`` when known) and rate, every ``every_s`` seconds."""

    def __init__(self, what: str, every_s: float, total: Optional[int] = None):
        self.what, self.every_s, self.total = what, every_s, total
        self.start = self.last = time.perf_counter()
        self.count = 0

    def update(self, n: int):
        self.count += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            of = f'/{self.total}' if self.total else ''
            logging.info('%s: %d%s images, %.1f images/s', self.what, self.count, of,
                         self.count / max(now - self.start, 1e-9))

    def done(self):
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        logging.info('%s: done, %d images in %.1fs (%.1f images/s)', self.what, self.count, elapsed,
                     self.count / elapsed)


def _all_processes(tree):
    """Concatenate per-process host arrays (same shapes on every process) along axis 0.

    Eval sets give every process the same number of padded batches, so this is one collective.
    """
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _model_fit_stream(apply_fn, variables, source: sources.BatchSource, with_features: bool,
                      max_batches: Optional[int], what: str, log_every_s: float, batch_sharding):
    forward = jax.jit(lambda v, x: _forward(apply_fn, v, x, with_features))

    def stream() -> Iterator[Dict[str, np.ndarray]]:
        progress = _Progress(what, log_every_s)
        for batch, mask in sources.iterate_real_rows(source, max_batches):
            images = _put(batch['image'], batch_sharding)
            out = jax.device_get(forward(variables, images))
            out = _all_processes({'logits': out[0], 'features': out[1], 'mask': mask,
                                  'label': np.asarray(batch['label'])})
            mask = np.asarray(out['mask'], bool)
            progress.update(int(mask.sum()))
            yield {'logits': np.asarray(out['logits'])[mask],
                   'features': None if out['features'] is None else np.asarray(out['features'])[mask],
                   'label': np.asarray(out['label'])[mask]}
        progress.done()
    return stream


def _put(images, batch_sharding):
    images = np.asarray(images, np.float32)
    return images if batch_sharding is None else jax.device_put(images, batch_sharding)


def _collect(score_batches: Iterator[Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray]],
             scores: Sequence[str], what: str, log_every_s: float, total: Optional[int] = None):
    """Real rows of every batch, of all processes: ({score: float64 [N]}, preds [N], labels [N])."""
    chunks = {s: [] for s in scores}
    preds, labels, masks = [], [], []
    progress = _Progress(what, log_every_s, total)
    for out, mask, label in score_batches:
        for s in scores:
            chunks[s].append(np.asarray(out[s], np.float64))
        preds.append(np.asarray(out['pred']))
        labels.append(np.asarray(label))
        masks.append(np.asarray(mask, bool))
        progress.update(int(masks[-1].sum()))
    progress.done()
    if not masks:
        raise ValueError(f'{what}: the set yielded no batches; check its data source.')
    gathered = _all_processes({'scores': {s: np.concatenate(c) for s, c in chunks.items()},
                               'pred': np.concatenate(preds), 'label': np.concatenate(labels),
                               'mask': np.concatenate(masks)})
    keep = np.asarray(gathered['mask'], bool)
    if not keep.any():
        raise ValueError(f'{what}: the set has no real (unmasked) images; check its data source.')
    return ({s: np.asarray(v)[keep] for s, v in gathered['scores'].items()},
            np.asarray(gathered['pred'])[keep], np.asarray(gathered['label'])[keep])


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
    score_names = list(set_scores[id_name])
    result = {'id_set': id_name, 'id_accuracy': id_accuracy, 'kinds': dict(kinds),
              'num_images': {n: int(len(next(iter(s.values())))) for n, s in set_scores.items()},
              'scores': {}, 'config': {'num_subsamples': num_subsamples, 'seed': seed, **(config or {})}}
    for score in report_lib.ordered_scores(score_names):
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


def _check_eval_sets(eval_sets) -> Tuple[str, Dict[str, str]]:
    eval_sets = list(eval_sets)
    for s in eval_sets:
        if not sources.is_eval_set(s):
            raise ValueError(f'eval_sets must hold objects with name, kind and batches; got {type(s).__name__}.')
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
        train = fit_sets.get('train')
        val = fit_sets.get('val')
        return (None if train is None else sources.as_batch_source(train),
                None if val is None else sources.as_batch_source(val))
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


def _fit(scores, config, train, val, seed):
    return fitting.fit_score_statistics(
        train, scores=scores, fc_params=config['fc_params'], val_stream=val, vim_dim=config['vim_dim'],
        react_percentile=config['react_percentile'], react_sample_size=config['react_sample_size'], seed=seed)


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
        and ``batches()`` -> iterator of {'image', 'label', 'mask'} (see ``lmoe_jax.ood.sources``).
      fit_sets: ID data for the fitted scores: ``{'train': ..., 'val': ...}`` (train with labels
        for Mahalanobis/ViM/ReAct, val for KL-matching, defaulting to train) or one source for
        both. Each entry may be anything ``as_batch_source`` reads. Needed only for those scores.
      workdir: where ood_report.{json,md,csv}, ood_scores.npz and ood_plots/*.png go (None: none).
      scores: names from ``lmoe_jax.ood.scores.ALL_SCORES``; MSP leads every table.
      writer: optional CLU metric writer: scalars ``ood/<score>/<set>/<metric>``, plot images,
        and the MSP table as text, at ``step``.
      fc_params: (kernel [D, K], bias [K]) of the final layer for ViM/ReAct; defaults to
        ``variables['params']['fc']``.
      score_config: score hyper-parameters (ODIN T/eps, energy T, GEN, ViM dim, ReAct percentile).
      num_subsamples, seed: the MixOE protocol's subsampling.
      plots: write PNGs (and send them to the writer).
      max_fit_batches: cap on the fit-data batches read (None: all).
      batch_sharding: optional ``jax.sharding.Sharding`` to place each image batch with (e.g.
        ``NamedSharding(mesh, P('data'))``); None leaves placement to jit.
      log_every_s: period of the progress log lines.

    Returns:
      The metrics dict described in this module's docstring.
    """
    scores = _check_scores(scores)
    id_name, kinds = _check_eval_sets(eval_sets)
    fc_params = _resolve_fc(fc_params, variables, scores)
    train, val = _fit_sources(fit_sets)
    with_features = _needs_features(scores)
    fit_config = {'fc_params': fc_params, 'vim_dim': score_config.vim_dim,
                  'react_percentile': score_config.react_percentile,
                  'react_sample_size': score_config.react_sample_size}
    fitted = [s for s in scores if s in scores_lib.FITTED_SCORES]
    if fitted and train is None and val is None:
        raise ValueError(f'scores {fitted} are fitted on ID data: pass fit_sets={{"train": ..., "val": ...}} '
                         '(ID training images with labels), or leave them out of scores.')
    stats = {}
    if fitted:
        wrap = lambda src, what: None if src is None else _model_fit_stream(  # noqa: E731
            apply_fn, variables, src, with_features, max_fit_batches, what, log_every_s, batch_sharding)
        stats = _fit(scores, fit_config, wrap(train, 'fit[train]'), wrap(val, 'fit[val]'), seed)
    stats = jax.tree_util.tree_map(jnp.asarray, stats)

    score_fn = make_model_score_fn(apply_fn, scores, score_config)
    set_scores, id_accuracy = {}, None
    for eval_set in eval_sets:
        def batches(eval_set=eval_set):
            for batch, mask in sources.iterate_real_rows(eval_set.batches):
                out = score_fn(variables, stats, _put(batch['image'], batch_sharding))
                yield jax.device_get(out), mask, batch.get('label', np.zeros(len(mask), np.int32))
        values, preds, labels = _collect(batches(), scores, f'eval[{eval_set.name}]', log_every_s,
                                         getattr(eval_set, 'num_examples', None))
        set_scores[eval_set.name] = values
        if eval_set.kind == 'id':
            id_accuracy = metrics_lib.top1_accuracy(preds, labels)
    config = _report_config(scores, score_config, stats)
    metrics = build_metrics(set_scores, kinds, id_name, id_accuracy, num_subsamples=num_subsamples,
                            seed=seed, config=config)
    if workdir is not None:
        report_lib.write_report(workdir, metrics, set_scores, writer=writer, step=step, plots=plots)
    elif writer is not None:
        report_lib.send_to_writer(writer, metrics, {}, step)
    return metrics


def _report_config(scores, score_config: ScoreConfig, stats) -> Dict[str, Any]:
    config = {'scores': list(scores), **dataclasses.asdict(score_config)}
    if config['odin_input_std'] is not None:
        config['odin_input_std'] = list(config['odin_input_std'])
    if 'vim' in stats:
        config['vim_alpha'] = float(stats['vim']['alpha'])
        config['vim_dim'] = int(stats['vim']['origin'].shape[0] - stats['vim']['null_space'].shape[1])
    if 'react' in stats:
        config['react_threshold'] = float(stats['react']['threshold'])
    return config


# ----------------------------------------------------------------------------- notebook entry


def _outputs(data, name: str) -> Dict[str, Optional[np.ndarray]]:
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


def _output_batches(outputs: Mapping[str, Optional[np.ndarray]], batch_size: int):
    """Padded fixed-size chunks (one jit compilation) with their masks."""
    n = len(outputs['logits'])
    for start in range(0, n, batch_size):
        chunk = {k: None if v is None else v[start:start + batch_size] for k, v in outputs.items()}
        real = len(chunk['logits'])
        padded = {k: None if v is None else sources._pad_rows(v, batch_size) for k, v in chunk.items()}
        yield padded, np.arange(batch_size) < real


def _default_scores(model_mode: bool, has_fit: bool, has_features: bool, has_fc: bool) -> Tuple[str, ...]:
    out = ['msp', 'max_logit', 'energy'] + (['odin'] if model_mode else []) + ['gen']
    if has_fit:
        out.append('kl_matching')
        if has_features:
            out.append('mahalanobis')
            out += ['vim', 'react'] if has_fc else []
    return tuple(out)


def ood_metrics(id_data: Any, ood_data: Any, *, apply_fn: Optional[Callable] = None, variables: Any = None,
                fit_data: Any = None, val_data: Any = None, scores: Optional[Sequence[str]] = None,
                kinds: Optional[Mapping[str, str]] = None, fc_params: Any = None,
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
    ``scores`` defaults to every score the inputs allow. ``workdir``: also write the report
    there. Returns the metrics dict of :func:`evaluate`.
    """
    model_mode = apply_fn is not None
    if model_mode and variables is None:
        raise ValueError('pass variables with apply_fn (the model state to evaluate).')
    ood_sets = dict(ood_data) if isinstance(ood_data, Mapping) and not _looks_like_one_set(ood_data) \
        else {'ood': ood_data}
    kinds = {name: (kinds or {}).get(name, 'ood') for name in ood_sets}
    id_name = 'id' if 'id' not in ood_sets else 'id_test'
    if fc_params is None and variables is not None:
        try:
            fc_params = _resolve_fc(None, variables, ('vim',))
        except ValueError:
            fc_params = None

    if model_mode:
        fit_sets = None if fit_data is None and val_data is None else {'train': fit_data, 'val': val_data}
        if fit_sets is not None:
            fit_sets = {k: sources.as_batch_source(v, batch_size) for k, v in fit_sets.items() if v is not None}
        eval_sets = [EvalSet(id_name, 'id', sources.as_batch_source(id_data, batch_size))]
        eval_sets += [EvalSet(n, kinds[n], sources.as_batch_source(d, batch_size)) for n, d in ood_sets.items()]
        if scores is None:
            scores = _default_scores(True, fit_data is not None or val_data is not None, fit_data is not None,
                                     fc_params is not None)
        return evaluate(apply_fn=apply_fn, variables=variables, eval_sets=eval_sets, fit_sets=fit_sets,
                        workdir=workdir, scores=scores, fc_params=fc_params, score_config=score_config,
                        num_subsamples=num_subsamples, seed=seed, plots=plots)

    id_out = _outputs(id_data, id_name)
    ood_out = {n: _outputs(d, n) for n, d in ood_sets.items()}
    fit_out = None if fit_data is None else _outputs(fit_data, 'fit_data')
    val_out = None if val_data is None else _outputs(val_data, 'val_data')
    all_outs = [id_out, *ood_out.values()]
    has_features = fit_out is not None and fit_out['features'] is not None and \
        all(o['features'] is not None for o in all_outs)
    if scores is None:
        scores = _default_scores(False, fit_out is not None or val_out is not None, has_features,
                                 fc_params is not None)
    scores = _check_scores(scores)
    if _needs_features(scores) and not all(o['features'] is not None for o in all_outs):
        raise ValueError('Mahalanobis, ViM and ReAct need features for every set: pass dicts with '
                         "'logits' and 'features', or drop those scores.")
    if 'mahalanobis' in scores and (fit_out is None or fit_out['label'] is None):
        raise ValueError("Mahalanobis needs labelled ID training outputs: fit_data={'logits', "
                         "'features', 'label'}.")
    stream = lambda o: None if o is None else (lambda: iter([o]))  # noqa: E731
    stats = _fit(scores, {'fc_params': fc_params, 'vim_dim': score_config.vim_dim,
                          'react_percentile': score_config.react_percentile,
                          'react_sample_size': score_config.react_sample_size},
                 stream(fit_out), stream(val_out), seed)
    stats = jax.tree_util.tree_map(jnp.asarray, stats)
    score_fn = make_logit_score_fn(scores, score_config)
    set_scores, id_accuracy = {}, None
    for name, outputs in [(id_name, id_out), *ood_out.items()]:
        def batches(outputs=outputs):
            for chunk, mask in _output_batches(outputs, batch_size):
                out = jax.device_get(score_fn(stats, chunk['logits'], chunk['features']))
                label = chunk['label'] if chunk['label'] is not None else np.zeros(len(mask), np.int32)
                yield out, mask, label
        set_scores[name], preds, labels = _collect(batches(), scores, f'scores[{name}]', 10.0)
        if name == id_name and outputs['label'] is not None:
            id_accuracy = metrics_lib.top1_accuracy(preds, labels)
    metrics = build_metrics(set_scores, {id_name: 'id', **kinds}, id_name, id_accuracy,
                            num_subsamples=num_subsamples, seed=seed,
                            config=_report_config(scores, score_config, stats))
    if workdir is not None:
        report_lib.write_report(workdir, metrics, set_scores, plots=plots)
    return metrics


def _looks_like_one_set(data: Mapping) -> bool:
    """A dict that is itself one set ({'logits': ...} or {'image': ...}), not {name: set}."""
    return any(k in data for k in ('logits', 'image', 'features', 'label'))
