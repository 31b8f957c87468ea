"""Leave-classes-out (LCO) selection for fine-grained OOD (issue 21, item 4), and how well it
ranks the study's variants against the test's fine-grained metric.

Why: the held-out auxiliary outliers are near-saturated (outlier-val AUROC 98-100 for every
method), so validation cannot see near-OOD. An LCO run holds a fold of the ID classes out as
pseudo-OOD: ``compare_methods.py --leave_out=8,9`` trains every variant on the other ID classes
and never reads an image of the split's own (test) OOD classes (``config.data.ignore_classes``).
Its signal is the run's ``fine_diag`` metric: ID validation against the training images of the
held-out fold, MSP, i.e. training-split images only. Folds of the demo split {0,1,2,3,8,9}:
{0,2} (T-shirt, Pullover), {1,3} (Trouser, Dress), {8,9} (Bag, Ankle boot)::

    for fold in 0,2 1,3 8,9; do
      .venv/bin/python benchmarks/compare_methods.py --id_classes=0,1,2,3,8,9 --leave_out=$fold \\
          --out=benchmarks/results/study_split0_lco_${fold/,/} --seeds=0,1,2 --ablation_seeds=0,1,2 \\
          --variants=baseline,oe,energy_oe,mixoe_mixup,mixoe_cutmix,lmoe,logit_mixoe,lmoe_sg,logit_mixoe_sg
    done
    .venv/bin/python benchmarks/selection_signal.py --main=benchmarks/results/study_split0 \\
        --lco=benchmarks/results/study_split0_lco_02,benchmarks/results/study_split0_lco_13,benchmarks/results/study_split0_lco_89

THE RULE (committed before any LCO number was seen; ``select``): among the candidates whose
mean ID validation accuracy in the main study is at most ``MAX_ACC_DROP`` points below the
cross-entropy control's, the leader has the lowest LCO FPR@95 (MSP, averaged over the folds, then
over the seeds). It replaces the incumbent only if the paired difference (per seed, fold mean)
has its 95% Student-t interval below 0; otherwise the incumbent stays, unless the incumbent
itself fails the accuracy guard: then the leader is taken (the code has done this since the rule
was committed, in fd41b56; this sentence was missing from the docstring until the LCO runs).

RESULT of that design (2026-12-08, docs/comparison.md): rho -0.467 [-0.533, -0.083] against the
test; fold {0,2} alone -0.883. Each fold held out a pair of siblings together, so no held-out class
kept a near sibling among the ID classes, unlike every test OOD class.

SECOND DESIGN, committed 2026-12-08 before any run of it: single-class folds whose nearest sibling
stays ID: {0} (T-shirt; Pullover stays), {2} (Pullover; T-shirt stays), {3} (Dress; T-shirt
stays), i.e. ``--leave_out=0``, ``=2``, ``=3`` into ``study_split0_lco_0``, ``_2``, ``_3``, same
variants and seeds, same rule (``select``). The signal is adopted for selection only if its rho
against the test's fine FPR@95 on the demo split has a bootstrap interval above 0 and a point
estimate above the held-out outliers' (0.767 on seeds 0-2); otherwise selection keeps reading the
held-out outliers. Not run yet (about 2 h on 2 cores).

Agreement (``agreement``): Spearman's rho between the variants' mean LCO FPR@95 and their mean
test fine-grained FPR@95 (both over the same seeds), with a bootstrap interval that resamples
seeds; and rho per seed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
from etils import epath

sys.path.insert(0, str(epath.Path(__file__).resolve().parent))
import compare_methods as cm  # noqa: E402  (the study's records, protocol and paired stats)

SIGNAL = ('fine_diag', 'msp/fine_fpr95')  # LCO run: ID val vs the held-out fold's train images
TARGET = ('test', 'msp/fine_fpr95')  # main run: ID test vs the test's fine-grained OOD classes
# Signals to compare LCO with, read off the main study's own records: the held-out outliers (what
# selection reads today) and the diagnostic of the test's OOD classes' *training* images (not
# admissible for selection: it sees those classes; how well a near-OOD signal could do at best).
REFERENCES = {'held-out outliers (val, MSP FPR@95)': ('val', 'msp/outlier_fpr95'),
              "main run's fine_diag (test classes' train images; not admissible)":
                  ('fine_diag', 'msp/fine_fpr95')}
MAX_ACC_DROP = cm.SELECTION_MAX_ACC_DROP
INCUMBENT = cm.REFERENCE  # MixOE: what a fine-grained user runs today


def lco_signal(folds: Sequence[Sequence[dict]]) -> Dict[str, Dict[int, float]]:
    """{variant: {seed: the fold mean of SIGNAL}}, for the (variant, seed) pairs every fold has."""
    tables = [cm.by_variant(records, *SIGNAL) for records in folds]
    out: Dict[str, Dict[int, float]] = {}
    for variant in set.intersection(*(set(t) for t in tables)) if tables else ():
        seeds = set.intersection(*(set(t[variant]) for t in tables))
        out[variant] = {s: float(np.mean([t[variant][s] for t in tables])) for s in sorted(seeds)}
    return out


def select(signal: Mapping[str, Mapping[int, float]], id_val_acc: Mapping[str, Mapping[int, float]],
           candidates: Sequence[str], seeds: Sequence[int], incumbent: str = INCUMBENT,
           control: str = 'baseline') -> Optional[dict]:
    """THE RULE of the module docstring. None until every candidate, the incumbent and the
    control have every seed (signal for the candidates, ID val accuracy for all)."""
    names = list(dict.fromkeys(list(candidates) + [incumbent]))
    if any(set(seeds) - set(signal.get(n, {})) for n in names) or any(
            set(seeds) - set(id_val_acc.get(n, {})) for n in names + [control]):
        return None
    mean = {n: float(np.mean([signal[n][s] for s in seeds])) for n in names}
    acc = {n: float(np.mean([id_val_acc[n][s] for s in seeds])) for n in names + [control]}
    eligible = [n for n in names if acc[n] >= acc[control] - MAX_ACC_DROP]
    if not eligible:
        return None
    leader = min(eligible, key=lambda n: mean[n])
    versus = cm.paired_stats({s: signal[leader][s] for s in seeds},
                             {s: signal[incumbent][s] for s in seeds}, higher_is_better=False)
    resolved = leader != incumbent and len(seeds) > 1 and versus['hi'] < 0
    chosen = leader if resolved or incumbent not in eligible else incumbent
    return {'variant': chosen, 'leader': leader, 'leader_vs_incumbent': versus, 'fpr95': mean,
            'id_acc': acc, 'eligible': eligible, 'seeds': list(seeds)}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy import stats
    return float(stats.spearmanr(x, y).statistic)


def agreement(signal: Mapping[str, Mapping[int, float]], target: Mapping[str, Mapping[int, float]],
              variants: Sequence[str], seeds: Sequence[int], n_boot: int = 2000,
              rng_seed: int = 0) -> dict:
    """Spearman rho of the variants' seed means (signal vs target), a 95% percentile interval
    from resampling the seeds with replacement, and rho within each seed."""
    s = np.array([[signal[v][k] for k in seeds] for v in variants], np.float64)
    t = np.array([[target[v][k] for k in seeds] for v in variants], np.float64)
    rho = spearman(s.mean(1), t.mean(1))
    rng = np.random.default_rng(rng_seed)
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(seeds), len(seeds))
        value = spearman(s[:, pick].mean(1), t[:, pick].mean(1))
        if np.isfinite(value):
            boots.append(value)
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan))
    return {'rho': rho, 'lo': float(lo), 'hi': float(hi), 'n_boot': len(boots),
            'per_seed': {int(k): spearman(s[:, i], t[:, i]) for i, k in enumerate(seeds)},
            'variants': list(variants), 'seeds': list(seeds)}


def report(main_records: Sequence[dict], folds: Sequence[Sequence[dict]],
           candidates: Optional[Sequence[str]] = None) -> str:
    signal = lco_signal(folds)
    target = cm.by_variant(main_records, *TARGET)
    id_acc = cm.by_variant(main_records, 'val', 'id_acc')
    variants = [v for v in (candidates or [n for n in cm.VARIANTS if n in signal])
                if v in signal and v in target]
    seeds = sorted(set.intersection(*(set(signal[v]) & set(target[v]) for v in variants))) \
        if variants else []
    lines = [f'Leave-classes-out selection: {len(folds)} folds, seeds {seeds}, MSP FPR@95 x100.', '',
             '| variant | LCO FPR@95 (fold mean) | test fine FPR@95 | ID val acc |',
             '| --- | ---: | ---: | ---: |']
    for v in variants:
        def fmt(table):
            vals = [table[v][k] for k in seeds if k in table.get(v, {})]
            return f'{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}' if len(vals) > 1 else (
                f'{vals[0]:.2f}' if vals else '-')
        lines.append(f'| {v} | {fmt(signal)} | {fmt(target)} | {fmt(id_acc)} |')
    if len(variants) > 2 and seeds:
        a = agreement(signal, target, variants, seeds)
        lines += ['', f"Spearman rho (variant means, LCO vs test): {a['rho']:.3f} "
                  f"[{a['lo']:.3f}, {a['hi']:.3f}] (bootstrap over seeds, {a['n_boot']} draws); "
                  'per seed: ' + ', '.join(f'{k}: {r:.3f}' for k, r in a['per_seed'].items())]
        if len(folds) > 1:  # how much the ranking depends on which classes are held out
            for records in folds:
                one = lco_signal([records])
                if all(set(seeds) <= set(one.get(v, {})) for v in variants):
                    b = agreement(one, target, variants, seeds)
                    held = records[0]['protocol'].get('leave_out') if records else '?'
                    lines.append(f"- fold {held} alone vs test: {b['rho']:.3f} "
                                 f"[{b['lo']:.3f}, {b['hi']:.3f}]")
        for name, (split, key) in REFERENCES.items():
            other = cm.by_variant(main_records, split, key)
            if all(set(seeds) <= set(other.get(v, {})) for v in variants):
                b = agreement(other, target, variants, seeds)
                lines.append(f"- for comparison, {name} vs test: {b['rho']:.3f} "
                             f"[{b['lo']:.3f}, {b['hi']:.3f}]")
        chosen = select(signal, id_acc, variants, seeds)
        if chosen:
            d = chosen['leader_vs_incumbent']
            lines += ['', f"Rule: leader {chosen['leader']} (LCO FPR@95 "
                      f"{chosen['fpr95'][chosen['leader']]:.2f}; vs {INCUMBENT} {d['mean']:+.2f} "
                      f"[{d['lo']:+.2f}, {d['hi']:+.2f}]); chosen: **{chosen['variant']}**; eligible "
                      f"(ID val acc within {MAX_ACC_DROP} of the control): {', '.join(chosen['eligible'])}"]
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--main', required=True, help='the study folder of the test numbers')
    parser.add_argument('--lco', required=True, help='comma list of leave-classes-out study folders')
    parser.add_argument('--out', default=None, help='markdown file (default: <main>/selection_lco.md)')
    args = parser.parse_args(argv)
    main_records = cm.study_records(args.main)
    folds = [[r for r in cm.read_results(epath.Path(d) / 'results.jsonl')
              if r['protocol'].get('leave_out')] for d in args.lco.split(',') if d]
    text = report(main_records, folds)
    out = epath.Path(args.out or epath.Path(args.main) / 'selection_lco.md')
    out.write_text(text + '\n')
    print(text)


if __name__ == '__main__':
    main()
