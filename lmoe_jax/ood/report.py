"""The OOD report: tables (markdown / text / CSV), JSON, PNG plots and metric-writer output.

Everything here reads the metrics dict built by ``lmoe_jax.evaluate`` (fractions in [0, 1]);
tables show percentages like the papers do. Files are written to a temporary name and then
renamed, so a crash never leaves half a report behind. All file I/O goes through
``etils.epath``, so ``workdir`` may be a local folder or a ``gs://`` URL.
"""
import csv
import io
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from etils import epath

# (metrics key, table header); lower is better only for FPR.
COLUMNS: Tuple[Tuple[str, str], ...] = (
    ('openood_fpr95', 'OpenOOD FPR@95TPR (OOD+) ↓'),
    ('openood_auroc', 'OpenOOD AUROC ↑'),
    ('openood_aupr_in', 'OpenOOD AUPR-In ↑'),
    ('openood_aupr_out', 'OpenOOD AUPR-Out ↑'),
    ('mixoe_tnr95', 'MixOE TNR@95TPR (ID+) ↑'),
    ('mixoe_auroc', 'MixOE AUROC ↑'),
    ('mixoe_aupr_in', 'MixOE AUPR-In ↑'),
)
MEAN_ROWS = {'fine_ood': 'fine_mean', 'coarse_ood': 'coarse_mean', 'ood': 'ood_mean'}


def ordered_scores(names: Sequence[str]) -> List[str]:
    """MSP first (the protocol's score), then the rest in the given order."""
    return (['msp'] if 'msp' in names else []) + [n for n in names if n != 'msp']


def _cell(row: Mapping[str, float], key: str) -> str:
    value = row.get(key)
    if value is None or not np.isfinite(value):
        return '-'
    text = f'{100 * value:.2f}'
    std = row.get(key + '_std')
    return f'{text} ± {100 * std:.2f}' if std is not None else text


def table_rows(metrics: Mapping[str, Any], score: str) -> List[Tuple[str, Dict[str, float]]]:
    rows = metrics['scores'][score]
    return [(name, rows[name]) for name in rows]


def format_table(metrics: Mapping[str, Any], score: str = 'msp', style: str = 'markdown') -> str:
    """One score's table: rows = OOD sets and the fine/coarse means, columns = metrics (in %).

    ``style``: 'markdown' (GitHub pipes) or 'text' (aligned columns for terminals and logs).
    """
    if score not in metrics['scores']:
        raise ValueError(f"score '{score}' was not evaluated; available: {sorted(metrics['scores'])}.")
    header = ['set'] + [title for _, title in COLUMNS]
    body = [[name] + [_cell(row, key) for key, _ in COLUMNS] for name, row in table_rows(metrics, score)]
    if style == 'markdown':
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] + ['---:'] * len(COLUMNS)) + '|']
        lines += ['| ' + ' | '.join(r) + ' |' for r in body]
        return '\n'.join(lines)
    if style == 'text':
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
        fmt = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths)))
        return '\n'.join([fmt(header), '  '.join('-' * w for w in widths)] + [fmt(r) for r in body])
    raise ValueError(f"style must be 'markdown' or 'text'; got {style!r}.")


def format_msp_table(metrics: Mapping[str, Any]) -> str:
    """The MSP table as aligned text, with the ID accuracy above it (what `--mode=eval` prints)."""
    head = f"MSP score, ID set '{metrics['id_set']}'"
    if metrics.get('id_accuracy') is not None:
        head += f", ID top-1 accuracy {100 * metrics['id_accuracy']:.2f}%"
    return head + ' (all numbers in %)\n' + format_table(metrics, 'msp', style='text')


def markdown_report(metrics: Mapping[str, Any]) -> str:
    lines = ['# OOD evaluation report', '']
    lines.append(f"ID set: `{metrics['id_set']}` ({metrics['num_images'][metrics['id_set']]} images)"
                 + (f", top-1 accuracy **{100 * metrics['id_accuracy']:.2f}%**"
                    if metrics.get('id_accuracy') is not None else ''))
    lines.append('')
    lines.append('OOD sets: ' + ', '.join(f"`{n}` ({metrics['kinds'][n]}, {metrics['num_images'][n]} images)"
                                          for n in metrics['kinds'] if n != metrics['id_set']))
    lines += ['', 'All numbers in %. OpenOOD columns follow OpenOOD v1.5 (computed with sklearn): OOD '
              'is the positive class, a tied ID/OOD pair counts half (FPR@95TPR: share of ID flagged '
              'OOD when 95% of OOD is caught). MixOE columns follow MixOE\'s evaluation script (its '
              'threshold walk): ID is the positive class, a tied ID/OOD pair earns nothing, TNR@95 '
              'takes the higher-FPR point of a tie; mean ± std over '
              f"{metrics['config']['num_subsamples']} equal-size subsamples. `msp` is the log-odds of "
              'the maximum softmax probability (same ranking as MSP, no float32 saturation at 1). '
              'Mean rows average the sets of one kind.', '']
    for score in ordered_scores(list(metrics['scores'])):
        lines += [f'## {score}', '', format_table(metrics, score), '']
    return '\n'.join(lines)


def csv_report(metrics: Mapping[str, Any]) -> str:
    """Long-to-wide CSV: one line per (score, row), every metric (fractions) and its std."""
    keys = []
    for key, _ in COLUMNS:
        keys += [key] + ([key + '_std'] if key.startswith('mixoe') else [])
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(['score', 'set', 'kind'] + keys)
    for score in ordered_scores(list(metrics['scores'])):
        for name, row in table_rows(metrics, score):
            kind = metrics['kinds'].get(name, 'mean')
            writer.writerow([score, name, kind] + [repr(float(row[k])) if k in row else '' for k in keys])
    return out.getvalue()


def _atomic_write(path: epath.Path, data) -> None:
    """Write ``data`` (str or bytes) to ``path.tmp``, then rename it over ``path``.

    Locally the rename is atomic. On gs:// it is a copy then a delete, and an object only
    becomes visible once its upload is complete, so a reader never sees half a file there either.
    """
    tmp = path.parent / (path.name + '.tmp')
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(path)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    _plt().imsave(buffer, pixels, format='png')
    return buffer.getvalue()


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib
    matplotlib.use('Agg')  # files only, never a display
    import matplotlib.pyplot as plt
    return plt


def histogram_figure(score: str, id_name: str, id_scores: np.ndarray,
                     ood_scores: Mapping[str, np.ndarray]):
    """One panel per OOD set: ID vs that set's score histogram, shared bins."""
    plt = _plt()
    n = max(1, len(ood_scores))
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3), squeeze=False, dpi=90)
    fig.subplots_adjust(left=0.2 / n, right=1 - 0.05 / n, bottom=0.17, top=0.9, wspace=0.3)
    for ax, (name, values) in zip(axes[0], ood_scores.items()):
        both = np.concatenate([id_scores, values])
        lo, hi = float(both.min()), float(both.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
        ax.hist(id_scores, bins=bins, alpha=0.55, density=True, label=f'{id_name} (ID)')
        ax.hist(values, bins=bins, alpha=0.55, density=True, label=f'{name} (OOD)')
        ax.set_title(f'{score}: {name}')
        ax.set_xlabel(f'{score} (higher = more ID)')
        ax.legend(fontsize=7)
    return fig


def roc_figure(score: str, id_scores: np.ndarray, ood_scores: Mapping[str, np.ndarray]):
    """ROC curves, OOD positive (OpenOOD), one curve per OOD set."""
    from lmoe_jax.ood import metrics as metrics_lib
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4), dpi=90)
    fig.subplots_adjust(left=0.16, right=0.96, bottom=0.12, top=0.92)
    for name, values in ood_scores.items():
        is_ood = np.r_[np.zeros(len(id_scores), bool), np.ones(len(values), bool)]
        fpr, tpr, _ = metrics_lib.roc_curve(is_ood, -np.r_[id_scores, values])
        auroc = metrics_lib.openood_auroc(id_scores, values)
        ax.plot(fpr, tpr, label=f'{name} (AUROC {100 * auroc:.1f})')
    ax.plot([0, 1], [0, 1], 'k:', lw=0.8)
    ax.axhline(0.95, color='grey', lw=0.6, ls='--')
    ax.set_xlabel('FPR (ID flagged OOD)')
    ax.set_ylabel('TPR (OOD caught)')
    ax.set_title(f'ROC, {score}')
    ax.legend(fontsize=7, loc='lower right')
    return fig


def figure_to_array(fig) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a rendered figure (for metric writers)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def write_plots(workdir: str, id_name: str, set_scores: Mapping[str, Mapping[str, np.ndarray]],
                score_names: Sequence[str]) -> Dict[str, np.ndarray]:
    """PNG histogram and ROC per score under ``workdir/ood_plots``; returns their RGB arrays."""
    plt = _plt()
    plot_dir = epath.Path(workdir) / 'ood_plots'
    plot_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    for score in ordered_scores(list(score_names)):
        id_values = set_scores[id_name][score]
        ood = {n: s[score] for n, s in set_scores.items() if n != id_name}
        for kind, fig in (('histogram', histogram_figure(score, id_name, id_values, ood)),
                          ('roc', roc_figure(score, id_values, ood))):
            pixels = figure_to_array(fig)  # rendered once, for the file and the writer
            plt.close(fig)
            _atomic_write(plot_dir / f'{score}_{kind}.png', _png_bytes(pixels))
            images[f'ood/{score}/{kind}'] = pixels
    return images


# ----------------------------------------------------------------------------- writers


def flat_scalars(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """``ood/<score>/<row>/<metric>`` -> value, plus ``ood/id_accuracy``."""
    out = {}
    if metrics.get('id_accuracy') is not None:
        out['ood/id_accuracy'] = float(metrics['id_accuracy'])
    for score, rows in metrics['scores'].items():
        for row, values in rows.items():
            for key, value in values.items():
                out[f'ood/{score}/{row}/{key}'] = float(value)
    return out


def write_report(workdir: str, metrics: Mapping[str, Any],
                 set_scores: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
                 writer=None, step: int = 0, plots: bool = True) -> Dict[str, str]:
    """Write ood_report.{json,md,csv}, ood_scores.npz and PNG plots; feed ``writer`` if given.

    ``writer``: any CLU ``MetricWriter``-like object (``write_scalars``/``write_images``/
    ``write_texts``). ``workdir``: a local folder or a gs:// URL. Returns the paths written.
    """
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    paths = {'json': root / 'ood_report.json', 'markdown': root / 'ood_report.md',
             'csv': root / 'ood_report.csv'}
    _atomic_write(paths['json'], json.dumps(metrics, indent=2, sort_keys=False) + '\n')
    _atomic_write(paths['markdown'], markdown_report(metrics) + '\n')
    _atomic_write(paths['csv'], csv_report(metrics))
    images = {}
    if set_scores is not None:
        paths['scores'] = root / 'ood_scores.npz'
        flat = {f'{name}/{score}': np.asarray(v) for name, s in set_scores.items() for score, v in s.items()}
        buffer = io.BytesIO()  # np.savez wants a seekable file; a gs:// object is not one
        np.savez_compressed(buffer, **flat)
        _atomic_write(paths['scores'], buffer.getvalue())
        if plots:
            images = write_plots(workdir, metrics['id_set'], set_scores, list(metrics['scores']))
            paths['plots'] = root / 'ood_plots'
    if writer is not None:
        send_to_writer(writer, metrics, images, step)
    return {kind: str(path) for kind, path in paths.items()}


def send_to_writer(writer, metrics: Mapping[str, Any], images: Mapping[str, np.ndarray], step: int = 0):
    """Scalars, plot images [1, H, W, 3] and the MSP table to a CLU-style metric writer."""
    writer.write_scalars(step, flat_scalars(metrics))
    if images and hasattr(writer, 'write_images'):
        writer.write_images(step, {k: v[None] for k, v in images.items()})
    if hasattr(writer, 'write_texts') and 'msp' in metrics['scores']:
        writer.write_texts(step, {'ood/msp_table': format_table(metrics, 'msp')})
    if hasattr(writer, 'flush'):
        writer.flush()
