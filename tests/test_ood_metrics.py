"""OOD metrics against hand-worked examples, an independent loop of MixOE's walk, and sklearn."""
import random

import numpy as np
import pytest
from sklearn import metrics as sk

from lmoe_jax.ood import metrics as M


def walk_reference(known, novel):
    """MixOE's rule written as a plain loop (calculate_log): both sorted ascending; at each step
    the lower of the two next scores is rejected, the ID one when they are equal. Returns the
    (tp, fp) = (ID, OOD) counts still accepted before the first and after every step."""
    known, novel = sorted(known), sorted(novel)
    k = n = 0
    points = [(len(known), len(novel))]
    while k < len(known) or n < len(novel):
        if n < len(novel) and (k == len(known) or novel[n] < known[k]):
            n += 1
        else:
            k += 1
        points.append((len(known) - k, len(novel) - n))
    return points


def metrics_from_walk(points):
    """TNR@95, AUROC and AUPR-In from walk points, following MixOE's formulas step by step."""
    n_id, n_ood = points[0]
    gaps = [abs(tp / n_id - 0.95) for tp, _ in points]
    first_nearest = gaps.index(min(gaps))
    tnr = 1 - points[first_nearest][1] / n_ood
    tpr = [1.0] + [tp / n_id for tp, _ in points] + [0.0]
    tnr_curve = [0.0] + [1 - fp / n_ood for _, fp in points] + [1.0]
    auroc = sum((tpr[i] - tpr[i + 1]) * (tnr_curve[i] + tnr_curve[i + 1]) / 2 for i in range(len(tpr) - 1))
    pr = [(1.0, 0.5)] + [(tp / n_id, tp / (tp + fp)) for tp, fp in points if tp + fp > 0] + [(0.0, 0.0)]
    aupr = sum((pr[i][0] - pr[i + 1][0]) * (pr[i][1] + pr[i + 1][1]) / 2 for i in range(len(pr) - 1))
    return {'mixoe_tnr95': tnr, 'mixoe_auroc': auroc, 'mixoe_aupr_in': aupr}


def assert_close(got, want, tol=1e-12):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol), key


# ----------------------------------------------------------------------------- MixOE, by hand


def test_mixoe_hand_worked_with_a_tie():
    # ID {.9, .8, .4}, OOD {.7, .4, .1}. Merged ascending, ID first at the tie:
    #   .1(O) .4(I) .4(O) .7(O) .8(I) .9(I)
    # (tp, fp) accepted: (3,3) (3,2) (2,2) (2,1) (2,0) (1,0) (0,0)
    ids, oods = [0.9, 0.8, 0.4], [0.7, 0.4, 0.1]
    tp, fp = M.mixoe_walk(ids, oods)
    assert list(zip(tp, fp)) == [(3, 3), (3, 2), (2, 2), (2, 1), (2, 0), (1, 0), (0, 0)]
    got = M.mixoe_single(ids, oods)
    # TPR nearest .95 is 1.0 at (3,3) and (3,2): the first, (3,3), has FPR 1 -> TNR 0
    assert got['mixoe_tnr95'] == pytest.approx(0.0)
    # pairs with ID strictly above OOD: .9 and .8 beat all 3, .4 beats .1 only; the tie earns 0
    assert got['mixoe_auroc'] == pytest.approx(7 / 9)
    # PR points (TPR, precision): start (1, .5); walk (1, 3/6) (1, 3/5) (2/3, 2/4) (2/3, 2/3)
    # (2/3, 1) (1/3, 1); (0,0) accepts nothing and is skipped; end (0, 0).
    # Area: 1/3 * (3/5 + 1/2)/2 + 1/3 * (1 + 1)/2 + 1/3 * (1 + 0)/2 = 11/60 + 1/3 + 1/6
    assert got['mixoe_aupr_in'] == pytest.approx(41 / 60)
    # OpenOOD on the same scores: half credit for the tie
    assert M.openood_auroc(ids, oods) == pytest.approx(7.5 / 9)


def test_mixoe_constant_scores():
    # all 0.5: ID rejected first -> (2,2) (1,2) (0,2) (0,1) (0,0)
    got = M.mixoe_single([0.5, 0.5], [0.5, 0.5])
    assert got['mixoe_tnr95'] == pytest.approx(0.0)  # nearest .95 is TPR 1 at FPR 1
    assert got['mixoe_auroc'] == pytest.approx(0.0)  # every pair tied: no credit
    # PR: (1, .5) (1, 2/4) (1/2, 1/3) (0, 0/2) (0, 0/1) (0, 0): 1/2 * (1/2 + 1/3)/2 + 1/2 * (1/3)/2
    assert got['mixoe_aupr_in'] == pytest.approx(7 / 24)
    assert M.openood_auroc([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.5)


def test_mixoe_separated_and_reversed():
    # separated: OOD {1, 2} below ID {3, 4}: (2,2) (2,1) (2,0) (1,0) (0,0)
    sep = M.mixoe_single([3.0, 4.0], [1.0, 2.0])
    assert sep['mixoe_auroc'] == pytest.approx(1.0)
    assert sep['mixoe_tnr95'] == pytest.approx(0.0)  # TPR 1 is first reached at (2,2): FPR 1
    # PR: (1, .5) (1, .5) (1, 2/3) (1, 1) (1/2, 1) (0, 0): 1/2 * 1 + 1/2 * (1 + 0)/2
    assert sep['mixoe_aupr_in'] == pytest.approx(0.75)
    # reversed: the same walk as constant scores
    rev = M.mixoe_single([1.0, 2.0], [3.0, 4.0])
    assert rev == pytest.approx({'mixoe_tnr95': 0.0, 'mixoe_auroc': 0.0, 'mixoe_aupr_in': 7 / 24})
    # 20 separated ID scores: TPR 19/20 == .95 exactly, reached once all OOD are rejected
    assert M.mixoe_single(np.arange(20.0) + 10, [0.0, 1.0])['mixoe_tnr95'] == pytest.approx(1.0)


def test_mixoe_tnr_tie_break_takes_the_higher_fpr_point():
    # ID 1..20, OOD {0.5, 1.5}: walk O(.5) I(1) O(1.5) I(2) ...; TPR 19/20 = .95 holds at
    # (19, 1) and (19, 0); the first one reached, FPR 1/2, is kept -> TNR 1/2 (not 1)
    ids, oods = np.arange(1.0, 21.0), [0.5, 1.5]
    got = M.mixoe_single(ids, oods)
    assert got['mixoe_tnr95'] == pytest.approx(0.5)
    assert got['mixoe_auroc'] == pytest.approx(39 / 40)  # ID 1 beats only 0.5


@pytest.mark.parametrize('n_id,n_ood,decimals', [(50, 50, None), (40, 40, 0), (200, 30, 1), (7, 300, None)])
def test_mixoe_single_matches_the_loop_walk(n_id, n_ood, decimals):
    rng = np.random.default_rng(n_id + n_ood)
    ids, oods = rng.normal(1, 1, n_id), rng.normal(0, 1, n_ood)
    if decimals is not None:  # many ID/OOD ties
        ids, oods = np.round(ids, decimals), np.round(oods, decimals)
    assert_close(M.mixoe_single(ids, oods), metrics_from_walk(walk_reference(ids, oods)))


def test_mixoe_protocol_draws_like_mixoe():
    rng = np.random.default_rng(3)
    ids, oods = np.round(rng.normal(1, 1, 400), 1), rng.normal(0, 1, 60)
    got = M.mixoe_metrics(ids, oods, num_subsamples=10, seed=5)
    # reference: Python's random seeded once, 10 x (ID sample, OOD sample) of the smaller size,
    # drawn from the sorted scores, metrics by the loop walk; population std
    draw = random.Random(5)
    runs = [metrics_from_walk(walk_reference(draw.sample(sorted(ids.tolist()), 60),
                                             draw.sample(sorted(oods.tolist()), 60))) for _ in range(10)]
    for key in ('mixoe_tnr95', 'mixoe_auroc', 'mixoe_aupr_in'):
        values = [r[key] for r in runs]
        assert got[key] == pytest.approx(np.mean(values), abs=1e-12)
        assert got[key + '_std'] == pytest.approx(np.std(values), abs=1e-12)
    assert got['mixoe_auroc_std'] > 0
    # the draw depends on the values only, not their order (N processes gather in another order)
    assert M.mixoe_metrics(ids[::-1], rng.permutation(oods), seed=5) == got
    # equal sizes: every subsample is the whole set -> no spread
    same = M.mixoe_metrics(ids[:60], oods, num_subsamples=4)
    assert same['mixoe_auroc'] == pytest.approx(M.mixoe_single(ids[:60], oods)['mixoe_auroc'])
    assert same['mixoe_auroc_std'] == pytest.approx(0.0, abs=1e-15)


def test_saturated_msp_like_scores_differ_between_conventions():
    # 30% of ID and 5% of OOD at exactly 1.0 (a float32 softmax): MixOE gives those ties no credit
    rng = np.random.default_rng(0)
    ids = np.where(rng.random(2000) < 0.3, 1.0, rng.uniform(0.5, 1.0, 2000))
    oods = np.where(rng.random(2000) < 0.05, 1.0, rng.uniform(0.2, 1.0, 2000))
    mixoe = M.mixoe_single(ids, oods)
    assert_close(mixoe, metrics_from_walk(walk_reference(ids, oods)))
    n_tied_pairs = np.sum(ids == 1.0) * np.sum(oods == 1.0)
    assert M.openood_auroc(ids, oods) - mixoe['mixoe_auroc'] == pytest.approx(0.5 * n_tied_pairs / 2000 ** 2)


# ----------------------------------------------------------------------------- OpenOOD


def test_openood_hand_worked_with_a_tie():
    ids, oods = [0.9, 0.8, 0.4], [0.7, 0.4, 0.1]
    got = M.openood_metrics(ids, oods)
    assert got['openood_auroc'] == pytest.approx(7.5 / 9)  # 7 pairs won, 1 tie counted half
    # OOD positive, thresholds on conf ascending: .1 -> TPR 1/3, FPR 0; .4 -> 2/3, 1/3; .7 -> 1, 1/3
    assert got['openood_fpr95'] == pytest.approx(1 / 3)
    # ID positive PR points (R, P): (1/3, 1) (2/3, 1) (2/3, 2/3) (1, 3/5) (1, 1/2) plus (0, 1)
    assert got['openood_aupr_in'] == pytest.approx(1 / 3 + 1 / 3 + (1 / 3) * (3 / 5 + 2 / 3) / 2)
    # OOD positive: (1/3, 1) (2/3, 2/3) (1, 3/4) (1, 3/5) (1, 1/2) plus (0, 1)
    assert got['openood_aupr_out'] == pytest.approx(1 / 3 + (1 / 3) * (1 + 2 / 3) / 2 + (1 / 3) * (2 / 3 + 3 / 4) / 2)


def test_openood_constant_separated_reversed():
    const = M.openood_metrics(np.full(30, 0.5), np.full(10, 0.5))
    assert const['openood_auroc'] == pytest.approx(0.5) and const['openood_fpr95'] == pytest.approx(1.0)
    assert const['openood_aupr_in'] == pytest.approx((1 + 30 / 40) / 2)  # base rate, then (0, 1)
    assert const['openood_aupr_out'] == pytest.approx((1 + 10 / 40) / 2)
    sep = M.openood_metrics([3.0, 4.0, 5.0], [0.0, 1.0])
    assert sep == pytest.approx({'openood_auroc': 1.0, 'openood_fpr95': 0.0, 'openood_aupr_in': 1.0,
                                 'openood_aupr_out': 1.0})
    rev = M.openood_metrics([0.0, 1.0], [3.0, 4.0, 5.0])
    assert rev['openood_auroc'] == 0.0 and rev['openood_fpr95'] == 1.0


def test_openood_recipe_and_the_drop_intermediate_difference():
    rng = np.random.default_rng(7)
    ids, oods = np.round(rng.normal(1, 1, 300)), np.round(rng.normal(0, 1, 200))
    is_ood, conf = np.r_[np.zeros(300), np.ones(200)], np.r_[ids, oods]
    fpr, tpr, _ = sk.roc_curve(is_ood, -conf)  # OpenOOD's call: drop_intermediate=True
    got = M.openood_metrics(ids, oods)
    assert got['openood_auroc'] == pytest.approx(sk.auc(fpr, tpr), abs=1e-12)  # same area
    p, r, _ = sk.precision_recall_curve(1 - is_ood, conf)
    assert got['openood_aupr_in'] == pytest.approx(sk.auc(r, p), abs=1e-12)
    # FPR@95: the first point with TPR >= .95 of the full curve; OpenOOD's thinned curve can
    # only reach it at the same or a later point
    full_fpr, full_tpr, _ = sk.roc_curve(is_ood, -conf, drop_intermediate=False)
    assert got['openood_fpr95'] == full_fpr[np.argmax(full_tpr >= 0.95)]
    assert fpr[np.argmax(tpr >= 0.95)] >= got['openood_fpr95']


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
    for fn in (M.openood_metrics, M.openood_auroc, M.openood_fpr_at_95_tpr, M.mixoe_single, M.mixoe_metrics):
        with pytest.raises(ValueError, match=match):
            fn(ids, oods)


def test_single_class_curves_are_rejected():
    with pytest.raises(ValueError, match='both classes'):
        M.roc_curve(np.ones(4, bool), np.arange(4.0))
