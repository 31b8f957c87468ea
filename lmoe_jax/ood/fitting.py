"""Statistics of ID data that the fitted scores need, accumulated batch by batch on the host.

Streams are zero-argument callables returning a fresh iterator of dicts
``{'logits': [n, K], 'features': [n, D], 'label': [n]}`` holding only real rows (padding
removed). Accumulation is float64 numpy, so no feature matrix is ever held whole:

* Mahalanobis: per-class sums and one shifted second moment -> class means, tied covariance.
* ViM: the second moment of ``f - origin`` (one pass), then the mean residual norm (a
  second pass, because a mean of norms is not a function of moments).
* ReAct: a uniform reservoir sample of activation values (exact while they fit).
* KL-matching: per-predicted-class sums of softmax vectors.
"""
import logging
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np

from lmoe_jax.ood import scores as scores_lib

Stream = Callable[[], Iterator[Mapping[str, np.ndarray]]]


def as_kernel_bias(fc_params) -> Tuple[np.ndarray, np.ndarray]:
    """(kernel [D, K], bias [K]) from a ``(kernel, bias)`` pair or a ``{'kernel', 'bias'}`` dict."""
    if fc_params is None:
        raise ValueError('ViM and ReAct need the final layer: pass fc_params=(kernel, bias) or '
                         "{'kernel': [D, K], 'bias': [K]}, or drop those scores.")
    if isinstance(fc_params, Mapping):
        kernel, bias = fc_params['kernel'], fc_params['bias']
    else:
        kernel, bias = fc_params
    kernel = np.asarray(kernel, np.float64)
    bias = np.asarray(bias, np.float64)
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
        raise ValueError(f'fc kernel must be [D, K] and bias [K]; got {kernel.shape} and {bias.shape}.')
    return kernel, bias


def softmax64(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class ClassMeansTiedCovariance:
    """Class means and the pooled within-class covariance (divided by N, as sklearn's
    EmpiricalCovariance of the class-centred features). Sums are taken around a shift
    (the first batch's mean) so that subtracting the means loses little precision."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.shift = None

    def update(self, features, labels):
        f = np.asarray(features, np.float64)
        y = np.asarray(labels).astype(np.int64)
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f'fit labels must lie in [0, {self.num_classes}); got {y.min()}..{y.max()}. '
                             'Pass ID training data with ID labels.')
        if self.shift is None:
            self.shift = f.mean(axis=0) if len(f) else np.zeros(f.shape[1])
            self.sums = np.zeros((self.num_classes, f.shape[1]))
            self.counts = np.zeros(self.num_classes, np.int64)
            self.moment = np.zeros((f.shape[1], f.shape[1]))
        c = f - self.shift
        np.add.at(self.sums, y, c)
        self.counts += np.bincount(y, minlength=self.num_classes)
        self.moment += c.T @ c

    def result(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(means [C, D] of the C classes seen, covariance [D, D], their class ids [C])."""
        if self.shift is None or self.counts.sum() == 0:
            raise ValueError('Mahalanobis needs ID training features, but the fit stream was empty.')
        seen = np.flatnonzero(self.counts)
        centred_means = self.sums[seen] / self.counts[seen, None]
        between = (centred_means * self.counts[seen, None]).T @ centred_means
        cov = (self.moment - between) / self.counts.sum()
        return centred_means + self.shift, (cov + cov.T) / 2, seen


class SecondMoment:
    """Uncentred second moment E[x x^T] (ViM fits it on ``f - origin``)."""

    def __init__(self):
        self.moment, self.count = None, 0

    def update(self, x):
        x = np.asarray(x, np.float64)
        if self.moment is None:
            self.moment = np.zeros((x.shape[1], x.shape[1]))
        self.moment += x.T @ x
        self.count += len(x)

    def result(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError('ViM needs ID training features, but the fit stream was empty.')
        return self.moment / self.count


class ValueReservoir:
    """A uniform sample of at most ``capacity`` scalar values (Algorithm R, vectorised per batch).

    Holds every value, hence gives exact percentiles, while fewer than ``capacity`` were seen.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f'reservoir capacity must be >= 1; got {capacity}.')
        self.values = np.empty(capacity, np.float64)
        self.filled = 0
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def update(self, x):
        x = np.asarray(x, np.float64).ravel()
        take = min(len(x), len(self.values) - self.filled)
        self.values[self.filled:self.filled + take] = x[:take]
        self.filled += take
        rest = x[take:]
        if len(rest):
            global_index = self.seen + take + np.arange(len(rest))
            slot = self.rng.integers(0, global_index + 1)
            keep = slot < len(self.values)
            self.values[slot[keep]] = rest[keep]
        self.seen += len(x)

    def percentile(self, q: float) -> float:
        if self.filled == 0:
            raise ValueError('ReAct needs ID training features, but the fit stream was empty.')
        return float(np.percentile(self.values[:self.filled], q))


class PredictedClassMeanProbs:
    """Mean softmax vector of the images predicted as each class (KL-matching templates)."""

    def __init__(self):
        self.sums, self.counts = None, None

    def update(self, logits):
        probs = softmax64(logits)
        if self.sums is None:
            self.sums = np.zeros((probs.shape[1], probs.shape[1]))
            self.counts = np.zeros(probs.shape[1], np.int64)
        pred = probs.argmax(axis=-1)
        np.add.at(self.sums, pred, probs)
        self.counts += np.bincount(pred, minlength=probs.shape[1])

    def result(self) -> np.ndarray:
        if self.sums is None or self.counts.sum() == 0:
            raise ValueError('KL-matching needs ID validation logits, but the stream was empty.')
        seen = np.flatnonzero(self.counts)
        return self.sums[seen] / self.counts[seen, None]


def vim_origin(kernel, bias) -> np.ndarray:
    """The feature-space point whose logits are all zero-ish: ``-pinv(W^T) b`` (ViM)."""
    return -np.linalg.pinv(np.asarray(kernel, np.float64).T) @ np.asarray(bias, np.float64)


def vim_null_space(moment: np.ndarray, dim: int) -> np.ndarray:
    """Eigenvectors of ``moment`` beyond the ``dim`` largest eigenvalues, as columns [D, D - dim]."""
    eigvals, eigvecs = np.linalg.eigh(moment)
    order = np.argsort(-eigvals, kind='stable')
    return eigvecs[:, order[dim:]]


def default_vim_dim(feature_dim: int) -> int:
    """D / 8: 256 principal directions for 2048-d ResNet-50 features (OpenOOD's setting)."""
    return max(1, feature_dim // 8)


def _consume(stream: Stream, name: str) -> Iterable[Mapping[str, np.ndarray]]:
    if not callable(stream):
        raise ValueError(f'{name} must be a callable returning a fresh iterator of batches.')
    return stream()


def fit_score_statistics(train_stream: Optional[Stream], *, scores: Sequence[str], fc_params=None,
                         val_stream: Optional[Stream] = None, vim_dim: Optional[int] = None,
                         react_percentile: float = 90.0, react_sample_size: int = 4_000_000,
                         seed: int = 0) -> Dict[str, Dict[str, np.ndarray]]:
    """Fit what ``kl_matching``, ``mahalanobis``, ``vim`` and ``react`` need, streaming.

    ``train_stream`` (ID training data, with labels) feeds the feature scores; ``val_stream``
    (ID validation data) feeds KL-matching and defaults to ``train_stream``. Returns
    ``{score: {name: float32 array}}`` holding exactly the keyword arguments of that score in
    ``lmoe_jax.ood.scores`` beyond logits/features.
    """
    wanted = [s for s in scores if s in scores_lib.FITTED_SCORES]
    if not wanted:
        return {}
    feature_scores = [s for s in wanted if s in scores_lib.FEATURE_SCORES]
    kl_stream = val_stream if val_stream is not None else train_stream
    if (feature_scores or 'kl_matching' in wanted) and train_stream is None and kl_stream is None:
        raise ValueError(f'scores {wanted} are fitted on ID data: pass fit data (ID training '
                         'images with labels, and optionally ID validation images).')
    if feature_scores and train_stream is None:
        raise ValueError(f'scores {feature_scores} are fitted on ID training features: pass ID '
                         'training data, or drop those scores.')
    kernel = bias = origin = None
    if 'vim' in wanted or 'react' in wanted:
        kernel, bias = as_kernel_bias(fc_params)
        origin = vim_origin(kernel, bias)

    maha = vim_moment = reservoir = None
    kl = PredictedClassMeanProbs() if 'kl_matching' in wanted else None
    max_logit_sum, count = 0.0, 0
    if feature_scores or (kl is not None and kl_stream is train_stream):
        for batch in _consume(train_stream, 'fit data'):
            logits = np.asarray(batch['logits'])
            if kl is not None and kl_stream is train_stream:
                kl.update(logits)
            if not feature_scores:
                continue
            feats = batch.get('features')
            if feats is None:
                raise ValueError(f'scores {feature_scores} need penultimate features: the model must '
                                 'accept return_features=True.')
            feats = np.asarray(feats, np.float64)
            if 'mahalanobis' in wanted:
                if maha is None:
                    maha = ClassMeansTiedCovariance(logits.shape[1])
                maha.update(feats, batch['label'])
            if 'vim' in wanted:
                if vim_moment is None:
                    vim_moment = SecondMoment()
                vim_moment.update(feats - origin)
                max_logit_sum += float(np.asarray(logits, np.float64).max(axis=-1).sum())
                count += len(feats)
            if 'react' in wanted:
                if reservoir is None:
                    reservoir = ValueReservoir(react_sample_size, seed)
                reservoir.update(feats)
    if kl is not None and kl_stream is not train_stream:
        for batch in _consume(kl_stream, 'validation data'):
            kl.update(batch['logits'])

    stats: Dict[str, Dict[str, np.ndarray]] = {}
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    if kl is not None:
        stats['kl_matching'] = {'class_mean_probs': f32(kl.result())}
    if 'mahalanobis' in wanted:
        if maha is None:
            raise ValueError('Mahalanobis needs ID training features, but the fit stream was empty.')
        means, cov, _ = maha.result()
        stats['mahalanobis'] = {'class_means': f32(means),
                                'precision': f32(np.linalg.pinv(cov, hermitian=True))}
    if 'react' in wanted:
        if reservoir is None:
            raise ValueError('ReAct needs ID training features, but the fit stream was empty.')
        stats['react'] = {'kernel': f32(kernel), 'bias': f32(bias),
                          'threshold': f32(reservoir.percentile(react_percentile))}
    if 'vim' in wanted:
        if vim_moment is None:
            raise ValueError('ViM needs ID training features, but the fit stream was empty.')
        moment = vim_moment.result()
        dim = default_vim_dim(moment.shape[0]) if vim_dim is None else int(vim_dim)
        if not 0 < dim < moment.shape[0]:
            raise ValueError(f'vim_dim must be in [1, {moment.shape[0] - 1}] for {moment.shape[0]}-d '
                             f'features; got {dim}.')
        null_space = vim_null_space(moment, dim)
        norm_sum = 0.0
        for batch in _consume(train_stream, 'fit data'):
            residual = (np.asarray(batch['features'], np.float64) - origin) @ null_space
            norm_sum += float(np.linalg.norm(residual, axis=-1).sum())
        mean_norm = norm_sum / count
        if not mean_norm > 0:
            raise ValueError('ViM: ID features have no residual outside the principal subspace; '
                             'lower vim_dim.')
        alpha = (max_logit_sum / count) / mean_norm
        logging.info('ViM fitted: dim=%d of %d, alpha=%.4g', dim, moment.shape[0], alpha)
        stats['vim'] = {'origin': f32(origin), 'null_space': f32(null_space), 'alpha': f32(alpha)}
    return stats
