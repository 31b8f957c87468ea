"""benchmarks/compare_paths.py: the paired moves between the study's two paths, by hand."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'benchmarks'))
import compare_paths as cp  # noqa: E402


def _record(variant, seed, fine_fpr, fine_auroc=0.7):
    return {'variant': variant, 'seed': seed, 'test': {
        'id_acc': 0.95, 'msp/fine_auroc': fine_auroc, 'msp/fine_fpr95': fine_fpr,
        'msp/coarse_auroc': 0.99, 'energy/fine_fpr95': fine_fpr}}


def test_moves_are_paired_over_common_seeds_and_reference_deltas_per_path():
    old = [_record('mixoe_mixup', 0, 0.70), _record('mixoe_mixup', 1, 0.72), _record('mixoe_mixup', 2, 0.50),
           _record('lmoe', 0, 0.80), _record('lmoe', 1, 0.84)]
    new = [_record('mixoe_mixup', 0, 0.60), _record('mixoe_mixup', 1, 0.64),
           _record('lmoe', 0, 0.65), _record('lmoe', 1, 0.71)]
    moved = cp.moved_table(old, new)
    # mixoe: seeds 0,1 only (seed 2 has no trainer run); FPR 71.00 -> 62.00, diffs -10, -8 => -9.00,
    # both seeds better (lower); interval -9 +- t(.975,1) * sqrt(2) / sqrt(2) = -9 +- 12.706
    assert '| mixoe_mixup | 0,1 |' in moved
    assert '71.00 -> 62.00, -9.00 [-21.71, +3.71] (2/2)' in moved
    assert '82.00 -> 68.00, -14.00 [-26.71, -1.29] (2/2)' in moved  # lmoe: -15, -13
    versus = cp.versus_reference_table(old, new)
    # lmoe - mixoe: standalone +10, +12 (mean +11); trainer +5, +7 (mean +6); lower FPR wins: 0/2
    assert '+11.00 [-1.71, +23.71] (0/2) \\| +6.00 [-6.71, +18.71] (0/2)' in versus
    assert 'mixoe_mixup |' not in versus.split('\n', 4)[-1]  # no row for the reference itself
