"""One table across class sets (issue 21, item 6): each variant's paired difference to MixOE on
the test's fine-grained OOD, per study folder, and in how many class sets it is resolved better or
worse. Why: every study folder has its own tables.md; a recommendation has to read them side by
side, and retyping numbers from four files is how tables drift from their records.

    .venv/bin/python benchmarks/study_summary.py \\
        --study=demo=benchmarks/results/study_split0 \\
        --study=split0=benchmarks/results/study_mixoe_split0 \\
        --study=split1=benchmarks/results/study_mixoe_split1 \\
        --study=fmnist8=benchmarks/results/study_fmnist8 \\
        --out=benchmarks/results/summary_product_path.md

Reads only product-path records (``protocol.path == 'trainer'``, no ``leave_out``); every cell is
``compare_methods.paired_stats`` over the seeds both variants have in that folder.
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping, Sequence

from etils import epath

sys.path.insert(0, str(epath.Path(__file__).resolve().parent))
import compare_methods as cm  # noqa: E402  (records, paired stats, variant names)

#: (record split, key, higher is better, column title)
METRICS = (('test', 'msp/fine_auroc', True, 'fine AUROC, MSP'),
           ('test', 'msp/fine_fpr95', False, 'fine FPR@95, MSP'),
           ('test', 'energy/fine_auroc', True, 'fine AUROC, Energy'),
           ('test', 'energy/fine_fpr95', False, 'fine FPR@95, Energy'),
           ('test', 'id_acc', True, 'ID accuracy'))


def product_records(folder: epath.PathLike) -> list:
    return [r for r in cm.study_records(folder) if not r['protocol'].get('leave_out')]


def verdict(d: Mapping[str, float], higher_is_better: bool) -> int:
    """+1 resolved better, -1 resolved worse, 0 not resolved (interval spans 0 or one seed), for
    ``d`` = paired_stats of value - reference."""
    if d['n'] < 2 or not (d['lo'] > 0 or d['hi'] < 0):
        return 0
    return 1 if (d['lo'] > 0) == higher_is_better else -1


VERDICT_MARK = {1: ' **better**', -1: ' **worse**', 0: ''}


def cell(d: Mapping[str, float], higher_is_better: bool) -> str:
    if not d['n']:
        return '-'
    mark = VERDICT_MARK[verdict(d, higher_is_better)]
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] ({d['wins']}/{d['n']}){mark}"


def table(studies: Mapping[str, Sequence[dict]], metric: tuple,
          variants: Sequence[str], reference: str = cm.REFERENCE) -> str:
    split, key, higher, title = metric
    names = list(studies)
    lines = [f'**Δ {title} vs {reference}** (TEST sets; paired mean [95% t interval] (seeds '
             'better / seeds); better / worse: the interval excludes 0)', '',
             '| variant | ' + ' | '.join(names) + ' | better / worse / tied |',
             '| --- | ' + ' | '.join('---' for _ in names) + ' | --- |']
    values = {name: cm.by_variant(records, split, key) for name, records in studies.items()}
    for v in variants:
        cells, count = [], {1: 0, -1: 0, 0: 0}
        for name in names:
            study = values[name]
            if v not in study or reference not in study:
                cells.append('-')
                continue
            d = cm.paired_stats(study[v], study[reference], higher_is_better=higher)
            cells.append(cell(d, higher))
            if d['n']:
                count[verdict(d, higher)] += 1
        lines.append(f'| {v} | ' + ' | '.join(cells) + f' | {count[1]} / {count[-1]} / {count[0]} |')
    return '\n'.join(lines)


def summary(studies: Mapping[str, Sequence[dict]], variants: Sequence[str] = ()) -> str:
    present = {r['variant'] for records in studies.values() for r in records}
    variants = [v for v in (variants or cm.VARIANTS) if v in present and v != cm.REFERENCE]
    seeds = {name: sorted({r['seed'] for r in records}) for name, records in studies.items()}
    head = ['Class sets (study folder: seeds): ' + '; '.join(
        f'{name}: {list(s)}' for name, s in seeds.items()), '']
    return '\n'.join(head + [table(studies, m, variants) + '\n' for m in METRICS])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--study', action='append', required=True, metavar='NAME=FOLDER',
                        help='a column: its name and study folder (repeatable, in order)')
    parser.add_argument('--variants', default='', help='comma list (default: every variant)')
    parser.add_argument('--out', default=None, help='markdown file to write')
    args = parser.parse_args(argv)
    studies = {}
    for item in args.study:
        name, sep, folder = item.partition('=')
        if not sep or not name or not folder:
            parser.error(f'--study {item!r}: give NAME=FOLDER')
        records = product_records(folder)
        if not records:
            parser.error(f'--study {item!r}: no product-path records in {folder}/results.jsonl')
        studies[name] = records
    text = summary(studies, [v for v in args.variants.split(',') if v])
    if args.out:
        epath.Path(args.out).write_text(text + '\n')
    print(text)


if __name__ == '__main__':
    main()
