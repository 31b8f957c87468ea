"""How far the study's numbers moved when it went onto the product's trainer (issue 21, item 1).

The same variants, seeds and class split, once through the standalone loop the study had before
(its own state, step, loop and evaluation) and once through ``trainer.train_stage`` /
``evaluate_run``. Per variant: both means over the seeds both have and the paired difference
(trainer - standalone, same seed); then each path's paired difference to MixOE, so a changed
conclusion shows as a changed sign or interval::

    .venv/bin/python benchmarks/compare_paths.py --standalone=benchmarks/results/study_split0_standalone \\
        --trainer=benchmarks/results/study_split0 --out=benchmarks/results/study_split0/paths.md
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from etils import epath

sys.path.insert(0, str(epath.Path(__file__).resolve().parent))
import compare_methods as cm  # noqa: E402

METRICS = (('id_acc', 'ID acc', True), ('msp/fine_auroc', 'fine AUROC', True),
           ('msp/fine_fpr95', 'fine FPR95', False), ('msp/coarse_auroc', 'coarse AUROC', True),
           ('energy/fine_fpr95', 'fine FPR95 (Energy)', False))


def _cell(d: dict) -> str:
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] ({d['wins']}/{d['n']})"


def moved_table(old: Sequence[dict], new: Sequence[dict]) -> str:
    """Per variant and metric: standalone mean, trainer mean, paired Δ (trainer - standalone);
    'wins' counts the seeds where the trainer's number is the better one."""
    lines = ['**Standalone loop -> product trainer, TEST sets, same seeds (paired Δ = trainer - '
             'standalone, [95% t interval], (seeds where the trainer is better / seeds))**', '',
             '| variant | seeds | ' + ' | '.join(f'{name}: standalone -> trainer, Δ' for _, name, _ in METRICS)
             + ' |', '|' + ' --- |' * (len(METRICS) + 2)]
    before = {key: cm.by_variant(old, 'test', key) for key, _, _ in METRICS}
    after = {key: cm.by_variant(new, 'test', key) for key, _, _ in METRICS}
    first = METRICS[0][0]
    for variant in [v for v in after[first] if v in before[first]]:
        cells, seeds = [], None
        for key, _, higher in METRICS:
            a, b = before[key][variant], after[key][variant]
            common = sorted(set(a) & set(b))
            seeds = common
            d = cm.paired_stats({s: b[s] for s in common}, {s: a[s] for s in common}, higher)
            mean_a = sum(a[s] for s in common) / len(common)
            mean_b = sum(b[s] for s in common) / len(common)
            cells.append(f'{mean_a:.2f} -> {mean_b:.2f}, {_cell(d)}')
        lines.append(f"| {variant} | {','.join(map(str, seeds))} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def versus_reference_table(old: Sequence[dict], new: Sequence[dict],
                           reference: str = cm.REFERENCE) -> str:
    """Each path's paired Δ to ``reference`` on the seeds both paths have for both variants."""
    keys = [m for m in METRICS if m[0] != 'id_acc']
    lines = [f'**Δ vs {reference} under each path, TEST sets, the same seeds (standalone | trainer)**', '',
             '| variant | seeds | ' + ' | '.join(f'Δ {name}' for _, name, _ in keys) + ' |',
             '|' + ' --- |' * (len(keys) + 2)]
    before = {key: cm.by_variant(old, 'test', key) for key, _, _ in keys}
    after = {key: cm.by_variant(new, 'test', key) for key, _, _ in keys}
    first = keys[0][0]
    for variant in [v for v in after[first] if v != reference and v in before[first]]:
        cells, seeds = [], []
        for key, _, higher in keys:
            a, b = before[key], after[key]
            seeds = sorted(set(a[variant]) & set(b[variant]) & set(a.get(reference, {}))
                           & set(b.get(reference, {})))
            if not seeds:
                break
            da = cm.paired_stats({s: a[variant][s] for s in seeds},
                                 {s: a[reference][s] for s in seeds}, higher)
            db = cm.paired_stats({s: b[variant][s] for s in seeds},
                                 {s: b[reference][s] for s in seeds}, higher)
            cells.append(f'{_cell(da)} \\| {_cell(db)}')
        if cells:
            lines.append(f"| {variant} | {','.join(map(str, seeds))} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--standalone', required=True)
    parser.add_argument('--trainer', required=True)
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)
    old = cm.study_records(args.standalone, 'standalone')
    new = cm.study_records(args.trainer)
    same = {json.dumps({k: v for k, v in cm.normalized(r['protocol']).items() if k != 'path'},
                       sort_keys=True) for r in list(old) + list(new)}
    if len(same) != 1:
        raise SystemExit(f'the two folders hold different protocols (beyond the path): {sorted(same)}')
    text = moved_table(old, new) + '\n\n' + versus_reference_table(old, new) + '\n'
    if args.out:
        epath.Path(args.out).write_text(text)
    print(text)


if __name__ == '__main__':
    main()
