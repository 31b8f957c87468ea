"""MixOE's benchmarks from tiny fake downloads in the real layouts, and MixOE's image lists.

The fake NABirds, Butterfly-200 and Stanford Cars (data_fixtures) carry the real files' quirks:
spaces in file names, grey and CMYK JPEGs, PNGs named .jpg, nested folders, a truncated JPEG.
Every image is one unique colour, so a decoded row names its file; expected colours are what PIL
decodes from the written bytes. Expected class splits are MixOE's eval.py rule written here with
numpy (``RandomState(split).choice(ID + OOD, ID)``), not read from lmoe_jax.
"""

import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_fixtures as fx
from lmoe_jax import data
from lmoe_jax.data import image_lists, sources
from lmoe_jax.data.files import DataFileError
from lmoe_jax.data.sources import DataConfigError, DatasetNotReadyError

B = 2


def _mixoe_split(num_id, num_ood, split=0):
    ids = set(int(c) for c in np.random.RandomState(split).choice(num_id + num_ood, num_id, replace=False))
    return ids, sorted(set(range(num_id + num_ood)) - ids)


def _examples(builder, split):
    """file name -> (label, image) of every example of a split, decoded by TFDS."""
    rows = tfds.as_numpy(builder.as_dataset(split=split))
    return {r['image/filename'].decode(): (int(r['label']), r['image']) for r in rows}


def _check_pixels(rows, expected):
    for name, (_, image) in rows.items():
        assert image.dtype == np.uint8 and image.shape[-1] == 3
        assert fx.identify(image[None], {name: expected[name]['signature']}) == [name]


@pytest.fixture(scope='module')
def downloads(tmp_path_factory):
    root = tmp_path_factory.mktemp('benchmarks')
    manual = root / 'manual'
    files = {'nabirds': fx.write_fake_nabirds(str(manual / 'nabirds')),
             'butterfly200': fx.write_fake_butterfly(str(manual / 'butterfly200')),
             'stanford_cars': fx.write_fake_cars(str(manual / 'stanford_cars'))}
    return root, files


def _cfg(root, **kw):
    return ml_collections.ConfigDict(dict(data_dir=str(root / 'tfds'), manual_dir=str(root / 'manual'),
                                          download=False, **kw))


# --- the builders ------------------------------------------------------------------------------

def test_nabirds_reads_every_decodable_image_with_dense_labels(downloads):
    root, files = downloads
    builder = sources.open_builder('nabirds', _cfg(root))
    expected = files['nabirds']
    rank = {c: i for i, c in enumerate(sorted({v['class_id'] for v in expected.values()}))}
    for split, train in (('train', True), ('test', False)):
        rows = _examples(builder, split)
        wanted = {n for n, v in expected.items() if v['train'] == train and v['signature'] is not None}
        assert set(rows) == wanted  # the truncated JPEG is skipped, the rest all there
        assert {n: lab for n, (lab, _) in rows.items()} == {n: rank[expected[n]['class_id']] for n in wanted}
        _check_pixels(rows, expected)
    assert '0817/with space 0a1b.jpg' in _examples(builder, 'train')
    assert builder.info.features['label'].num_classes == 555


def test_butterfly_reads_species_folders_at_any_depth(downloads):
    root, files = downloads
    builder = sources.open_builder('butterfly200', _cfg(root))
    expected = files['butterfly200']
    rows = _examples(builder, 'images')
    wanted = {n for n, v in expected.items() if v['signature'] is not None}
    assert set(rows) == wanted  # no Thumbs.db, no truncated JPEG; nested and spaced names kept
    assert {n: lab for n, (lab, _) in rows.items()} == {n: expected[n]['number'] - 1 for n in wanted}
    _check_pixels(rows, expected)
    assert list(builder.info.splits) == ['images']


@pytest.mark.parametrize('layout', ['original', 'mirrored'])
def test_cars_from_either_layout_of_the_devkit(tmp_path, layout):
    files = fx.write_fake_cars(str(tmp_path / 'manual' / 'stanford_cars'), layout=layout)
    builder = sources.open_builder('stanford_cars', _cfg(tmp_path))
    for split in ('train', 'test'):
        rows = _examples(builder, split)
        wanted = {n for n, v in files.items()
                  if n.startswith(f'cars_{split}/') and v['signature'] is not None}
        assert set(rows) == wanted
        assert {n: lab for n, (lab, _) in rows.items()} == {n: files[n]['class'] - 1 for n in wanted}
        _check_pixels(rows, files)
    names = {r['image/filename'].decode(): r['class_name'].decode()
             for r in tfds.as_numpy(builder.as_dataset(split='train'))}
    assert names['cars_train/00004.jpg'] == 'Make196 Model 196 2001'  # 196 % 13 = 1


def test_cars_without_test_labels_names_the_file_and_the_route(tmp_path):
    fx.write_fake_cars(str(tmp_path / 'manual' / 'stanford_cars'), test_labels=False)
    with pytest.raises(DatasetNotReadyError) as err:
        sources.open_builder('stanford_cars', _cfg(tmp_path))
    message = str(err.value)
    assert 'lacks cars_test_annos_withlabels.mat' in message
    assert '404' in message and 'cars_train/cars_train/00001.jpg' in message


# What each builder's message must name for an empty manual directory: its download page and
# the paths of its layout, as docs/data.md's "Where to get each dataset" table writes them.
MISSING_MESSAGES = {
    'nabirds': ('https://dl.allaboutbirds.org/nabirds', 'nabirds/images.txt',
                'image_class_labels.txt', 'train_test_split.txt', 'classes.txt',
                'images/<class id>/'),
    'butterfly200': ('https://www.dropbox.com/sh/3p4x1oc5efknd69/AABwnyoH2EKi6H9Emcyd0pXCa?dl=0',
                     'butterfly200/images_small/<NNN>.<Genus_species>/'),
    'stanford_cars': ('https://ai.stanford.edu/~jkrause/cars/car_dataset.html',
                      'stanford_cars/cars_train/00001.jpg', 'cars_train/cars_train/00001.jpg',
                      'stanford_cars/devkit/cars_meta.mat', 'devkit/cars_train_annos.mat',
                      'stanford_cars/cars_test_annos_withlabels.mat', 'car_devkit/devkit/'),
    'fgvc_aircraft': ('https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/',
                      'fgvc-aircraft-2013b.tar.gz', 'fgvc-aircraft-2013b/'),
    'webvision1_outliers': ('https://data.vision.ee.ethz.ch/cvl/webvision/download.html',
                            'WebVision/info/synsets.txt', 'WebVision/info/queries_synsets_map.txt',
                            'WebVision/google/q0001/*.jpg', 'WebVision/flickr/q0001/*.jpg'),
}
DOCS_NAME = {'nabirds': 'NABirds', 'butterfly200': 'Butterfly-200', 'stanford_cars': 'Stanford Cars',
             'fgvc_aircraft': 'FGVC-Aircraft', 'webvision1_outliers': 'WebVision 1.0'}


def test_missing_download_gives_each_builders_own_instructions(tmp_path):
    """Each builder's error for an empty manual directory names its download page and layout,
    and docs/data.md's table row says the same (so the two cannot drift apart)."""
    (tmp_path / 'manual').mkdir()
    docs = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'docs', 'data.md'), encoding='utf-8').read()
    rows = {line.split('|')[1].strip(): line for line in docs.splitlines() if line.startswith('| ')}
    for name, words in MISSING_MESSAGES.items():
        with pytest.raises(DatasetNotReadyError) as err:
            sources.open_builder(name, _cfg(tmp_path))
        message = str(err.value)
        assert f"'{name}' is not prepared" in message
        row = rows[DOCS_NAME[name]]
        for word in words:
            assert word in message, (name, word, message)
            assert word in row.replace('`', ''), (name, word, row)


# --- MixOE's lists -----------------------------------------------------------------------------

def test_list_lines_read_as_mixoe_reads_them(tmp_path):
    assert image_lists.parse_line('0817/0000139e.jpg 361', 'x') == ('0817/0000139e.jpg', 361)
    assert image_lists.parse_line('001.A_b/IMG 01.jpg 1\r\n', 'x') == ('001.A_b/IMG 01.jpg', 1)
    with pytest.raises(DataFileError, match='x must read'):
        image_lists.parse_line('no_label.jpg', 'x')
    fx.write_mixoe_lists(str(tmp_path), {'train': [('a.jpg', 0), ('a.jpg', 1)], 'test': [('b.jpg', 0)]})
    with pytest.raises(DataFileError, match="train.txt:2 lists 'a.jpg' a second time"):
        image_lists.read_lists(str(tmp_path))


def _nabirds_lists(directory, files, ids, ood):
    """MixOE-style lists with labels of our choosing (not the builder's): 295 -> an ID class,
    298 -> an OOD class, 1005 -> another ID class, 817 -> 300 (>= 255: in no class of the benchmark)."""
    label = {295: min(ids), 298: ood[0], 1005: max(ids), 817: 300}
    rows = {n: (n, label[v['class_id']]) for n, v in files.items() if v['signature'] is not None}
    train = [rows[n] for n, v in files.items() if n in rows and v['train']]
    val = [r for r in train if r[0].startswith('0295/1b2c') or r[0].startswith('0298/4e5f')]
    lists = {'train': [r for r in train if r not in val], 'val': val,
             'test': [rows[n] for n, v in files.items() if n in rows and not v['train']]}
    fx.write_mixoe_lists(str(directory), lists)
    return lists


def _pipeline_cfg(root, **kw):
    base = dict(split=0, id_classes=None, outlier_dataset='digits28', coarse_ood=(),
                val_fraction=0.0, image_size=12, resize_size=16, grayscale=False, normalize='none',
                color_jitter=False, random_flip=True, shuffle_buffer=64)
    base.update(kw)
    return _cfg(root, **base)


def _rows(eval_set, expected):
    names, labels = [], []
    for batch in eval_set.batches():
        mask = batch['mask']
        names += fx.identify(batch['image'][mask], expected)
        labels += list(batch['label'][mask])
    assert eval_set.num_examples == len(names)
    return dict(zip(names, labels))


def test_lists_fix_every_split_and_label_of_nabirds(downloads):
    root, files = downloads
    ids, ood = _mixoe_split(200, 55)
    lists = _nabirds_lists(root / 'info_bird', files['nabirds'], ids, ood)
    cars_lists = root / 'info_car'
    cars = files['stanford_cars']
    fx.write_mixoe_lists(str(cars_lists), {
        'train': [(n, v['class'] - 1) for n, v in cars.items() if n.startswith('cars_train/')],
        'test': [(n, v['class'] - 1) for n, v in cars.items()
                 if n.startswith('cars_test/') and v['signature'] is not None]})
    cfg = _pipeline_cfg(root, dataset='nabirds', num_classes=255, num_id_classes=200,
                        image_lists=str(root / 'info_bird'), coarse_ood=('stanford_cars',),
                        coarse_ood_image_lists={'stanford_cars': str(cars_lists)})
    signatures = {n: v['signature'] for n, v in files['nabirds'].items() if v['signature'] is not None}
    remap = {c: i for i, c in enumerate(sorted(ids))}

    def part(split, keep):
        return {n: lab for n, lab in lists[split] if keep(lab)}

    in_id = lambda lab: lab in ids  # noqa: E731
    in_ood = lambda lab: lab in ood  # noqa: E731
    assert '0817/with space 0a1b.jpg' in dict(lists['train'])  # a 3-field line, label 300: left out
    for split in ('train', 'val', 'test'):  # every set below is checked on ID and OOD images
        assert part(split, in_id) and part(split, in_ood), split

    stream = data.train_stream(cfg, batch_size=1, seed=0, process_index=0, process_count=1)
    trained = {}
    for _ in range(stream.steps_per_epoch):
        batch = next(stream)
        trained.update(zip(fx.identify(batch['image'], signatures), batch['label']))
    assert trained == {n: remap[lab] for n, lab in part('train', in_id).items()}

    sets = {s.name: s for s in data.eval_datasets(cfg, batch_size=B, process_index=0, process_count=1)}
    assert _rows(sets['id_test'], signatures) == {n: remap[lab] for n, lab in part('test', in_id).items()}
    assert _rows(sets['fine_ood_test'], signatures) == {n: -1 for n in part('test', in_ood)}
    car_signatures = {n: v['signature'] for n, v in cars.items() if v['signature'] is not None}
    coarse = _rows(sets['stanford_cars'], car_signatures)
    assert coarse == {n: -1 for n in car_signatures if n.startswith('cars_test/')}

    val = {s.name: s for s in data.validation_datasets(cfg, batch_size=B, process_index=0, process_count=1)}
    assert _rows(val['id_val'], signatures) == {n: remap[lab] for n, lab in part('val', in_id).items()}
    diag = data.fine_ood_diagnostic_dataset(cfg, batch_size=B, process_index=0, process_count=1)
    train_and_val = {**part('train', in_ood), **part('val', in_ood)}
    assert _rows(diag, signatures) == {n: -1 for n in train_and_val}
    info = data.dataset_info(cfg, process_count=1)
    assert info.train_size == len(part('train', in_id)) and info.num_classes == 255


def test_butterfly_lists_keep_mixoes_folder_numbers(downloads):
    """MixOE's lists label folder NNN as NNN and eval.py draws classes from range(200): folder 200
    is in no class (left out of ID and fine OOD), class 0 has no image."""
    root, files = downloads
    expected = files['butterfly200']
    rows = [(n, v['number']) for n, v in expected.items() if v['signature'] is not None]
    lists = {'train': rows[0::3] + rows[1::3], 'val': [], 'test': rows[2::3]}
    lists['val'] = [lists['train'].pop(0)]
    fx.write_mixoe_lists(str(root / 'info_butterfly'), lists)
    cfg = _pipeline_cfg(root, dataset='butterfly200', num_classes=200, num_id_classes=150,
                        image_lists=str(root / 'info_butterfly'), split=1)
    ids, ood = _mixoe_split(150, 50, split=1)  # folder 1 is OOD, folders 2 and 150 are ID
    remap = {c: i for i, c in enumerate(sorted(ids))}
    signatures = {n: v['signature'] for n, v in expected.items() if v['signature'] is not None}
    sets = {s.name: s for s in data.eval_datasets(cfg, batch_size=B, process_index=0, process_count=1)}
    test = dict(lists['test'])
    assert {lab in ids for lab in test.values() if lab < 200} == {True, False}  # both kinds tested
    assert _rows(sets['id_test'], signatures) == {n: remap[lab] for n, lab in test.items() if lab in ids}
    assert _rows(sets['fine_ood_test'], signatures) == {n: -1 for n, lab in test.items() if lab in ood}
    seen = set(_rows(sets['id_test'], signatures)) | set(_rows(sets['fine_ood_test'], signatures))
    assert seen == {n for n, lab in test.items() if lab < 200}  # folder 200 nowhere
    assert any(lab == 200 for lab in test.values())  # ... though its image is in the list
    with pytest.raises(DataConfigError, match='no official train/test split'):
        data.dataset_info(_pipeline_cfg(root, dataset='butterfly200', num_classes=200,
                                        num_id_classes=150), process_count=1)


def test_unknown_listed_paths_are_named(downloads, tmp_path):
    root, files = downloads
    good = [(n, 254) for n, v in files['nabirds'].items() if v['signature'] is not None]
    fx.write_mixoe_lists(str(tmp_path), {'train': good + [('0295/not_there.jpg', 0)],
                                         'test': good[:1] + [('9999/gone.jpg', 1)]})
    cfg = _pipeline_cfg(root, dataset='nabirds', num_classes=255, num_id_classes=200,
                        image_lists=str(tmp_path))
    with pytest.raises(DataFileError) as err:
        data.dataset_info(cfg, process_count=1)
    assert 'train.txt lists 1 image(s)' in str(err.value) and "'0295/not_there.jpg'" in str(err.value)
    cfg.num_classes = 400
    with pytest.raises(DataConfigError, match='labels of .* stop at 254'):
        data.dataset_info(cfg, process_count=1)


def test_coarse_subsample_is_mixoes_pooled_draw(downloads, tmp_path):
    """eval.py pools the other benchmarks' test lists in order and keeps
    random.seed(0); random.sample(pool, len(id_test)): computed here with Python's random."""
    import random
    root, files = downloads
    ids, ood = _mixoe_split(200, 55)
    _nabirds_lists(tmp_path / 'bird', files['nabirds'], ids, ood)
    cars = [(n, v['class'] - 1) for n, v in files['stanford_cars'].items()
            if n.startswith('cars_test/') and v['signature'] is not None]
    butterflies = [(n, v['number']) for n, v in files['butterfly200'].items() if v['signature'] is not None]
    fx.write_mixoe_lists(str(tmp_path / 'car'), {'train': cars[:1], 'test': cars})
    fx.write_mixoe_lists(str(tmp_path / 'butterfly'), {'train': butterflies[:1], 'test': butterflies})
    cfg = _pipeline_cfg(root, dataset='nabirds', num_classes=255, num_id_classes=200,
                        image_lists=str(tmp_path / 'bird'), coarse_ood=('butterfly200', 'stanford_cars'),
                        coarse_ood_image_lists={'stanford_cars': str(tmp_path / 'car'),
                                                'butterfly200': str(tmp_path / 'butterfly')},
                        coarse_ood_subsample=True)
    sets = data.eval_datasets(cfg, batch_size=B, process_index=0, process_count=1)
    size = sets[0].num_examples
    random.seed(0)
    expected = {name for name, _ in random.sample(butterflies + cars, size)}
    signatures = {n: v['signature'] for d in ('butterfly200', 'stanford_cars')
                  for n, v in files[d].items() if v['signature'] is not None}
    drawn = [name for s in sets if s.kind == 'coarse_ood' for name in _rows(s, signatures)]
    assert 0 < size < len(butterflies + cars) and sorted(drawn) == sorted(expected)


def test_changed_annotation_file_rebuilds_nabirds(tmp_path):
    """The prepared copy records the annotation files (sha256, provenance.py): reused while they
    are unchanged, rebuilt when one changes (here the first image moves to the test split)."""
    import hashlib
    import json
    nabirds = tmp_path / 'manual' / 'nabirds'
    files = fx.write_fake_nabirds(str(nabirds))
    builder = sources.open_builder('nabirds', _cfg(tmp_path))
    record_path = builder.data_path / 'source.json'
    record = json.loads(record_path.read_text())
    assert record['files']['classes.txt']['sha256'] == hashlib.sha256(
        (nabirds / 'classes.txt').read_bytes()).hexdigest()
    stamp = os.stat(record_path).st_mtime_ns
    sources.open_builder('nabirds', _cfg(tmp_path))
    assert os.stat(record_path).st_mtime_ns == stamp  # unchanged source: not rebuilt
    split_file = nabirds / 'train_test_split.txt'
    split_file.write_text(split_file.read_text().replace(' 1\n', ' 0\n', 1))
    builder = sources.open_builder('nabirds', _cfg(tmp_path))
    first = fx.NABIRDS_IMAGES[0][1]
    test = {n for n, v in files.items() if (not v['train'] or n == first) and v['signature'] is not None}
    assert set(_examples(builder, 'test')) == test


def test_aircraft_with_mixoe_lists(tmp_path):
    """MixOE's info/aircraft lists name '<id>.jpg', the fgvc_aircraft builder's image/filename."""
    fx.write_fake_aircraft_archive(str(tmp_path / 'manual'), train=6, test=4)
    ids, ood = _mixoe_split(90, 10)
    train = [(f'{1000000 + j}.jpg', c) for j, c in enumerate((min(ids), ood[0], max(ids), ood[1]))]
    fx.write_mixoe_lists(str(tmp_path / 'info'), {
        'train': train[:3], 'val': train[3:] + [('1000004.jpg', min(ids))],
        'test': [('1000100.jpg', ood[0]), ('1000101.jpg', max(ids))]})
    cfg = _pipeline_cfg(tmp_path, dataset='fgvc_aircraft', num_classes=100, num_id_classes=90,
                        image_lists=str(tmp_path / 'info'))
    assert data.dataset_info(cfg, process_count=1).train_size == 2  # min(ids), max(ids)
    val = data.validation_datasets(cfg, batch_size=B, process_index=0, process_count=1)
    sets = {s.name: s for s in data.eval_datasets(cfg, batch_size=B, process_index=0, process_count=1)}
    assert [s.num_examples for s in val] == [1]  # 1000004 (ID); 1000003 is OOD
    assert (sets['id_test'].num_examples, sets['fine_ood_test'].num_examples) == (1, 1)
