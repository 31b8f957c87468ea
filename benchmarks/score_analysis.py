"""Where in the score distribution do two methods of the study differ? (FPR@95 explained.)

Reads the per-image scores that ``benchmarks/compare_methods.py`` keeps for every (seed,
variant) and, for methods A and B on the seeds both have, takes apart the fine-grained FPR@95
of the TEST sets. In OpenOOD's convention (OOD positive) the threshold is set where 95% of the
fine-grained OOD images score below it, i.e. by the MOST confident 5% of the OOD images, and
FPR@95 is the share of ID test images scoring at or below it. Scores of two models live on
different scales, so each OOD image is placed on its own model's ID scale: q = the share of ID
test images scoring at or below it. Then FPR@95 is the 95th percentile of q, and the table
shows

* the OOD distribution on that scale: median, 75th, 90th, 95th (= FPR@95) and 99th percentile
  of q (does a method lose at the top of the OOD scores while winning in the bulk?);
* which held-out classes (Coat, Sandal, Shirt, Sneaker on the demo split) make up the most
  confident 5% of the OOD images, and each class's own FPR@95;
* the ID images below the threshold, split into misclassified and correctly classified ones
  (is the ID tail the model's errors?).

    .venv/bin/python benchmarks/score_analysis.py --out=benchmarks/results/study_split0 \
        --a=lmoe --b=mixoe_mixup --plot=docs/images/fpr95_lmoe_vs_mixoe.png
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Dict, List, Mapping, Sequence

import numpy as np
from etils import epath

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot')
OOD_PERCENTILES = (50, 75, 90, 95, 99)


def threshold_at_95(ood_scores: np.ndarray) -> float:
    """The lowest score with at least 95% of the OOD images at or below it (OpenOOD's ROC point)."""
    ordered = np.sort(ood_scores)
    return float(ordered[int(np.ceil(0.95 * len(ordered))) - 1])


def id_quantile_of(id_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each score as the share of ID scores at or below it."""
    return np.searchsorted(np.sort(id_scores), scores, side='right') / len(id_scores)


def ood_classes(data_dir: str, id_classes: Sequence[int], n_expected: int) -> np.ndarray:
    """The Fashion-MNIST class of each fine-grained OOD test image, in the study's order: the
    same unshuffled reader over the test split, filtered to the held-out classes."""
    from benchmarks import compare_methods as cm
    from lmoe_jax.data import sources
    cfg = cm.demo_config(data_dir, id_classes=list(id_classes))
    builder = sources.open_builder(cfg.data.dataset, cfg.data)
    labels = sources.labels_of(builder, sources.spec(cfg.data.dataset).test_split)
    held_out = labels[~np.isin(labels, id_classes)]
    if len(held_out) != n_expected:
        raise SystemExit(f'{len(held_out)} held-out test images in the split, but the scores have '
                         f'{n_expected}: not the same data')
    return held_out


def analyse(out: epath.Path, a: str, b: str, score: str, classes: np.ndarray,
            seeds: Sequence[int]) -> tuple[str, Dict[str, list]]:
    from benchmarks import compare_methods as cm
    from lmoe_jax.ood import metrics
    records = {(r['seed'], r['variant']): r for r in cm.read_results(out / 'results.jsonl')}
    rows: Dict[str, list] = {a: [], b: []}
    for method in (a, b):
        for seed in seeds:
            rec = records[(seed, method)]
            with np.load(io.BytesIO((out / rec['scores_file']).read_bytes())) as z:
                s_id, s_ood = z[f'id_test/{score}'], z[f'fine_ood_test/{score}']
                correct = np.argmax(z['id_test/logits'], -1) == z['id_test/label']
            t = threshold_at_95(s_ood)
            below = s_id <= t
            fpr = float(np.mean(below))
            recorded = rec['test'][f'{score}/fine_fpr95']
            if abs(fpr - recorded) > 1e-9:
                raise SystemExit(f'{method} seed {seed}: FPR@95 here {fpr:.5f}, study {recorded:.5f}')
            q = id_quantile_of(s_id, s_ood)
            top = s_ood >= t  # the most confident ~5% of the OOD images
            rows[method].append({
                'seed': seed, 'fpr95': fpr, 'q': q, 'id': s_id, 'ood': s_ood, 't': t,
                # order statistics (no interpolation): the 95th is exactly FPR@95
                'percentiles': {p: float(np.percentile(q, p, method='inverted_cdf'))
                                for p in OOD_PERCENTILES},
                'top_share': {int(c): float(np.mean(classes[top] == c)) for c in np.unique(classes)},
                'class_fpr': {int(c): metrics.openood_fpr_at_95_tpr(s_id, s_ood[classes == c])
                              for c in np.unique(classes)},
                'below_wrong': float(np.mean(below & ~correct)),
                'below_right': float(np.mean(below & correct)),
                'id_error': float(np.mean(~correct))})
    return table(rows, a, b, score), rows


def _ms(values: Sequence[float], scale: float = 100.0) -> str:
    v = scale * np.asarray(values, np.float64)
    return f'{v.mean():.2f} ± {v.std(ddof=1):.2f}' if len(v) > 1 else f'{v.mean():.2f}'


def _paired(rows_a: list, rows_b: list, get, scale: float = 100.0) -> str:
    d = scale * np.array([get(x) - get(y) for x, y in zip(rows_a, rows_b)])
    return f'{d.mean():+.2f} ({int(np.sum(d > 0))}/{len(d)} seeds higher)'


def table(rows: Mapping[str, list], a: str, b: str, score: str) -> str:
    seeds = [r['seed'] for r in rows[a]]
    lines = [f'Seeds {",".join(map(str, seeds))}; x100, mean ± std over seeds; a - b paired by seed. '
             'q = share of ID test images scoring at or below an OOD image (its own model).', '',
             f'| fine-grained OOD test, MSP-type score | {a} | {b} | {a} − {b} |',
             '| --- | --- | --- | --- |']

    def add(label, get, scale=100.0):
        lines.append(f'| {label} | {_ms([get(r) for r in rows[a]], scale)} | '
                     f'{_ms([get(r) for r in rows[b]], scale)} | '
                     f'{_paired(rows[a], rows[b], get, scale)} |')
    add('FPR@95 (OpenOOD): ID at or below the 95% OOD threshold', lambda r: r['fpr95'])
    for p in OOD_PERCENTILES:
        add(f'{p}th percentile of q over OOD images' + (' (= FPR@95)' if p == 95 else ''),
            lambda r, p=p: r['percentiles'][p])
    for c in sorted(rows[a][0]['top_share']):
        add(f'share of {FASHION_MNIST_CLASSES[c]} in the top 5% OOD', lambda r, c=c: r['top_share'][c])
    for c in sorted(rows[a][0]['class_fpr']):
        add(f'FPR@95 against {FASHION_MNIST_CLASSES[c]} alone', lambda r, c=c: r['class_fpr'][c])
    if score == 'msp':  # MSP log-odds are on one scale for every model: a probability
        for p in (50, 90, 99):
            add(f'ID test, {p}th percentile of the MSP log-odds (not x100)',
                lambda r, p=p: np.percentile(r['id'], p), 1.0)
        add('the threshold: 95th percentile of the OOD MSP log-odds (not x100)',
            lambda r: r['t'], 1.0)
    add('ID test error rate', lambda r: r['id_error'])
    add('ID below the threshold and misclassified', lambda r: r['below_wrong'])
    add('ID below the threshold and correctly classified', lambda r: r['below_right'])
    return '\n'.join(lines)


def plot(rows: Mapping[str, list], a: str, b: str, score: str, path: epath.Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {a: 'tab:red', b: 'tab:blue'}
    ax = axes[0]
    for method in (a, b):
        for i, r in enumerate(rows[method]):  # sorted OOD images on their model's ID scale
            q = np.sort(r['q'])
            ax.plot(np.arange(1, len(q) + 1) / len(q), q, color=colours[method], alpha=0.6, lw=1,
                    label=method if i == 0 else None)
    ax.axvline(0.95, color='k', ls=':', lw=1)
    ax.set_xlabel('OOD images, sorted by score (fraction)')
    ax.set_ylabel('q: share of ID test at or below')
    ax.set_title('fine OOD on the ID scale; FPR@95 = q at 0.95')
    ax.legend()
    for ax, method in zip(axes[1:], (a, b)):
        r = rows[method][0]
        lo = np.quantile(np.concatenate([r['id'], r['ood']]), 0.005)
        hi = np.quantile(np.concatenate([r['id'], r['ood']]), 0.995)
        bins = np.linspace(lo, hi, 60)
        ax.hist(r['id'], bins=bins, alpha=0.5, density=True, label='ID test')
        ax.hist(r['ood'], bins=bins, alpha=0.5, density=True, label='fine OOD test')
        ax.axvline(r['t'], color='k', ls=':', lw=1, label='threshold (95% of OOD below)')
        ax.set_title(f'{method}, seed {r["seed"]}: {score} (FPR@95 {100 * r["fpr95"]:.1f})')
        ax.set_xlabel(f'{score} score (MSP as log-odds)' if score == 'msp' else f'{score} score')
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=110)
    path.write_bytes(buffer.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='the study folder (results.jsonl, scores_*.npz)')
    parser.add_argument('--a', default='lmoe')
    parser.add_argument('--b', default='mixoe_mixup')
    parser.add_argument('--score', default='msp', choices=('msp', 'energy'))
    parser.add_argument('--seeds', default='', help='default: every seed both have')
    parser.add_argument('--data_dir', default='runs/tfds', help='to name the held-out classes')
    parser.add_argument('--plot', default=None, help='PNG to write')
    parser.add_argument('--markdown', default=None, help='write the table here too')
    args = parser.parse_args(argv)
    from benchmarks import compare_methods as cm
    out = epath.Path(args.out)
    records = cm.read_results(out / 'results.jsonl')
    have = [{r['seed'] for r in records if r['variant'] == m} for m in (args.a, args.b)]
    seeds = [int(s) for s in args.seeds.split(',') if s] or sorted(have[0] & have[1])
    if not seeds:
        raise SystemExit(f'no seed has both {args.a} and {args.b} in {out}')
    first = next(r for r in records if r['variant'] == args.a)
    with np.load(io.BytesIO((out / first['scores_file']).read_bytes())) as z:
        n_ood = len(z['fine_ood_test/label'])
    classes = ood_classes(args.data_dir, first['protocol']['id_classes'], n_ood)
    text, rows = analyse(out, args.a, args.b, args.score, classes, seeds)
    print(text)
    if args.markdown:
        epath.Path(args.markdown).write_text(text + '\n')
    if args.plot:
        plot(rows, args.a, args.b, args.score, epath.Path(args.plot))
        print(f'figure: {args.plot}')


if __name__ == '__main__':
    main()
