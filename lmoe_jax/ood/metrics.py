"""OOD detection metrics, host-side numpy float64, from confidence scores (higher = more ID).

Two conventions, each named in the keys and function names:

* ``openood_*`` (OpenOOD v1.5, computed with scikit-learn as OpenOOD does): **OOD is the
  positive class** and ``-confidence`` its score. AUROC; FPR at 95% TPR (FPR of the first ROC
  point reaching TPR >= 0.95: the share of ID flagged OOD once 95% of OOD is caught); AUPR-In
  (ID positive, ``confidence``) and AUPR-Out (OOD positive, ``-confidence``), both
  ``sklearn.metrics.auc`` over ``precision_recall_curve`` (trapezoids, not average precision).
  A tied ID/OOD pair is one threshold, so it counts half in AUROC. One deliberate difference:
  the ROC curve keeps every threshold (``drop_intermediate=False``); OpenOOD's default drops
  collinear points, which can move FPR@95 (docs/evaluation.md gives the measured size).
* ``mixoe_*`` (MixOE, Zhang et al. WACV 2023): **ID is the positive class**, computed with the
  threshold walk of MixOE's evaluation (``calculate_log`` of Lee et al.): both sets sorted
  ascending and consumed one sample at a time, an ID sample first when an ID and an OOD score
  are equal. Hence a tied pair earns no AUROC credit (constant scores: AUROC 0); TNR@95 is read
  at the first walk point whose TPR is nearest 0.95 (among equals, the one that has rejected the
  fewest OOD: the higher FPR); the precision-recall curve runs from (recall 1, precision 0.5) to
  (recall 0, precision 0). Each metric is the mean (and population std) over 10 random
  equal-size subsamples, drawn with Python's ``random.Random(seed).sample`` as MixOE does, from
  the scores sorted first so that the draw depends only on the values, not on their order.

All functions return fractions in [0, 1].
"""
import random
from typing import Dict, Tuple

import numpy as np
from sklearn import metrics as sk_metrics

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


def _ood_labels(id_conf: np.ndarray, ood_conf: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(is_ood, conf) over the concatenation ID then OOD."""
    return np.r_[np.zeros(len(id_conf), bool), np.ones(len(ood_conf), bool)], np.r_[id_conf, ood_conf]


def roc_curve(is_pos, score) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of sklearn with every threshold kept, starting at (0, 0)."""
    is_pos = np.asarray(is_pos, bool)
    if is_pos.all() or not is_pos.any():
        raise ValueError('a ROC curve needs both classes; got only one.')
    return sk_metrics.roc_curve(is_pos, np.asarray(score, np.float64), drop_intermediate=False)


def _pr_area(is_pos: np.ndarray, score: np.ndarray) -> float:
    precision, recall, _ = sk_metrics.precision_recall_curve(is_pos, score)
    return float(sk_metrics.auc(recall, precision))


# ----------------------------------------------------------------------------- OpenOOD


def _openood_roc(id_conf, ood_conf):
    is_ood, conf = _ood_labels(*_check_pair(id_conf, ood_conf))
    return roc_curve(is_ood, -conf)[:2]


def openood_auroc(id_conf, ood_conf) -> float:
    """AUROC, OOD positive (the same value with ID positive); a tied pair counts half."""
    return float(sk_metrics.auc(*_openood_roc(id_conf, ood_conf)))


def openood_fpr_at_95_tpr(id_conf, ood_conf, recall_level: float = RECALL_LEVEL) -> float:
    """FPR (share of ID flagged OOD) at the first ROC point catching >= 95% of OOD."""
    fpr, tpr = _openood_roc(id_conf, ood_conf)
    return float(fpr[np.argmax(tpr >= recall_level)])


def openood_metrics(id_conf, ood_conf) -> Dict[str, float]:
    """Keys ``openood_auroc``, ``openood_fpr95``, ``openood_aupr_in``, ``openood_aupr_out``."""
    is_ood, conf = _ood_labels(*_check_pair(id_conf, ood_conf))
    return {'openood_auroc': openood_auroc(id_conf, ood_conf),
            'openood_fpr95': openood_fpr_at_95_tpr(id_conf, ood_conf),
            'openood_aupr_in': _pr_area(~is_ood, conf),
            'openood_aupr_out': _pr_area(is_ood, -conf)}


# ----------------------------------------------------------------------------- MixOE


def mixoe_walk(id_conf, ood_conf) -> Tuple[np.ndarray, np.ndarray]:
    """Counts (tp, fp) of ID and OOD samples still accepted at each of the ``n + 1`` walk points.

    The walk raises the threshold one sample at a time through the merged ascending order, ID
    before OOD at equal scores; point 0 accepts everything, the last point nothing.
    """
    id_conf, ood_conf = _check_pair(id_conf, ood_conf)
    is_ood, conf = _ood_labels(id_conf, ood_conf)
    order = np.lexsort((is_ood, conf))  # by score, then ID (False) before OOD (True)
    rejected_ood = np.r_[0, np.cumsum(is_ood[order])]
    rejected_id = np.arange(len(conf) + 1) - rejected_ood
    return len(id_conf) - rejected_id, len(ood_conf) - rejected_ood


def _trapezoid_area(y: np.ndarray, x: np.ndarray) -> float:
    """Area under y(x) for x decreasing along the arrays (the walk's direction)."""
    return float(-np.trapezoid(y, x))


def mixoe_single(id_conf, ood_conf, recall_level: float = RECALL_LEVEL) -> Dict[str, float]:
    """MixOE's TNR@95TPR, AUROC and AUPR-In of one (ID, OOD) pair, from :func:`mixoe_walk`."""
    tp, fp = mixoe_walk(id_conf, ood_conf)
    n_id, n_ood = tp[0], fp[0]
    tpr, fpr = tp / n_id, fp / n_ood
    nearest = np.argmin(np.abs(tpr - recall_level))  # the first (lowest threshold) among equals
    tpr_ends, fpr_ends = np.r_[1.0, tpr, 0.0], np.r_[1.0, fpr, 0.0]
    accepted = tp + fp
    keep = np.r_[True, accepted > 0, True]  # the final point accepts nothing: no precision there
    precision = np.r_[0.5, tp / np.maximum(accepted, 1), 0.0]
    return {'mixoe_tnr95': float(1.0 - fpr[nearest]),
            'mixoe_auroc': _trapezoid_area(1.0 - fpr_ends, tpr_ends),
            'mixoe_aupr_in': _trapezoid_area(precision[keep], tpr_ends[keep])}


def mixoe_metrics(id_conf, ood_conf, num_subsamples: int = 10, seed: int = 0) -> Dict[str, float]:
    """MixOE protocol: mean and population std over ``num_subsamples`` draws without replacement,
    both sets cut to ``min(len(id), len(ood))``. Keys ``mixoe_tnr95``, ``mixoe_auroc``,
    ``mixoe_aupr_in`` and each with ``_std``."""
    id_conf, ood_conf = _check_pair(id_conf, ood_conf)
    if num_subsamples < 1:
        raise ValueError(f'num_subsamples must be >= 1; got {num_subsamples}.')
    size = min(len(id_conf), len(ood_conf))
    draw = random.Random(seed)
    id_list, ood_list = np.sort(id_conf).tolist(), np.sort(ood_conf).tolist()
    runs = [mixoe_single(draw.sample(id_list, size), draw.sample(ood_list, size))
            for _ in range(num_subsamples)]
    out = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        out[key], out[key + '_std'] = float(np.mean(values)), float(np.std(values))
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
