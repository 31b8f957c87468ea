"""The cross-class-set summary on hand-made study records: its paired intervals by hand, its
better / worse / tied count, and that only product-path, non-LCO records are read."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'benchmarks'))
import study_summary as summ  # noqa: E402

T_975_2 = 4.302652729911275  # Student t, 97.5 %, 2 degrees of freedom (3 seeds)


def _record(variant, seed, auroc, fpr, acc=0.95, **protocol):
    return {'variant': variant, 'seed': seed,
            'protocol': {'learning_rate': 0.05, 'path': 'trainer', **protocol},
            'test': {'msp/fine_auroc': auroc, 'msp/fine_fpr95': fpr, 'id_acc': acc}}


def _study(values):
    """{variant: [(auroc, fpr) per seed]} -> records."""
    return [_record(v, s, a, f) for v, rows in values.items() for s, (a, f) in enumerate(rows)]


def test_cells_are_paired_t_intervals_and_the_count_reads_them():
    a = _study({'mixoe_mixup': [(0.70, 0.60), (0.72, 0.62), (0.71, 0.58)],
                'lmoe': [(0.80, 0.50), (0.81, 0.51), (0.82, 0.50)],     # AUROC +10, +9, +11
                'oe': [(0.60, 0.70), (0.75, 0.60), (0.71, 0.58)]})       # AUROC -10, +3, 0
    b = _study({'mixoe_mixup': [(0.70, 0.60), (0.70, 0.60), (0.70, 0.60)],
                'lmoe': [(0.65, 0.66), (0.64, 0.67), (0.66, 0.65)]})     # AUROC -5, -6, -4
    text = summ.table({'A': a, 'B': b}, summ.METRICS[0], ['lmoe', 'oe'])
    half = T_975_2 * 1.0 / np.sqrt(3)  # differences 10, 9, 11: mean 10, sample std 1
    assert f'| lmoe | +10.00 [{10 - half:+.2f}, {10 + half:+.2f}] (3/3) **better** | ' in text
    assert f'-5.00 [{-5 - half:+.2f}, {-5 + half:+.2f}] (0/3) **worse** | 1 / 1 / 0 |' in text
    d = np.array([-10.0, 3.0, 0.0])  # oe: spans 0, and has no column B
    half_oe = T_975_2 * d.std(ddof=1) / np.sqrt(3)
    assert (f'| oe | {d.mean():+.2f} [{d.mean() - half_oe:+.2f}, {d.mean() + half_oe:+.2f}] (1/3) '
            '| - | 0 / 0 / 1 |') in text
    # FPR@95: lower is better, so lmoe's -10 points on A is "better"
    fpr = summ.table({'A': a}, summ.METRICS[1], ['lmoe'])
    assert '(3/3) **better**' in fpr


def test_one_seed_is_never_resolved():
    one = _study({'mixoe_mixup': [(0.70, 0.60)], 'lmoe': [(0.90, 0.10)]})
    text = summ.table({'A': one}, summ.METRICS[0], ['lmoe'])
    assert '| lmoe | +20.00 [+nan, +nan] (1/1) | 0 / 0 / 1 |' in text


def test_reads_only_product_path_records_without_leave_out(tmp_path):
    records = [_record('lmoe', 0, 0.8, 0.5), _record('lmoe', 1, 0.8, 0.5, leave_out=[8, 9]),
               {**_record('lmoe', 2, 0.8, 0.5), 'protocol': {'learning_rate': 0.05}}]  # standalone
    (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    assert [r['seed'] for r in summ.product_records(tmp_path)] == [0]
    with pytest.raises(SystemExit):
        summ.main([f'--study=empty={tmp_path / "nothing"}'])
