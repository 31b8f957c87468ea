"""MixOE's four benchmark configs, run as a user runs them on fake downloads in the real layouts.

One module fixture writes the fake NABirds, Butterfly-200, Stanford Cars (the mirrored layout),
FGVC-Aircraft and WebVision downloads into one manual directory, MixOE-format image lists for
the four benchmarks, and runs `python -m lmoe_jax.data.prepare --config=configs/nabirds.py`
once (it needs all five datasets). Each config then trains both stages and evaluates through
`main.py` with size-reducing overrides only (small CNN, 16 px, batch 2, a few steps; one CPU
device, as on a laptop), reusing the prepared data_dir.

The lists' labels are chosen here (ID / fine-OOD per MixOE's class rule, computed with numpy), so
the expected set sizes come from the lists, not from the code under test.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data_fixtures as fx
import outlier_fixtures as ofx
from configs import cub
from run_helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {'nabirds': 'bird', 'butterfly': 'butterfly', 'cars': 'car', 'aircraft': 'aircraft'}
SIZE_OVERRIDES = (
    '--config.model.name=small_cnn', '--config.model.width=4', '--config.model.dtype=float32',
    '--config.model.pretrained=', '--config.data.image_size=16', '--config.data.resize_size=20',
    '--config.data.shuffle_buffer=16', '--config.batch_size=2', '--config.baseline_epochs=1',
    '--config.num_train_steps=2', '--config.eval_batch_size=4', '--config.log_every_steps=1',
    '--config.eval_every_steps=2', '--config.checkpoint_every_steps=2', "--config.scores=('msp',)",
)



def test_configs_carry_mixoes_class_counts_and_lists():
    """Class counts of MixOE's SPLIT_NUM_CLASSES (REFERENCES.md), coarse OOD = the other three in
    MixOE's order, and one --config.data.mixoe_info setting every list folder."""
    import importlib
    expected = {'nabirds': ('nabirds', 255, 200), 'butterfly': ('butterfly200', 200, 150),
                'cars': ('stanford_cars', 196, 150), 'aircraft': ('fgvc_aircraft', 100, 90)}
    order = ['nabirds', 'butterfly200', 'stanford_cars', 'fgvc_aircraft']
    for config, benchmark in CONFIGS.items():
        c = importlib.import_module(f'configs.{config}').get_config()
        dataset, total, num_id = expected[config]
        assert (c.data.dataset, c.data.num_classes, c.data.num_id_classes) == (dataset, total, num_id)
        assert list(c.data.coarse_ood) == [d for d in order if d != dataset]
        assert c.data.outlier_dataset == 'webvision1_outliers' and c.data.coarse_ood_subsample
        assert c.data.image_lists is None and c.data.val_fraction == 0.0
        c.data.mixoe_info = '/clone/info'
        assert c.data.image_lists == f'/clone/info/{benchmark}'
        mixoe_names = dict(zip(order, ['bird', 'butterfly', 'car', 'aircraft']))
        assert dict(c.data.coarse_ood_image_lists) == {
            d: f'/clone/info/{mixoe_names[d]}' for d in c.data.coarse_ood}
    c = importlib.import_module('configs.cub').get_config()
    assert 'cars196' not in c.data.coarse_ood and 'image_lists' not in c.data


def _env():
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # as from a fresh shell
    env.update(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS='cpu')
    return env


def _classes(benchmark):
    """MixOE's class rule, split 0: (ID classes, fine-grained OOD classes) of range(ID + OOD)."""
    _, num_id, num_ood = cub.MIXOE_BENCHMARKS[benchmark]
    total = num_id + num_ood
    ids = sorted(int(c) for c in np.random.RandomState(0).choice(total, num_id, replace=False))
    return ids, sorted(set(range(total)) - set(ids)), total


def _lists(benchmark, train_pool, test_pool):
    """train / val / test lists over the given image names: train and val with ID labels, test
    alternating ID and OOD labels, the last test image labelled total - 1 so the lists span
    MixOE's range(ID + OOD). Returns the lists and the number of ID test images."""
    ids, ood, total = _classes(benchmark)
    train = [(name, ids[i % 2]) for i, name in enumerate(train_pool[:-1])]
    val = [(train_pool[-1], ids[0])]
    test = [(name, ids[j % 2] if j % 2 == 0 else ood[0]) for j, name in enumerate(test_pool)]
    test[-1] = (test[-1][0], total - 1)
    num_id_test = sum(label in ids for _, label in test)
    assert len(train) >= 2 and 0 < num_id_test < len(test)
    return {'train': train, 'val': val, 'test': test}, num_id_test


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp('benchmarks')
    manual, info, tfds_dir = root / 'manual', root / 'MixOE' / 'info', root / 'tfds'
    birds = fx.write_fake_nabirds(str(manual / 'nabirds'))
    butterflies = fx.write_fake_butterfly(str(manual / 'butterfly200'))
    cars = fx.write_fake_cars(str(manual / 'stanford_cars'), layout='mirrored')
    fx.write_fake_aircraft_archive(str(manual), train=6, test=4)
    ofx.write_fake_webvision(str(manual))
    readable = {'bird': [n for n, v in birds.items() if v['signature'] is not None],
                'butterfly': [n for n, v in butterflies.items() if v['signature'] is not None],
                'car': [n for n, v in cars.items() if v['signature'] is not None]}
    pools = {
        'bird': ([n for n in readable['bird'] if birds[n]['train']],
                 [n for n in readable['bird'] if not birds[n]['train']]),
        'butterfly': (readable['butterfly'][:6], readable['butterfly'][6:]),
        'car': ([n for n in readable['car'] if n.startswith('cars_train/')],
                [n for n in readable['car'] if n.startswith('cars_test/')]),
        'aircraft': ([f'{1000000 + j}.jpg' for j in range(6)], [f'{1000100 + j}.jpg' for j in range(4)]),
    }
    num_id_test, test_sizes = {}, {}
    for benchmark, (train_pool, test_pool) in pools.items():
        lists, num_id_test[benchmark] = _lists(benchmark, train_pool, test_pool)
        test_sizes[benchmark] = len(lists['test'])
        fx.write_mixoe_lists(str(info / benchmark), lists)
    out = subprocess.run(
        [sys.executable, '-m', 'lmoe_jax.data.prepare', '--config=configs/nabirds.py',
         f'--data_dir={tfds_dir}', f'--manual_dir={manual}', f'--config.data.mixoe_info={info}'],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    return dict(root=root, manual=manual, info=info, tfds=tfds_dir, prepare=out,
                num_id_test=num_id_test, test_sizes=test_sizes)


@pytest.mark.slow
def test_prepare_command_readies_every_dataset_of_a_benchmark(prepared):
    out = prepared['prepare']
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[-1] == 'all 5 datasets are ready.'
    expected = {'nabirds (ID)': 'train 7 / val 1 / test 4', 'webvision1_outliers (outliers)': None,
                'butterfly200 (coarse OOD)': 'train 5 / val 1 / test 4',
                'stanford_cars (coarse OOD)': 'train 5 / val 1 / test 3',
                'fgvc_aircraft (coarse OOD)': 'train 5 / val 1 / test 4'}
    for line, (head, lists) in zip(lines[1:-1], expected.items()):
        assert line.startswith(f'[ready]   {head}: prepared now in {prepared["tfds"]}'), line
        if lists:
            assert f'; MixOE lists: {lists} images, all found, ' in line, line


@pytest.mark.slow
@pytest.mark.parametrize('config', CONFIGS)
def test_benchmark_config_trains_and_evaluates_end_to_end(prepared, config, tmp_path):
    assert prepared['prepare'].returncode == 0, prepared['prepare'].stdout
    benchmark = CONFIGS[config]
    workdir = tmp_path / 'run'
    # nabirds.py runs as a TPU slice worker does (docs/training.md): no manual directory, only
    # the prepared copies (of all five datasets) in the data_dir
    manual = [] if config == 'nabirds' else [f'--config.data.manual_dir={prepared["manual"]}']
    out = subprocess.run(
        [sys.executable, 'main.py', f'--config=configs/{config}.py', f'--workdir={workdir}',
         f'--config.data.mixoe_info={prepared["info"]}', *manual,
         f'--config.data.data_dir={prepared["tfds"]}', *SIZE_OVERRIDES],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, f'stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}'
    assert 'stage 1: baseline' in out.stdout and 'stage 2: lmoe fine-tuned' in out.stdout
    report = json.loads((workdir / 'ood_report.json').read_text())
    sizes = report['num_images']
    num_id = prepared['num_id_test'][benchmark]
    assert sizes['id_test'] == num_id
    assert sizes['fine_ood_test'] == prepared['test_sizes'][benchmark] - num_id
    # coarse OOD: the other three benchmarks' test lists, one pooled draw of the ID test size
    others = {cub.MIXOE_BENCHMARKS[k][0] for k in CONFIGS.values() if k != benchmark}
    coarse = {name for name, kind in report['kinds'].items() if kind == 'coarse_ood'}
    assert coarse <= others and coarse
    assert sum(sizes[name] for name in coarse) == num_id
    assert report['scores']['msp']['fine_ood_test']['openood_auroc'] is not None
