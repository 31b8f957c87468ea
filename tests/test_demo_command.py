"""The README's first command, run as written at a reduced size, so it is covered by CI.

    .venv/bin/python main.py --config=configs/fashion_mnist.py --workdir=runs/demo

Only size-reducing overrides are added (one baseline epoch, 4 LMoE steps, a small eval batch),
plus data directories pointing at small fake Fashion-MNIST / Animal-MNIST files written by
data_fixtures, so the test does not depend on the 60k-image files being installed. The coarse
OOD set stays the demo's (scikit-learn's bundled digits). One CPU device, as on a laptop.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

import data_fixtures as fx
from run_helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TEST = 60  # fake test images, labels cycling 0..9
ID_CLASSES = (0, 1, 2, 3, 8, 9)  # the demo's ID classes; the other four are fine-grained OOD
FINETUNE_STEPS = 4
TABLE_HEADER = "MSP score, ID set 'id_test', ID top-1 accuracy"

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo_command')
    fx.write_fake_fashion(str(root / 'fashion'), num_train=400, num_test=NUM_TEST)
    fx.write_fake_animals(str(root / 'animals'), num=80, duplicates=0)
    workdir = root / 'runs' / 'demo'
    command = [
        sys.executable, 'main.py', '--config=configs/fashion_mnist.py', f'--workdir={workdir}',
        # size-reducing overrides only
        '--config.baseline_epochs=1', f'--config.num_train_steps={FINETUNE_STEPS}',
        '--config.eval_batch_size=64',
        # small fake data instead of the installed files; a fresh TFDS data_dir
        f'--config.data.fashion_mnist_dir={root / "fashion"}',
        f'--config.data.animal_mnist_dir={root / "animals"}',
        f'--config.data.data_dir={root / "tfds"}',
    ]
    env = {k: v for k, v in os.environ.items()  # as from a fresh shell
           if k not in ('PYTHONPATH', 'JAX_COMPILATION_CACHE_DIR')}
    env.update(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS='cpu')
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    return out, workdir


def test_demo_command_exits_cleanly(demo_run):
    out, _ = demo_run
    assert out.returncode == 0, f'stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}'


def test_demo_ran_both_stages(demo_run):
    out, workdir = demo_run
    assert out.returncode == 0, out.stderr[-3000:]
    baseline_steps = os.listdir(workdir / 'baseline' / 'checkpoints')
    assert any(name.isdigit() for name in baseline_steps), baseline_steps
    assert 'stage 1: baseline' in out.stdout
    assert 'stage 2: lmoe fine-tuned from the best baseline checkpoint' in out.stdout
    final_steps = [int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit()]
    assert max(final_steps) == FINETUNE_STEPS


def test_demo_prints_the_msp_table(demo_run):
    out, workdir = demo_run
    assert out.returncode == 0, out.stderr[-3000:]
    assert TABLE_HEADER in out.stdout, out.stdout[-3000:]
    table = out.stdout[out.stdout.index(TABLE_HEADER):]
    header = table.splitlines()[1]
    assert 'FPR@95TPR' in header and 'AUROC' in header
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[3:7]}
    assert set(rows) == {'fine_ood_test', 'digits28', 'fine_mean', 'coarse_mean'}
    report = json.loads((workdir / 'ood_report.json').read_text())
    for name in ('fine_ood_test', 'digits28'):
        fpr, auroc = float(rows[name][0]), float(rows[name][1])
        assert fpr == pytest.approx(100 * report['scores']['msp'][name]['openood_fpr95'], abs=0.006)
        assert auroc == pytest.approx(100 * report['scores']['msp'][name]['openood_auroc'], abs=0.006)


def test_demo_writes_the_report(demo_run):
    out, workdir = demo_run
    assert out.returncode == 0, out.stderr[-3000:]
    for suffix in ('json', 'md', 'csv'):
        assert (workdir / f'ood_report.{suffix}').stat().st_size > 0
    report = json.loads((workdir / 'ood_report.json').read_text())
    assert report['kinds'] == {'id_test': 'id', 'fine_ood_test': 'fine_ood', 'digits28': 'coarse_ood'}
    # set sizes from the fake files' labels and from scikit-learn directly
    test_labels = np.arange(NUM_TEST) % 10
    num_id = int(np.isin(test_labels, ID_CLASSES).sum())
    assert report['num_images'] == {'id_test': num_id, 'fine_ood_test': NUM_TEST - num_id,
                                    'digits28': len(load_digits().target)}
    assert 0.0 <= report['id_accuracy'] <= 1.0
    # the reported MSP AUROC agrees with sklearn on the saved per-image scores (OOD positive)
    scores = np.load(workdir / 'ood_scores.npz')
    id_msp = scores['id_test/msp']
    for name in ('fine_ood_test', 'digits28'):
        ood_msp = scores[f'{name}/msp']
        is_ood = np.r_[np.zeros(len(id_msp)), np.ones(len(ood_msp))]
        expected = roc_auc_score(is_ood, -np.r_[id_msp, ood_msp])
        assert report['scores']['msp'][name]['openood_auroc'] == pytest.approx(expected, abs=1e-9)


def test_demo_terminal_is_short_and_readable(demo_run):
    """One line per log interval (stage, step/total, steps/s, ETA, loss, ID accuracy), one per
    checkpoint, validation and evaluation set, the table; no library chatter without --verbose."""
    out, _ = demo_run
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (out.stdout + out.stderr).splitlines()
    assert len(lines) < 60, '\n'.join(lines)
    step_lines = [l for l in out.stdout.splitlines() if re.match(
        r'\[(baseline|lmoe)\] step +\d+/\d+ +[\d.]+% +[\d.]+ steps/s +ETA +\S+ +loss [\d.]+ +acc +[\d.]+%$', l)]
    assert {l.split()[0] for l in step_lines} == {'[baseline]', '[lmoe]'}, out.stdout
    assert f'[lmoe] step {FINETUNE_STEPS}: checkpoint save started' in out.stdout
    assert re.search(r'\[lmoe\] done: 4 steps; checkpoints on disk: [\d, ]*4 \(best: step \d+\)', out.stdout)
    for name in ('id_test', 'fine_ood_test', 'digits28'):
        assert re.search(rf'\[eval\] {name}: \d+ images', out.stdout), out.stdout
    # the last line: where the minutes went
    assert re.search(r'^done in \S+ \(start-up \S+, stage 1 \S+, stage 2 \S+, evaluation \S+\)$',
                     out.stdout.splitlines()[-1]), out.stdout[-500:]
    for chatter in ('Save Finalize', 'Setting work unit notes', 'Traceback', 'W1', 'I1'):
        assert chatter not in out.stdout + out.stderr
