"""OOD detection metrics, host-side numpy float64, from confidence scores (higher = more ID).

Two conventions, each named in the function names:

* ``openood_*`` (OpenOOD v1.5): **OOD is the positive class** and ``-confidence`` its score.
  AUROC, FPR at 95% TPR (FPR of the first ROC point reaching TPR >= 0.95, i.e. the share of
  ID flagged OOD once 95% of OOD is caught), AUPR-In (ID positive, ``confidence``) and
  AUPR-Out (OOD positive, ``-confidence``); PR areas are trapezoids over the
  precision-recall curve (not average precision), exactly as sklearn's
  ``auc(*precision_recall_curve(...)[1::-1])``.
* ``mixoe_*`` (MixOE, Zhang et al. WACV 2023): **ID is the positive class**. TNR at the ROC
  point whose TPR is nearest 0.95, AUROC and AUPR-In, each averaged over 10 seeded random
  subsamples in which ID and OOD have the same size (the smaller one), with their std.

Ties: every distinct score value is one threshold, so tied ID/OOD scores move the ROC curve
diagonally (half credit in AUROC), as in sklearn and OpenOOD. Curves keep every threshold
(sklearn's ``drop_intermediate=False``). All functions return fractions in [0, 1].
"""
from typing import Dict, Tuple

import numpy as np

RECALL_LEVEL = 0.95


def _as_scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f'{name} must be a 1-D array of scores; got shape {np.shape(x)}.')
    if arr.size == 0:
        raise ValueError(f'{name} is empty: OOD metrics need at least one ID and one OOD score.')
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(f'{name} holds {bad} NaN/inf value(s); check the model outputs and the score '
                         'before computing metrics.')
    return arr


def _check_pair(id_conf, ood_conf) -> Tuple[np.ndarray, np.ndarray]:
    return _as_scores(id_conf, 'id_conf'), _as_scores(ood_conf, 'ood_conf')


def _labels_and_scores(pos, neg) -> Tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)]),
            np.concatenate([pos, neg]))


def _cumulative_counts(is_pos: np.ndarray, score: np.ndarray):
    """True/false positive counts at each distinct threshold, highest threshold first."""
    order = np.argsort(-score, kind='mergesort')
    score, is_pos = score[order], is_pos[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    tps = np.cumsum(is_pos)[last_of_value].astype(np.float64)
    fps = (last_of_value + 1) - tps
    return tps, fps, score[last_of_value]


def roc_curve(is_pos, score) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds decreasing, starting at the (0, 0) point (threshold inf)."""
    is_pos = np.asarray(is_pos, bool)
    score = np.asarray(score, np.float64)
    n_pos, n_neg = is_pos.sum(), (~is_pos).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError('a ROC curve needs both classes; got only one.')
    tps, fps, thr = _cumulative_counts(is_pos, score)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], np.r_[np.inf, thr]


def precision_recall_curve(is_pos, score) -> Tuple[np.ndarray, np.ndarray]:
    """(precision, recall) with recall decreasing and a final (recall 0, precision 1) point."""
    is_pos = np.asarray(is_pos, bool)
    score = np.asarray(score, np.float64)
    if not is_pos.any() or is_pos.all():
        raise ValueError('a precision-recall curve needs both classes; got only one.')
    tps, fps, _ = _cumulative_counts(is_pos, score)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Area under y(x) for x monotonic (either direction), always non-negative."""
    return float(abs(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0)))


# ----------------------------------------------------------------------------- OpenOOD


def openood_auroc(id_conf, ood_conf) -> float:
    """AUROC with OOD positive (score ``-conf``); equals the ID-positive AUROC."""
    id_conf, ood_conf = _check_pair(id_conf, ood_conf)
    fpr, tpr, _ = roc_curve(*_labels_and_scores(-ood_conf, -id_conf))
    return _trapezoid(tpr, fpr)


def openood_fpr_at_95_tpr(id_conf, ood_conf, recall_level: float = RECALL_LEVEL) -> float:
    """FPR at the first ROC point (OOD positive) with TPR >= ``recall_level``.

    The share of ID images wrongly flagged OOD at the loosest threshold catching 95% of OOD.
    """
    id_conf, ood_conf = _check_pair(id_conf, ood_conf)
    fpr, tpr, _ = roc_curve(*_labels_and_scores(-ood_conf, -id_conf))
    return float(fpr[np.argmax(tpr >= recall_level)])


def openood_aupr_in(id_conf, ood_conf) -> float:
    """Area under the precision-recall curve with ID positive (score ``conf``), trapezoidal."""
    id_conf, ood_conf = _check_pair(id_conf, ood_conf)
    precision, recall = precision_recall_curve(*_labels_and_scores(id_conf, ood_conf))
    return _trapezoid(precision, recall)


def openood_aupr_out(id_conf, ood_conf) -> float:
    """Area under the precision-recall curve with OOD positive (score ``-conf``), trapezoidal."""
    id_conf, ood_conf = _check_pair(id_conf, ood_conf)
    precision, recall = precision_recall_curve(*_labels_and_scores(-ood_conf, -id_conf))
    return _trapezoid(precision, recall)


def openood_metrics(id_conf, ood_conf) -> Dict[str, float]:
    """All OpenOOD metrics: keys ``openood_auroc``, ``openood_fpr95``, ``openood_aupr_in``,
    ``openood_aupr_out``."""
    return {'openood_auroc': openood_auroc(id_conf, ood_conf),
            'openood_fpr95': openood_fpr_at_95_tpr(id_conf, ood_conf),
            'openood_aupr_in': openood_aupr_in(id_conf, ood_conf),
            'openood_aupr_out': openood_aupr_out(id_conf, ood_conf)}


# ----------------------------------------------------------------------------- MixOE


def mixoe_tnr_at_95_tpr(id_conf, ood_conf, recall_level: float = RECALL_LEVEL) -> float:
    """TNR (share of OOD rejected) at the ROC point, ID positive, whose TPR is nearest 0.95.

    Among equally near points the highest threshold (lowest FPR) wins. MixOE's code keeps the
    lowest one instead, which can only lower TNR, by the share of OOD scores lying between two
    neighbouring ID scores (and gives TNR 0 on tiny, perfectly separated sets).
    """
    id_conf, ood_conf = _check_pair(id_conf, ood_conf)
    fpr, tpr, _ = roc_curve(*_labels_and_scores(id_conf, ood_conf))
    gap = np.abs(tpr - recall_level)
    index = np.flatnonzero(gap == gap.min())[0]
    return float(1.0 - fpr[index])


def mixoe_auroc(id_conf, ood_conf) -> float:
    """AUROC with ID positive (same value as :func:`openood_auroc`)."""
    id_conf, ood_conf = _check_pair(id_conf, ood_conf)
    fpr, tpr, _ = roc_curve(*_labels_and_scores(id_conf, ood_conf))
    return _trapezoid(tpr, fpr)


def mixoe_aupr_in(id_conf, ood_conf) -> float:
    """AUPR with ID positive (MixOE's "AUPR"); trapezoidal, same curve as :func:`openood_aupr_in`."""
    return openood_aupr_in(id_conf, ood_conf)


def mixoe_metrics(id_conf, ood_conf, num_subsamples: int = 10, seed: int = 0) -> Dict[str, float]:
    """MixOE protocol: mean and (population) std over ``num_subsamples`` subsamples drawn without
    replacement, both sets cut to ``min(len(id), len(ood))``. Keys ``mixoe_tnr95``,
    ``mixoe_auroc``, ``mixoe_aupr_in`` and each with ``_std``."""
    id_conf, ood_conf = _check_pair(id_conf, ood_conf)
    if num_subsamples < 1:
        raise ValueError(f'num_subsamples must be >= 1; got {num_subsamples}.')
    size = min(len(id_conf), len(ood_conf))
    rng = np.random.default_rng(seed)
    runs = {'mixoe_tnr95': [], 'mixoe_auroc': [], 'mixoe_aupr_in': []}
    for _ in range(num_subsamples):
        ids = rng.choice(id_conf, size, replace=False)
        oods = rng.choice(ood_conf, size, replace=False)
        runs['mixoe_tnr95'].append(mixoe_tnr_at_95_tpr(ids, oods))
        runs['mixoe_auroc'].append(mixoe_auroc(ids, oods))
        runs['mixoe_aupr_in'].append(mixoe_aupr_in(ids, oods))
    out = {}
    for key, values in runs.items():
        out[key] = float(np.mean(values))
        out[key + '_std'] = float(np.std(values))
    return out


# ----------------------------------------------------------------------------- classification


def top1_accuracy(logits_or_preds, labels) -> float:
    """Share of ID images whose arg-max class (or given prediction) equals the label."""
    labels = np.asarray(labels).reshape(-1)
    preds = np.asarray(logits_or_preds)
    if preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if labels.size == 0:
        raise ValueError('top1_accuracy needs at least one labelled ID example.')
    if preds.shape != labels.shape:
        raise ValueError(f'{preds.shape[0]} predictions but {labels.shape[0]} labels.')
    return float(np.mean(preds == labels))


def all_metrics(id_conf, ood_conf, num_subsamples: int = 10, seed: int = 0) -> Dict[str, float]:
    """OpenOOD and MixOE metrics of one (ID, OOD) pair, in one flat dict."""
    return {**openood_metrics(id_conf, ood_conf), **mixoe_metrics(id_conf, ood_conf, num_subsamples, seed)}
