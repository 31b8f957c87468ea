"""The leave-classes-out selection rule and its rank agreement, on hand-made study records."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'benchmarks'))
import selection_signal as ss  # noqa: E402


def _record(variant, seed, *, diag_fpr=None, test_fpr=None, val_acc=None, outlier_fpr=None):
    r = {'variant': variant, 'seed': seed}
    if diag_fpr is not None:
        r['fine_diag'] = {'msp/fine_fpr95': diag_fpr}
    if test_fpr is not None:
        r['test'] = {'msp/fine_fpr95': test_fpr}
    if val_acc is not None:
        r['val'] = {'id_acc': val_acc}
    if outlier_fpr is not None:
        r.setdefault('val', {})['msp/outlier_fpr95'] = outlier_fpr
    return r


def test_lco_signal_is_the_fold_mean_of_pairs_every_fold_has():
    fold_a = [_record('oe', 0, diag_fpr=0.5), _record('oe', 1, diag_fpr=0.7), _record('lmoe', 0, diag_fpr=0.2)]
    fold_b = [_record('oe', 0, diag_fpr=0.3), _record('lmoe', 0, diag_fpr=0.4), _record('lmoe', 1, diag_fpr=0.9)]
    signal = ss.lco_signal([fold_a, fold_b])
    assert set(signal) == {'oe', 'lmoe'}
    assert signal['oe'] == {0: 40.0} and signal['lmoe'] == {0: 30.0}  # x100; seed 1 lacks a fold


def _tables(fpr, acc):
    signal = {v: dict(enumerate(vals)) for v, vals in fpr.items()}
    id_acc = {v: dict(enumerate(vals)) for v, vals in acc.items()}
    return signal, id_acc


def test_rule_takes_a_resolved_leader_and_keeps_the_incumbent_otherwise():
    acc = {'baseline': [95, 95, 95], 'mixoe_mixup': [95, 95, 95], 'a': [95, 95, 95], 'b': [90, 90, 90]}
    seeds = [0, 1, 2]
    # 'a' is 10 points better in every seed (differences -10, -11, -9): resolved
    signal, id_acc = _tables({'mixoe_mixup': [60, 61, 59], 'a': [50, 50, 50], 'b': [10, 10, 10]}, acc)
    chosen = ss.select(signal, id_acc, ['a', 'b'], seeds)
    assert chosen['leader'] == chosen['variant'] == 'a'
    assert 'b' not in chosen['eligible']  # 5 points of ID val accuracy lost: not eligible
    d = np.array([-10.0, -11.0, -9.0])  # the paired interval by hand: mean -10, std 1, t(0.975, 2)
    half = 4.302652729911275 * 1.0 / np.sqrt(3)
    assert np.isclose(chosen['leader_vs_incumbent']['hi'], d.mean() + half)
    # lower on average but not in every seed: the interval spans 0, MixOE stays
    signal, id_acc = _tables({'mixoe_mixup': [60, 40, 50], 'a': [45, 52, 49], 'b': [10, 10, 10]}, acc)
    chosen = ss.select(signal, id_acc, ['a', 'b'], seeds)
    assert chosen['leader'] == 'a' and chosen['variant'] == 'mixoe_mixup'
    # the incumbent loses 5 points of ID val accuracy: it is not eligible and the leader is
    # taken even though its interval spans 0
    acc_low = {**acc, 'mixoe_mixup': [90, 90, 90]}
    signal, id_acc = _tables({'mixoe_mixup': [60, 40, 50], 'a': [45, 52, 49], 'b': [10, 10, 10]}, acc_low)
    chosen = ss.select(signal, id_acc, ['a', 'b'], seeds)
    assert chosen['eligible'] == ['a'] and chosen['variant'] == 'a'
    # a seed missing: no choice yet
    signal['a'].pop(2)
    assert ss.select(signal, id_acc, ['a', 'b'], seeds) is None


def _spearman_by_hand(x, y):
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # no ties in these data
    return float(np.corrcoef(rank(np.asarray(x)), rank(np.asarray(y)))[0, 1])


def test_agreement_is_spearman_of_seed_means_with_a_seed_bootstrap():
    rng = np.random.default_rng(0)
    variants, seeds = ['v%d' % i for i in range(6)], [0, 1, 2, 3]
    base = np.arange(6) * 5.0
    signal = {v: {s: base[i] + rng.normal(0, 3) for s in seeds} for i, v in enumerate(variants)}
    target = {v: {s: -base[i] + rng.normal(0, 3) for s in seeds} for i, v in enumerate(variants)}
    a = ss.agreement(signal, target, variants, seeds, n_boot=300)
    means = lambda t: [np.mean([t[v][s] for s in seeds]) for v in variants]
    assert np.isclose(a['rho'], _spearman_by_hand(means(signal), means(target)))
    assert a['rho'] < -0.8 and a['lo'] <= a['rho'] <= a['hi'] and a['hi'] < 0
    for s in seeds:
        assert np.isclose(a['per_seed'][s], _spearman_by_hand([signal[v][s] for v in variants],
                                                              [target[v][s] for v in variants]))
    same = ss.agreement(signal, signal, variants, seeds, n_boot=50)
    assert same['rho'] == same['lo'] == same['hi'] == 1.0


def test_report_reads_study_records():
    main = [_record(v, s, test_fpr=t / 100, val_acc=0.95) for s in (0, 1)
            for v, t in (('baseline', 70), ('mixoe_mixup', 60), ('lmoe', 80))]
    folds = [[_record(v, s, diag_fpr=d / 100) for s in (0, 1)
              for v, d in (('baseline', 40), ('mixoe_mixup', 30), ('lmoe', 50))]]
    text = ss.report(main, folds)
    assert '| mixoe_mixup | 30.00 ± 0.00 | 60.00 ± 0.00 |' in text
    assert 'Spearman rho (variant means, LCO vs test): 1.000' in text
    assert 'chosen: **mixoe_mixup**' in text


def test_report_compares_lco_with_the_main_studys_own_signals():
    # test order baseline < mixoe < lmoe < oe; held-out outliers rank them in reverse; the main
    # run's fine_diag has no records, so that comparison line is left out, not made up
    tests = {'baseline': 50, 'mixoe_mixup': 60, 'lmoe': 70, 'oe': 80}
    main = [_record(v, s, test_fpr=t / 100, val_acc=0.95, outlier_fpr=(100 - t) / 100)
            for s in (0, 1) for v, t in tests.items()]
    folds = [[_record(v, s, diag_fpr=t / 200) for s in (0, 1) for v, t in tests.items()]]
    text = ss.report(main, folds)
    assert 'Spearman rho (variant means, LCO vs test): 1.000' in text
    assert '- for comparison, held-out outliers (val, MSP FPR@95) vs test: -1.000' in text
    assert 'fine_diag (test classes' not in text


def test_report_gives_each_folds_own_agreement():
    # two folds that rank the variants in opposite orders: the fold mean hides it, the per-fold
    # lines show it (one fold +1, the other -1)
    tests = {'baseline': 50, 'mixoe_mixup': 60, 'lmoe': 70}
    main = [_record(v, s, test_fpr=t / 100, val_acc=0.95) for s in (0, 1) for v, t in tests.items()]
    agree = [dict(_record(v, s, diag_fpr=t / 1000), protocol={'leave_out': [8, 9]})
             for s in (0, 1) for v, t in tests.items()]
    oppose = [dict(_record(v, s, diag_fpr=(300 - 2 * t) / 1000), protocol={'leave_out': [0, 2]})
              for s in (0, 1) for v, t in tests.items()]
    text = ss.report(main, [agree, oppose])
    assert '- fold [8, 9] alone vs test: 1.000' in text
    assert '- fold [0, 2] alone vs test: -1.000' in text
    assert '- fold' not in ss.report(main, [agree])  # one fold: nothing to split
