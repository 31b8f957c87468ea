"""OOD metrics against scikit-learn and hand-worked examples (ties, constants, imbalance)."""
import numpy as np
import pytest
from sklearn import metrics as sk

from lmoe_jax.ood import metrics as M


def sk_openood(id_conf, ood_conf):
    """OpenOOD v1.5 recipe written with sklearn, full curves (drop_intermediate=False)."""
    is_ood = np.r_[np.zeros(len(id_conf)), np.ones(len(ood_conf))]
    conf = np.r_[id_conf, ood_conf]
    fpr, tpr, _ = sk.roc_curve(is_ood, -conf, drop_intermediate=False)
    p_in, r_in, _ = sk.precision_recall_curve(1 - is_ood, conf)
    p_out, r_out, _ = sk.precision_recall_curve(is_ood, -conf)
    return {'openood_auroc': sk.auc(fpr, tpr),
            'openood_fpr95': fpr[np.argmax(tpr >= 0.95)],
            'openood_aupr_in': sk.auc(r_in, p_in),
            'openood_aupr_out': sk.auc(r_out, p_out)}


def sk_mixoe_single(id_conf, ood_conf):
    is_id = np.r_[np.ones(len(id_conf)), np.zeros(len(ood_conf))]
    conf = np.r_[id_conf, ood_conf]
    fpr, tpr, _ = sk.roc_curve(is_id, conf, drop_intermediate=False)
    gap = np.abs(tpr - 0.95)
    idx = np.flatnonzero(gap == gap.min())[0]  # thresholds decrease: the first is the highest
    p, r, _ = sk.precision_recall_curve(is_id, conf)
    return {'mixoe_tnr95': 1 - fpr[idx], 'mixoe_auroc': sk.roc_auc_score(is_id, conf),
            'mixoe_aupr_in': sk.auc(r, p)}


def test_hand_worked_example_with_a_tie():
    # ID {.9, .8, .4}, OOD {.7, .4, .1}: worked out on paper (see comments).
    ids, oods = [0.9, 0.8, 0.4], [0.7, 0.4, 0.1]
    # 9 ID/OOD pairs: 7 won, 1 tie (0.4 vs 0.4) -> (7 + 0.5) / 9
    assert M.openood_auroc(ids, oods) == pytest.approx(7.5 / 9)
    assert M.mixoe_auroc(ids, oods) == pytest.approx(7.5 / 9)
    # OOD positive, thresholds on conf ascending: .1 -> tpr 1/3, fpr 0; .4 -> 2/3, 1/3; .7 -> 1, 1/3
    assert M.openood_fpr_at_95_tpr(ids, oods) == pytest.approx(1 / 3)
    # ID positive PR points (R, P): (1/3, 1) (2/3, 1) (2/3, 2/3) (1, 3/5) (1, 1/2) plus (0, 1)
    assert M.openood_aupr_in(ids, oods) == pytest.approx(1 / 3 + 1 / 3 + (1 / 3) * (3 / 5 + 2 / 3) / 2)
    # OOD positive: (1/3, 1) (2/3, 2/3) (1, 3/4) (1, 3/5) (1, 1/2) plus (0, 1)
    assert M.openood_aupr_out(ids, oods) == pytest.approx(
        1 / 3 + (1 / 3) * (1 + 2 / 3) / 2 + (1 / 3) * (2 / 3 + 3 / 4) / 2)
    # ID positive ROC: TPR nearest .95 is 1.0, reached at thresholds .4 (fpr 2/3) and .1 (fpr 1);
    # the highest of them wins -> TNR 1/3
    assert M.mixoe_tnr_at_95_tpr(ids, oods) == pytest.approx(1 / 3)


def test_perfect_separation_and_reversed():
    ids, oods = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0])
    assert M.openood_auroc(ids, oods) == 1.0
    assert M.openood_fpr_at_95_tpr(ids, oods) == 0.0
    assert M.openood_aupr_in(ids, oods) == 1.0
    assert M.openood_aupr_out(ids, oods) == 1.0
    assert M.mixoe_tnr_at_95_tpr(ids, oods) == 1.0
    assert M.openood_auroc(oods, ids) == 0.0
    assert M.openood_fpr_at_95_tpr(oods, ids) == 1.0


@pytest.mark.parametrize('n_id,n_ood,ties', [(200, 150, False), (500, 7, False), (6, 400, False),
                                             (300, 300, True), (1000, 30, True)])
def test_openood_matches_sklearn(n_id, n_ood, ties):
    rng = np.random.default_rng(n_id * 7 + n_ood)
    ids = rng.normal(1.0, 1.0, n_id)
    oods = rng.normal(0.0, 1.0, n_ood)
    if ties:  # few distinct values: many ID/OOD ties
        ids, oods = np.round(ids), np.round(oods)
    got = M.openood_metrics(ids, oods)
    want = sk_openood(ids, oods)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    single = sk_mixoe_single(ids, oods)
    assert M.mixoe_tnr_at_95_tpr(ids, oods) == pytest.approx(single['mixoe_tnr95'], abs=1e-12)
    assert M.mixoe_auroc(ids, oods) == pytest.approx(single['mixoe_auroc'], abs=1e-12)
    assert M.mixoe_aupr_in(ids, oods) == pytest.approx(single['mixoe_aupr_in'], abs=1e-12)


def test_constant_scores():
    ids, oods = np.full(30, 0.5), np.full(10, 0.5)
    assert M.openood_auroc(ids, oods) == pytest.approx(0.5)
    assert M.openood_fpr_at_95_tpr(ids, oods) == pytest.approx(1.0)
    # one threshold: precision = base rate at recall 1, then the (0, 1) end point
    assert M.openood_aupr_in(ids, oods) == pytest.approx((1 + 30 / 40) / 2)
    assert M.openood_aupr_out(ids, oods) == pytest.approx((1 + 10 / 40) / 2)
    want = sk_openood(ids, oods)
    assert M.openood_aupr_in(ids, oods) == pytest.approx(want['openood_aupr_in'])
    assert M.mixoe_tnr_at_95_tpr(ids, oods) == pytest.approx(0.0)  # one point: accept everything


def test_mixoe_protocol_subsamples_equal_size():
    rng = np.random.default_rng(3)
    ids, oods = rng.normal(1, 1, 400), rng.normal(0, 1, 60)
    got = M.mixoe_metrics(ids, oods, num_subsamples=10, seed=5)
    # reference: the documented protocol, metrics by sklearn
    draw = np.random.default_rng(5)
    runs = []
    for _ in range(10):
        a = draw.choice(ids, 60, replace=False)
        b = draw.choice(oods, 60, replace=False)
        runs.append(sk_mixoe_single(a, b))
    for key in ('mixoe_tnr95', 'mixoe_auroc', 'mixoe_aupr_in'):
        vals = [r[key] for r in runs]
        assert got[key] == pytest.approx(np.mean(vals), abs=1e-12)
        assert got[key + '_std'] == pytest.approx(np.std(vals), abs=1e-12)
    assert got['mixoe_auroc_std'] > 0
    # equal sizes: every subsample is a permutation of the full sets -> no spread
    same = M.mixoe_metrics(ids[:60], oods, num_subsamples=4)
    assert same['mixoe_auroc'] == pytest.approx(M.mixoe_auroc(ids[:60], oods))
    assert same['mixoe_auroc_std'] == pytest.approx(0.0, abs=1e-15)
    # seeded: repeatable
    assert M.mixoe_metrics(ids, oods, seed=5) == M.mixoe_metrics(ids, oods, seed=5)


def test_top1_accuracy():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert M.top1_accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)
    assert M.top1_accuracy(np.array([1, 1]), np.array([1, 0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match='labels'):
        M.top1_accuracy(logits, [0, 1])


@pytest.mark.parametrize('ids,oods,match', [
    ([0.1, np.nan], [0.2], 'NaN'),
    ([0.1, 0.2], [np.inf], 'NaN/inf'),
    ([], [0.3], 'empty'),
    ([0.3], [], 'empty'),
    (np.ones((2, 2)), [0.3], '1-D'),
])
def test_invalid_input_is_a_clear_error(ids, oods, match):
    for fn in (M.openood_auroc, M.openood_fpr_at_95_tpr, M.openood_aupr_in, M.openood_aupr_out,
               M.mixoe_tnr_at_95_tpr, M.mixoe_metrics):
        with pytest.raises(ValueError, match=match):
            fn(ids, oods)


def test_single_class_curves_are_rejected():
    with pytest.raises(ValueError, match='both classes'):
        M.roc_curve(np.ones(4, bool), np.arange(4.0))
    with pytest.raises(ValueError, match='both classes'):
        M.precision_recall_curve(np.zeros(4, bool), np.arange(4.0))
