"""The outlier builders (WebVision 1.0 without MixOE's concepts, folder:<path>) on fake files in
their real layouts, and `python -m lmoe_jax.data.prepare` run as a user runs it."""
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import data_fixtures as fx
import outlier_fixtures as ofx
from gcs_emulator import gcs  # noqa: F401  (the fixture)
from lmoe_jax import data
from lmoe_jax.data import prepare, sources
from lmoe_jax.data.builders import webvision
from lmoe_jax.data.sources import DatasetNotReadyError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, **kw):
    return ml_collections.ConfigDict(dict(data_dir=str(tmp_path / 'tfds'), download=False, **kw))


def _rows(builder, split='train'):
    ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
    return list(tfds.as_numpy(ds))


# ------------------------------------------------------------------ WebVision


def test_excluded_synsets_are_mixoe_lists():
    """Counts per domain as in MixOE's INET_SPLITS (utils/dataset.py), no duplicates."""
    counts = {k: len(v) for k, v in webvision.MIXOE_EXCLUDED_SYNSETS.items()}
    assert counts == {'dog': 120, 'bird': 52, 'car': 42, 'butterfly': 6, 'aircraft': 3}
    assert len(webvision.EXCLUDED) == 223


def test_webvision_keeps_exactly_the_images_of_kept_concepts(tmp_path):
    kept = ofx.write_fake_webvision(str(tmp_path / 'manual'))
    builder = sources.open_builder('webvision1_outliers', _cfg(tmp_path, manual_dir=str(tmp_path / 'manual')))
    rows = _rows(builder)
    names = [r['image/filename'].decode() for r in rows]
    assert sorted(names) == sorted(kept)  # by file name: excluded concepts and q0999 are absent
    wnid_of = {i: w for i, (w, _) in enumerate(ofx.SYNSETS)}
    for row in rows:
        query = int(row['image/filename'].decode().split('/')[1][1:])
        concept = ofx.QUERIES[query]  # 1-based line of synsets.txt
        assert row['label'] == concept - 1 and row['synset'].decode() == wnid_of[concept - 1]
        assert row['synset'].decode() not in webvision.EXCLUDED
    # both sources, and the query with Google images only
    assert any(n.startswith('flickr/q0003/') for n in names)
    assert any(n.startswith('google/q0008/') for n in names)


def test_webvision_without_info_files_says_what_to_place_where(tmp_path):
    os.makedirs(tmp_path / 'manual' / 'WebVision' / 'google' / 'q0001')
    with pytest.raises(DatasetNotReadyError) as err:
        sources.open_builder('webvision1_outliers', _cfg(tmp_path, manual_dir=str(tmp_path / 'manual')))
    message = str(err.value)
    assert 'WebVision/info/synsets.txt is missing' in message
    assert webvision.PAGE in message and 'queries_synsets_map.txt' in message
    assert not tfds.builder('webvision1_outliers', data_dir=str(tmp_path / 'tfds')).is_prepared()


def test_webvision_info_parsers_refuse_bad_lines(tmp_path):
    bad = tmp_path / 'synsets.txt'
    bad.write_text('n01440764 tench\nnot-a-wnid dog\n')
    with pytest.raises(data.DataFileError, match='synsets.txt:2'):
        webvision.read_synsets(bad)
    query_map = tmp_path / 'queries_synsets_map.txt'
    query_map.write_text('1 1\n2 3\n')
    with pytest.raises(data.DataFileError, match='concept 3 is not in 1..2'):
        webvision.read_query_map(query_map, 2)


# ------------------------------------------------------------------ folder:<path>


def test_folder_source_reads_every_image_of_a_quirky_tree(tmp_path):
    root = tmp_path / 'my outliers'
    expected = ofx.write_quirky_tree(str(root))
    builder = sources.open_builder(f'folder:{root}', _cfg(tmp_path))
    rows = _rows(builder)
    assert sorted(r['image/filename'].decode() for r in rows) == sorted(expected)
    by_name = {r['image/filename'].decode(): r['image'] for r in rows}
    assert by_name['png named.jpg'][:8] == b'\x89PNG\r\n\x1a\n'  # kept as the PNG it is
    assert by_name['scan.tiff'][:8] == b'\x89PNG\r\n\x1a\n'  # TIFF: converted once to PNG
    for name, encoded in by_name.items():  # what the pipeline decodes: 3 channels, the same size
        assert tuple(tf.io.decode_image(encoded, channels=3).shape) == (10, 12, 3), name
    # another folder gets its own prepared copy
    other = tmp_path / 'other'
    ofx.write_quirky_tree(str(other))
    assert sources.open_builder(f'folder:{other}', _cfg(tmp_path)).data_dir != builder.data_dir


def test_folder_source_feeds_the_train_stream_and_serves_as_coarse_ood(tmp_path):
    """Outliers through the train stream, and the same folder as a coarse OOD eval set."""
    manual = tmp_path / 'manual'
    fx.write_fake_aircraft_archive(str(manual), train=12, test=6)
    folder = tmp_path / 'outliers'
    expected = ofx.write_quirky_tree(str(folder))
    cfg = _cfg(tmp_path, dataset='fgvc_aircraft', manual_dir=str(manual), num_classes=100,
               num_id_classes=90, outlier_dataset=f'folder:{folder}',
               coarse_ood=(f'folder:{folder}',), image_size=8, resize_size=10, shuffle_buffer=16)
    stream = data.train_stream(cfg, batch_size=2, seed=0, process_index=0, process_count=1)
    batch = next(stream)
    assert batch['ood_image'].shape == (2, 8, 8, 3) and np.isfinite(batch['ood_image']).all()
    sets = {s.name: s for s in data.eval_datasets(cfg, batch_size=4, process_index=0, process_count=1)}
    coarse = sets[f'folder:{folder}']
    assert coarse.kind == 'coarse_ood' and coarse.num_examples == len(expected)
    masks = [b['mask'].sum() for b in coarse.batches()]
    assert sum(masks) == len(expected)


def test_main_silences_tfds_custom_config_chatter_of_folder_datasets(tmp_path):
    """TFDS logs 'Using custom data configuration: <the whole config>' (a WARNING) whenever a
    folder:<path> builder is made; main.py drops it unless --verbose. Control: the same call
    before main's filter is installed does print it, so the check is not vacuous."""
    script = (  # inside absl's app.run, where main.py installs its filter
        'import sys, ml_collections\n'
        'from absl import app\n'
        'import main\n'
        'from lmoe_jax.data import sources\n'
        f'cfg = ml_collections.ConfigDict(dict(data_dir={str(tmp_path / "tfds")!r}))\n'
        'def body(argv):\n'
        f'    sources.make_builder("folder:" + {str(tmp_path / "a")!r}, cfg)\n'
        '    print("-- quiet from here --", file=sys.stderr, flush=True)\n'
        '    main._quiet_libraries(verbose=False)\n'
        f'    sources.make_builder("folder:" + {str(tmp_path / "b")!r}, cfg)\n'
        '    print("-- done --", file=sys.stderr, flush=True)\n'
        f'app.run(body, argv=["main.py", "--workdir={tmp_path / "run"}"])\n')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(JAX_PLATFORMS='cpu')
    out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    before, _, after = out.stderr.partition('-- quiet from here --')
    assert 'Using custom data configuration' in before, out.stderr[-3000:]
    assert '-- done --' in after and 'Using custom data configuration' not in after, after


def test_folder_that_does_not_exist_fails_clearly(tmp_path):
    with pytest.raises(DatasetNotReadyError, match='no such folder'):
        sources.open_builder(f'folder:{tmp_path / "nowhere"}', _cfg(tmp_path))


# ------------------------------------------------------------------ the prepare command


def _prepare(*args):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
    return subprocess.run([sys.executable, '-m', 'lmoe_jax.data.prepare', *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def _disk_size(folder) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def test_prepare_command_lists_every_missing_dataset_then_prepares_all(tmp_path):
    """configs/aircraft.py with its coarse OOD sets replaced by folders (the other benchmarks'
    builders are tested on their own): what a user sees on an incomplete, then a complete setup."""
    manual, tfds_dir, folder = tmp_path / 'manual', tmp_path / 'tfds', tmp_path / 'coarse'
    fx.write_fake_aircraft_archive(str(manual), train=6, test=4)
    ofx.write_quirky_tree(str(folder))
    info = tmp_path / 'MixOE' / 'info'
    base = ('--config=configs/aircraft.py', f'--data_dir={tfds_dir}', f'--manual_dir={manual}')
    coarse = f"--config.data.coarse_ood=('folder:{folder}', 'folder:{tmp_path / 'absent'}')"
    # incomplete: no WebVision, a coarse OOD folder that does not exist, MixOE's lists not set
    out = _prepare(*base, coarse)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith('Preparing the datasets of configs/aircraft.py into ')
    missing = [i for i, line in enumerate(lines) if line.startswith('[MISSING]')]
    assert len(missing) == 3, out.stdout  # it went past the first missing dataset
    head, place = lines[missing[0]], lines[missing[0] + 1]
    assert head.startswith('[MISSING] fgvc_aircraft (ID): ListsNotSetError: config.data.mixoe_info')
    assert place == ('          -> git clone https://github.com/zjysteven/MixOE and add '
                     '--config.data.mixoe_info=<the clone>/info (its train / val / test lists '
                     'of every benchmark).')
    head, place = lines[missing[1]], lines[missing[1] + 1]
    assert head.startswith('[MISSING] webvision1_outliers (outliers): FileNotFoundError: ')
    assert head.split(': ', 3)[-1].startswith(f'{manual}/WebVision/info/synsets.txt is missing.')
    assert place.startswith(f'          -> into the manual directory {manual}: ')
    assert webvision.PAGE in place and 'WebVision/google/q0001/' in place
    assert lines[missing[2]].startswith(f"[MISSING] folder:{tmp_path / 'absent'} (coarse OOD): ")
    assert 'no such folder' in lines[missing[2]]
    assert any(line.startswith(f'[ready]   folder:{folder} (coarse OOD): prepared now')
               for line in lines)
    assert lines[-1].startswith('1 of 4 datasets ready; missing: fgvc_aircraft, '
                                'webvision1_outliers, folder:')
    # complete: lists and WebVision placed, the absent folder dropped from the config
    ofx.write_mixoe_lists(str(info), 'aircraft', ofx.AIRCRAFT_LISTS)
    ofx.write_fake_webvision(str(manual))
    out = _prepare(*base, f"--config.data.coarse_ood=('folder:{folder}',)",
                   f'--config.data.mixoe_info={info}')
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    aircraft_dir = tfds_dir / 'fgvc_aircraft' / '1.0.0'
    size = prepare._size(_disk_size(aircraft_dir))
    assert lines[1].startswith(f'[ready]   fgvc_aircraft (ID): already prepared in {aircraft_dir}, '
                               f'{size}, 10 images, 100 classes; MixOE lists: train 4 / val 2 / '
                               'test 4 images, all found, ')
    assert lines[2].startswith('[ready]   webvision1_outliers (outliers): prepared now in ')
    assert ', 10 images, 1,000 classes, ' in lines[2]
    assert lines[-1] == 'all 3 datasets are ready.'


def test_prepare_command_names_listed_images_the_dataset_lacks(tmp_path):
    manual, info = tmp_path / 'manual', tmp_path / 'info'
    fx.write_fake_aircraft_archive(str(manual), train=6, test=4)
    ofx.write_fake_webvision(str(manual))
    lists = dict(ofx.AIRCRAFT_LISTS, test=[('images/1000100.jpg', 9)])  # another layout's paths
    ofx.write_mixoe_lists(str(info), 'aircraft', lists)
    out = _prepare('--config=configs/aircraft.py', f'--data_dir={tmp_path / "tfds"}',
                   f'--manual_dir={manual}', '--config.data.coarse_ood=()',
                   f'--config.data.mixoe_info={info}')
    assert out.returncode == 2, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith('[MISSING]'))
    assert line.startswith('[MISSING] fgvc_aircraft (ID): DataFileError: ')
    assert "lists 1 image(s) the prepared dataset does not hold, e.g. ['images/1000100.jpg']" in line


def test_prepare_command_into_a_gs_data_dir_as_docs_data_md_says(gcs, tmp_path):  # noqa: F811
    """docs/data.md's TPU VM command on a GCS emulator (tests/gcs_emulator.py): downloads on a
    local disk, MixOE's lists and the data_dir in the bucket; a second run only checks. What
    reached the bucket is read through the emulator's own API."""
    manual, lists = tmp_path / 'manual', tmp_path / 'lists'
    fx.write_fake_aircraft_archive(str(manual), train=6, test=4)
    ofx.write_fake_webvision(str(manual))
    folder = ofx.write_mixoe_lists(str(lists), 'aircraft', ofx.AIRCRAFT_LISTS)
    for name in sorted(os.listdir(folder)):  # as `gsutil cp -r info gs://BUCKET/MixOE/info`
        gcs.upload(f'MixOE/info/aircraft/{name}', (lists / 'aircraft' / name).read_bytes())
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(gcs.env, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT)
    command = [sys.executable, '-m', 'lmoe_jax.data.prepare',
               f'--config={os.path.join(ROOT, "configs", "aircraft.py")}',
               f'--config.data.mixoe_info={gcs.gs("MixOE", "info")}', '--config.data.coarse_ood=()',
               f'--data_dir={gcs.gs("tfds")}', f'--manual_dir={manual}']
    for found in ('prepared now', 'already prepared'):
        out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr[-3000:]
        lines = out.stdout.splitlines()
        assert lines[1].startswith(f'[ready]   fgvc_aircraft (ID): {found} in '
                                   f'{gcs.gs("tfds", "fgvc_aircraft", "1.0.0")}, '), lines
        assert '10 images, 100 classes; MixOE lists: train 4 / val 2 / test 4 images, all found' \
            in lines[1]
        assert lines[2].startswith(f'[ready]   webvision1_outliers (outliers): {found} in '
                                   f'{gcs.gs("tfds", "webvision1_outliers", "1.0.0")}, '), lines
        assert lines[-1] == 'all 2 datasets are ready.'
    for name in ('fgvc_aircraft', 'webvision1_outliers'):
        stored = gcs.list(f'tfds/{name}/1.0.0/')
        assert f'tfds/{name}/1.0.0/dataset_info.json' in stored, stored
        assert any('.tfrecord' in n for n in stored), stored
    assert not list(cwd.iterdir()) and not os.path.exists(os.path.join(ROOT, 'gs:'))


def test_trainer_preparation_is_the_prepare_command_code(tmp_path, monkeypatch):
    """trainer.prepare_datasets goes through prepare.prepare_all and raises one error naming
    every missing dataset (a single missing one keeps its own message)."""
    from lmoe_jax import trainer
    calls = []
    real = prepare.prepare_all
    monkeypatch.setattr(prepare, 'prepare_all', lambda cfg, **kw: calls.append(cfg) or real(cfg, **kw))
    cfg = _cfg(tmp_path, dataset='fgvc_aircraft', manual_dir=str(tmp_path / 'empty'),
               num_classes=100, outlier_dataset=f'folder:{tmp_path / "none"}', coarse_ood=())
    with pytest.raises(DatasetNotReadyError) as err:
        trainer.prepare_datasets(cfg)
    assert calls == [cfg]
    message = str(err.value)
    assert message.startswith('2 datasets are not ready')
    assert "'fgvc_aircraft' is not prepared" in message and 'no such folder' in message
