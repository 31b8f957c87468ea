"""The method study's decisions: paired intervals, the clean selection of the lmoe candidate,
the run order, the pairing of its variants (same stage-1 checkpoint, batches and lam), and the
FPR@95 decomposition of benchmarks/score_analysis.py."""
import hashlib
import json
import math
import os

import numpy as np
import pytest

from benchmarks import compare_methods as cm
from benchmarks import score_analysis as sa
from lmoe_jax import losses
from lmoe_jax.ood import metrics


def test_paired_stats_hand_worked_t_interval():
    # diffs 2, 3, 2: mean 7/3, sample std sqrt(1/3); t(0.975, df=2) = 4.302652729749464 (tables)
    stats = cm.paired_stats({0: 3.0, 1: 5.0, 2: 4.0, 7: 9.0}, {0: 1.0, 1: 2.0, 2: 2.0}, True)
    half = 4.302652729749464 * math.sqrt(1 / 3) / math.sqrt(3)
    assert stats['n'] == 3 and stats['wins'] == 3
    assert stats['mean'] == pytest.approx(7 / 3, abs=1e-12)
    assert stats['std'] == pytest.approx(math.sqrt(1 / 3), abs=1e-12)
    assert stats['lo'] == pytest.approx(7 / 3 - half, abs=1e-9)
    assert stats['hi'] == pytest.approx(7 / 3 + half, abs=1e-9)
    assert cm.paired_stats({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 2.0}, False)['wins'] == 0
    one = cm.paired_stats({0: 1.0}, {0: 0.5}, True)
    assert one['n'] == 1 and math.isnan(one['lo']) and cm._diff_cell(one) == '+0.50 (1/1)'


def _record(seed, variant, auroc, acc):
    return {'seed': seed, 'variant': variant, 'val': {'msp/outlier_auroc': auroc, 'id_acc': acc}}


def test_selection_reads_validation_only_and_respects_the_accuracy_guard():
    seeds = [0, 1]
    aurocs = {'lmoe': 0.80, 'lmoe:kl': 0.82, 'lmoe:consistency0.1': 0.79,
              'lmoe:consistency3': 0.90, 'lmoe:logit_mix1': 0.81, 'lmoe:+input_mix5': 0.78}
    records = [_record(s, 'baseline', 0.70, 0.950) for s in seeds]
    for name, auroc in aurocs.items():
        # consistency3 has the best AUROC but loses 1.5 points of ID val accuracy: not eligible
        acc = 0.935 if name == 'lmoe:consistency3' else 0.948
        records += [_record(s, name, auroc + 0.01 * s, acc) for s in seeds]
    # test-set numbers that would pick another candidate must not matter
    for r in records:
        r['test'] = {'msp/fine_auroc': 0.99 if r['variant'] == 'lmoe:logit_mix1' else 0.5}
    chosen = cm.select_lmoe(records, seeds)
    # kl leads lmoe by +2.00 in both seeds: std 0, the interval is [2, 2], above 0 -> replaces it
    assert chosen['leader'] == chosen['variant'] == 'lmoe:kl'
    assert chosen['auroc']['lmoe:kl'] == pytest.approx(100 * 0.825)
    assert chosen['leader_vs_lmoe']['lo'] == pytest.approx(2.0)
    assert 'lmoe:consistency3' not in chosen['eligible']
    assert cm.select_lmoe(records[:-1], seeds) is None  # a candidate misses a seed: no choice yet
    text, pick = cm.selection_table(records)
    assert pick['variant'] == 'lmoe:kl' and '**chosen**' in text


def test_selection_keeps_the_preset_when_the_lead_is_inside_the_seed_noise():
    seeds = [0, 1, 2]
    records = [_record(s, 'baseline', 0.70, 0.95) for s in seeds]
    for name in cm.LMOE_CANDIDATES:
        records += [_record(s, name, 0.80, 0.95) for s in seeds]
    # kl leads by +1.0 on average (+4, -1, 0 points): t interval [-5.6, 7.6] holds 0
    for r, delta in zip([r for r in records if r['variant'] == 'lmoe:kl'], (0.04, -0.01, 0.0)):
        r['val']['msp/outlier_auroc'] += delta
    chosen = cm.select_lmoe(records, seeds)
    assert chosen['leader'] == 'lmoe:kl' and chosen['variant'] == 'lmoe'
    assert chosen['leader_vs_lmoe']['mean'] == pytest.approx(1.0)
    assert chosen['leader_vs_lmoe']['lo'] < 0 < chosen['leader_vs_lmoe']['hi']


def test_plan_runs_the_ablation_seeds_first_then_the_main_variants_elsewhere():
    names = ['baseline', 'lmoe', 'lmoe:kl']
    order = cm.plan(names, seeds=[0, 1, 2], ablation_seeds=[0, 1])
    assert order == [(0, 'stage1'), (1, 'stage1'), (0, 'baseline'), (1, 'baseline'), (0, 'lmoe'),
                     (1, 'lmoe'), (0, 'lmoe:kl'), (1, 'lmoe:kl'),
                     (2, 'stage1'), (2, 'baseline'), (2, 'lmoe')]


def test_study_variants_are_the_issue_ablation():
    reconstruction = {'logit_mix': 5.0, 'consistency': 1.0, 'consistency_kind': 'mse',
                      'input_mix': 0.0, 'mix': 'mixup', 'alpha': 1.0, 'lam_per_example': False,
                      'stop_gradient': 'none'}
    assert cm.VARIANTS['lmoe'] == ('lmoe', reconstruction)  # pinned, whatever the preset says
    changes = {n: {k: v for k, v in o.items() if reconstruction.get(k) != v}
               for n, (_, o) in cm.ABLATION.items()}
    assert changes == {
        'lmoe:logit_mix_only': {'consistency': 0.0}, 'lmoe:consistency_only': {'logit_mix': 0.0},
        'lmoe:kl': {'consistency_kind': 'kl'}, 'lmoe:consistency0.1': {'consistency': 0.1},
        'lmoe:consistency3': {'consistency': 3.0}, 'lmoe:logit_mix1': {'logit_mix': 1.0},
        'lmoe:+input_mix5': {'input_mix': 5.0}}
    # the study's choice is the library's preset
    chosen = losses.get_method(*cm.VARIANTS['lmoe:consistency0.1'])
    preset = losses.get_method('lmoe')
    assert chosen.weights == preset.weights
    assert (chosen.mix, chosen.alpha, chosen.lam_per_example) == (
        preset.mix, preset.alpha, preset.lam_per_example)
    assert set(cm.MAIN) == {'baseline', 'oe', 'energy_oe', 'mixoe_mixup', 'mixoe_cutmix', 'lmoe'}
    # issue 21's cap variants are the library's presets, and main variants (every seed)
    assert set(cm.CAP) == {'logit_mixoe', 'lmoe_sg', 'logit_mixoe_sg'}
    for name, (preset_name, overrides) in cm.CAP.items():
        pinned, library = losses.get_method(preset_name, overrides), losses.get_method(name)
        assert pinned.weights == library.weights, name
        assert (pinned.mix, pinned.alpha, pinned.lam_per_example) == (
            library.mix, library.alpha, library.lam_per_example), name
    assert losses.get_method('lmoe_sg').weights.logit_mix_stop_id
    assert losses.get_method('logit_mixoe').weights.input_mix == 5.0
    # seed 0 is not an ablation seed here: only a main variant runs on it
    assert (0, 'lmoe_sg') in cm.plan(['baseline', 'lmoe_sg'], seeds=[0, 1], ablation_seeds=[1])
    assert set(cm.LMOE_CANDIDATES) <= set(cm.ABLATION) | {'lmoe'}


def test_fpr95_decomposition_agrees_with_the_openood_metric():
    rng = np.random.default_rng(3)
    for n_id, n_ood in ((200, 40), (57, 301)):
        id_s = np.round(rng.normal(1.0, 1.0, n_id), 1)  # rounded: many ties
        ood_s = np.round(rng.normal(0.0, 1.0, n_ood), 1)
        t = sa.threshold_at_95(ood_s)
        assert np.mean(ood_s <= t) >= 0.95 and np.mean(ood_s < t) < 0.95
        fpr = float(np.mean(id_s <= t))
        assert fpr == pytest.approx(metrics.openood_fpr_at_95_tpr(id_s, ood_s), abs=1e-12)
        q = sa.id_quantile_of(id_s, ood_s)  # FPR@95 is the 95th percentile of q (order statistic)
        assert fpr == np.percentile(q, 95, method='inverted_cdf')
        assert np.all(np.diff(q[np.argsort(ood_s)]) >= 0)


def test_id_quantile_hand_worked():
    q = sa.id_quantile_of(np.array([1.0, 2.0, 2.0, 3.0]), np.array([0.5, 2.0, 2.5, 9.0]))
    np.testing.assert_array_equal(q, [0.0, 0.75, 0.75, 1.0])


def test_fill_tables_copies_the_generated_block_between_markers():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts',
                        'fill_tables.py')
    spec = importlib.util.spec_from_file_location('fill_tables', path)
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    source = ('**Main, TEST** x\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n'
              '**Selection** y\n\nRule text.\n\n| c |\n| --- |\n| 3 |\n\nafter\n')
    doc = ('intro\n<!-- table: Main -->\nold\n<!-- /table -->\nmid\n'
           '<!-- table: Selection -->\n<!-- /table -->\nend\n')
    assert ft.fill(doc, source) == (
        'intro\n<!-- table: Main -->\n**Main, TEST** x\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n'
        '<!-- /table -->\nmid\n<!-- table: Selection -->\n**Selection** y\n\nRule text.\n\n'
        '| c |\n| --- |\n| 3 |\n<!-- /table -->\nend\n')
    with pytest.raises(SystemExit):
        ft.fill('<!-- table: Nothing -->\n<!-- /table -->', source)


def _fake_data(tmp_path):
    import data_fixtures as fx
    fx.write_fake_fashion(str(tmp_path / 'fashion'), num_train=400, num_test=60)
    fx.write_fake_animals(str(tmp_path / 'animals'), num=80, duplicates=0)
    return [f'--data_dir={tmp_path / "tfds"}', f'--data=fashion_mnist_dir={tmp_path / "fashion"}',
            f'--data=animal_mnist_dir={tmp_path / "animals"}', '--data=coarse_ood=animal_mnist']


def _digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()


def test_variants_of_one_seed_see_one_baseline_the_same_batches_and_the_same_lam(
        tmp_path, monkeypatch):
    """The study's own loop (cm.main, in process) with every runner the trainer builds wrapped:
    what each step of each stage really received (batch bytes, the state's step, the step key,
    the start parameters) and what it drew (lam, from the step's metrics). Then its outputs:
    every run in the JSONL with main.py's report numbers and per-image scores whose AUROC
    sklearn recomputes, and the tables. (One study run serves both: it is the suite's costliest.)"""
    import jax
    from lmoe_jax import checkpoint, parallel, trainer
    real_make_runner = parallel.make_runner
    runs = []

    def make_runner(parallelism, method, rng, mesh=None):
        runner = real_make_runner(parallelism, method, rng, mesh)
        log = {'method': method.name, 'weights': method.weights, 'steps': [],
               'key': np.asarray(jax.random.key_data(rng)).tolist()}
        runs.append(log)
        step = runner.step

        def recording_step(state, local_batch):
            entry = {'step': int(jax.device_get(state.step)),
                     'batch': _digest([local_batch['image'], local_batch['label']]),
                     'outliers': _digest([local_batch['ood_image']])  # stage 1 reads none
                     if 'ood_image' in local_batch else None}
            if not log['steps']:
                log['start_params'] = _digest(jax.tree.leaves(jax.device_get(state.params)))
            state, metrics = step(state, local_batch)  # state donated: read before
            host = jax.device_get(metrics)
            entry.update(lam=float(host['lam']), loss=float(host['loss/total']))
            log['steps'].append(entry)
            return state, metrics
        runner.step = recording_step
        return runner

    monkeypatch.setattr(parallel, 'make_runner', make_runner)
    monkeypatch.setattr(trainer, 'enable_compilation_cache', lambda *a, **k: None)  # process-wide
    out = tmp_path / 'out'
    # seed 0 (ablation seed): stage1, mixoe_mixup, lmoe:kl; seed 1: stage1, mixoe_mixup (the
    # ablation variant runs on ablation seeds only)
    cm.main(['--seeds=0,1', '--ablation_seeds=0', '--variants=mixoe_mixup,lmoe:kl',
             '--baseline_steps=4', '--finetune_steps=3', '--fine_diag_size=50', f'--out={out}',
             f'--workdir={tmp_path / "work"}', *_fake_data(tmp_path)])
    trained = [r for r in runs if r['steps']]  # evaluate_run and restores build runners too
    assert [(r['method'], len(r['steps'])) for r in trained] == [
        ('baseline', 4), ('mixoe_mixup', 3), ('lmoe', 3), ('baseline', 4), ('mixoe_mixup', 3)]
    base0, mix0, kl0, base1, mix1 = trained
    assert kl0['weights'].consistency > 0 and mix0['weights'].consistency == 0  # two methods

    records = {(r['seed'], r['variant']): r for r in cm.read_results(out / 'results.jsonl')}
    assert set(records) == {(0, 'stage1'), (0, 'mixoe_mixup'), (0, 'lmoe:kl'), (1, 'stage1'),
                            (1, 'mixoe_mixup')}
    # one stage-1 run per seed, and every variant of it starts from its evaluated checkpoint
    for seed, stage1, variants in ((0, base0, (mix0, kl0)), (1, base1, (mix1,))):
        start = records[(seed, 'stage1')]
        with checkpoint.reading(checkpoint.as_path(start['workdir'])) as mngr:
            saved = checkpoint.read_variables(mngr, start['eval_step'])['params']
        for v in variants:
            assert v['start_params'] == _digest(jax.tree.leaves(saved))
            assert v['start_params'] != stage1['start_params']  # it did train
        for name in {'mixoe_mixup', 'lmoe:kl'} & {n for s, n in records if s == seed}:
            assert records[(seed, name)]['init_from_step'] == start['eval_step']

    # the pairing: same steps, batches, step key and lam in both variants of seed 0
    assert [e['step'] for e in mix0['steps']] == [e['step'] for e in kl0['steps']] == [0, 1, 2]
    assert [e['batch'] for e in mix0['steps']] == [e['batch'] for e in kl0['steps']]
    assert [e['outliers'] for e in mix0['steps']] == [e['outliers'] for e in kl0['steps']]
    assert None not in [e['outliers'] for e in mix0['steps']]
    assert mix0['key'] == kl0['key']
    assert [e['lam'] for e in mix0['steps']] == [e['lam'] for e in kl0['steps']]
    # ... and it is not so by construction: lam is drawn anew every step, the losses differ,
    # and another seed gets other batches and other lam at every step
    lams = [e['lam'] for e in mix0['steps']]
    assert len(set(lams)) == 3 and all(0.0 < x < 1.0 for x in lams)
    assert [e['loss'] for e in mix0['steps']] != [e['loss'] for e in kl0['steps']]
    assert all(a['batch'] != b['batch'] and a['outliers'] != b['outliers'] and a['lam'] != b['lam']
               for a, b in zip(mix0['steps'], mix1['steps']))
    assert mix1['key'] != mix0['key']
    # the trainer's stage 2 restarts the seed's stream: it replays stage 1's first batches
    assert [e['batch'] for e in mix0['steps']] == [e['batch'] for e in base0['steps'][:3]]

    # the outputs: each JSONL record is the run's main.py report (trainer.evaluate_run's files),
    # and its per-image scores give the same AUROC in sklearn's hands
    from sklearn.metrics import roc_auc_score
    for r in records.values():
        assert r['protocol']['baseline_steps'] == 4 and r['protocol']['finetune_steps'] == 3
        with open(os.path.join(r['workdir'], 'ood_report.json')) as f:
            report = json.load(f)
        assert r['test']['msp/fine_auroc'] == report['scores']['msp']['fine_mean']['openood_auroc']
        assert r['test']['id_acc'] == report['id_accuracy']
        with np.load(out / r['scores_file']) as z:
            id_s, ood_s = z['id_test/msp'], z['fine_ood_test/msp']
            labels = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]  # OOD positive
            assert r['test']['msp/fine_auroc'] == pytest.approx(
                roc_auc_score(labels, -np.r_[id_s, ood_s]), abs=1e-12)
            assert set(np.unique(z['outlier_val/label'])) == {-1}
    assert '**Main comparison, TEST sets, MSP score**' in (out / 'tables.md').read_text()

    # every record names the stage-1 checkpoint it started from; a study whose recorded runs of a
    # seed started from another one (its cache lost, stage 1 trained again on another CPU)
    # stops before it trains anything beside them
    shas = {seed: {r['stage1_sha256'] for (s, _), r in records.items() if s == seed} for seed in (0, 1)}
    assert all(len(v) == 1 for v in shas.values()) and shas[0] != shas[1]
    lines = (out / 'results.jsonl').read_text().splitlines()
    edited = [json.loads(line) for line in lines]
    for r in edited:
        if r['seed'] == 1:
            r['stage1_sha256'] = '0' * 64
    (out / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in edited))
    runs.clear()
    with pytest.raises(SystemExit, match='seed 1: the stage-1 checkpoint now in the cache'):
        cm.main(['--seeds=0,1', '--ablation_seeds=0', '--variants=mixoe_mixup,lmoe:kl,oe',
                 '--baseline_steps=4', '--finetune_steps=3', '--fine_diag_size=50', f'--out={out}',
                 f'--workdir={tmp_path / "work"}', *_fake_data(tmp_path)])
    # seed 0's new run (oe) went ahead: its records match; seed 1's did not start
    assert [r['method'] for r in runs if r['steps']] == ['oe']
    assert {(r['seed'], r['variant']) for r in cm.read_results(out / 'results.jsonl')} == set(
        records) | {(0, 'oe')}


def test_check_same_stage1_stops_on_another_checkpoint_and_counts_unfingerprinted_records():
    records = [{'seed': 0, 'stage1_sha256': 'a' * 64}, {'seed': 0},  # written before the field
               {'seed': 1, 'stage1_sha256': 'b' * 64}]
    assert cm.check_same_stage1(records, 0, 'a' * 64) == 1
    assert cm.check_same_stage1(records, 2, 'c' * 64) == 0  # a new seed: nothing to compare
    with pytest.raises(SystemExit, match='seed 1: .* is not the one'):
        cm.check_same_stage1(records, 1, 'a' * 64)


def test_leave_out_makes_a_run_that_ignores_the_test_ood_classes():
    cfg = cm.demo_config('unused', id_classes=[0, 1, 2, 3, 8, 9], leave_out=[8, 9])
    assert (tuple(cfg.data.id_classes), cfg.data.num_id_classes) == ((0, 1, 2, 3), 4)
    assert tuple(cfg.data.ignore_classes) == (4, 5, 6, 7)  # the test's OOD classes: read nowhere
    split1 = cm.demo_config('unused', split=1, leave_out=[0, 9])  # MixOE split 1: ID {0,2,3,4,6,9}
    assert tuple(split1.data.id_classes) == (2, 3, 4, 6) and tuple(split1.data.ignore_classes) == (1, 5, 7, 8)
    assert cm.demo_config('unused').data.get('ignore_classes') is None
    for bad, match in (([4], 'not ID classes'), ([0, 1, 2, 3, 8], 'at least 2')):
        with pytest.raises(SystemExit, match=match):
            cm.demo_config('unused', id_classes=[0, 1, 2, 3, 8, 9], leave_out=bad)
