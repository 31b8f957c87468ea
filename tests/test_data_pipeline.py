"""Train and eval streams: read back through real TFDS (fake source files) and under mock_data.

The fake Fashion-MNIST / Animal-MNIST images carry their source index and label in
flip-invariant rows (data_fixtures), so every check compares against the files the test wrote.
"""
import copy
import io

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import data_fixtures as fx
from lmoe_jax import data

ID_CLASSES = (0, 1, 2, 3, 8, 9)
REMAP = {c: i for i, c in enumerate(ID_CLASSES)}
NUM_TRAIN, NUM_TEST = 120, 50
B = 8


@pytest.fixture(scope='module')
def demo_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp('data_pipeline')
    fx.write_fake_fashion(str(root / 'fashion'), num_train=NUM_TRAIN, num_test=NUM_TEST)
    fx.write_fake_animals(str(root / 'animals'), num=40, duplicates=0)
    return ml_collections.ConfigDict(dict(
        dataset='fashion_mnist_idx', data_dir=str(root / 'tfds'), fashion_mnist_dir=str(root / 'fashion'),
        animal_mnist_dir=str(root / 'animals'), num_classes=10, num_id_classes=6, split=0,
        id_classes=list(ID_CLASSES), outlier_dataset='animal_mnist', coarse_ood=('animal_mnist',),
        val_fraction=0.0, image_size=28, resize_size=None, grayscale=True, normalize='none',
        color_jitter=False, random_flip=True, shuffle_buffer=64))


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _stream(cfg, **kw):
    kw.setdefault('process_index', 0)
    kw.setdefault('process_count', 1)
    return data.train_stream(cfg, batch_size=B, **kw)


def test_train_batches_shapes_labels_and_one_epoch_covers_id_train(demo_cfg):
    stream = _stream(demo_cfg, seed=0)
    n_id = sum(1 for i in range(NUM_TRAIN) if i % 10 in ID_CLASSES)  # labels cycle 0..9
    assert stream.steps_per_epoch == n_id // B == 9
    seen = []
    for batch in _take(stream, stream.steps_per_epoch):
        assert batch['image'].shape == (B, 28, 28, 1) and batch['image'].dtype == np.float32
        assert batch['ood_image'].shape == (B, 28, 28, 1) and batch['ood_image'].dtype == np.float32
        assert batch['label'].shape == (B,) and batch['label'].dtype == np.int32
        index, label = fx.decode_tags(batch['image'])
        np.testing.assert_array_equal(batch['label'], [REMAP[int(c)] for c in label])
        np.testing.assert_array_equal(label, index % 10)  # the label belongs to that image
        ood_index, _ = fx.decode_tags(batch['ood_image'])
        assert set(ood_index) <= set(range(5000, 5040))
        seen.extend(index)
    assert sorted(seen) == [i for i in range(NUM_TRAIN) if i % 10 in ID_CLASSES]


def test_same_seed_same_batches_other_seed_other_order(demo_cfg):
    a, b, c = (_take(_stream(demo_cfg, seed=s), 12) for s in (3, 3, 4))
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]['label'], c[0]['label']) or not np.array_equal(a[0]['image'], c[0]['image'])
    epoch0 = np.concatenate([fx.decode_tags(x['image'])[0] for x in a[:9]])
    epoch1 = np.concatenate([fx.decode_tags(x['image'])[0] for x in a[9:12]])
    assert not np.array_equal(epoch0[:len(epoch1)], epoch1)  # reshuffled each epoch


@pytest.mark.parametrize('start', [4, 9, 11])
def test_resume_from_step_gives_identical_batches(demo_cfg, start):
    full = _take(_stream(demo_cfg, seed=7), 13)
    resumed = _take(_stream(demo_cfg, seed=7, start_step=start), 13 - start)
    for x, y in zip(full[start:], resumed):
        assert x.keys() == y.keys() == {'image', 'label', 'ood_image'}
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize('cache', [False, True])
def test_a_stream_without_outliers_gives_the_same_id_batches(demo_cfg, cache):
    """Stage 1 (cross-entropy) reads no outlier: its batches are the full stream's ID part."""
    cfg = ml_collections.ConfigDict({**demo_cfg.to_dict(), 'cache': cache})
    full = _take(_stream(cfg, seed=5), 11)  # crosses an epoch (9 steps)
    resumed = _take(_stream(cfg, seed=5, start_step=4, outliers=False), 7)
    assert all(b.keys() == {'image', 'label'} for b in resumed)
    for x, y in zip(full[4:], resumed):
        np.testing.assert_array_equal(x['image'], y['image'])
        np.testing.assert_array_equal(x['label'], y['label'])
    # it does not even need the outlier dataset to exist
    gone = ml_collections.ConfigDict({**cfg.to_dict(), 'outlier_dataset': 'no_such_dataset'})
    assert next(_stream(gone, seed=5, outliers=False)).keys() == {'image', 'label'}


@pytest.mark.parametrize('cache', [False, True])
def test_tf_data_autotuning_is_off_unless_asked_and_changes_no_batch(demo_cfg, cache):
    """Autotuning's model thread stalled every epoch boundary for up to 60 s (TF 2.21; issue 22):
    it is off by default for the train epochs and the eval passes, and turning it on changes
    neither the batches nor their order (the pipelines are deterministic)."""
    off = ml_collections.ConfigDict({**demo_cfg.to_dict(), 'cache': cache})
    on = ml_collections.ConfigDict({**off.to_dict(), 'autotune': True})
    stream = _stream(off, seed=3)
    assert stream._epoch(0, 0).options().autotune.enabled is False
    assert _stream(on, seed=3)._epoch(0, 0).options().autotune.enabled is True
    batches = {name: _take(_stream(cfg, seed=3), 11) for name, cfg in (('off', off), ('on', on))}
    for x, y in zip(batches['off'], batches['on']):  # 11 steps cross an epoch (9 steps)
        for key in ('image', 'label', 'ood_image'):
            np.testing.assert_array_equal(x[key], y[key])
    eval_sets = {name: data.eval_datasets(cfg, batch_size=B, process_index=0, process_count=1)
                 for name, cfg in (('off', off), ('on', on))}
    for a, b in zip(eval_sets['off'], eval_sets['on']):
        for x, y in zip(a.batches(), b.batches()):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])


def test_two_processes_read_disjoint_parts(demo_cfg):
    parts = [_stream(demo_cfg, seed=0, process_index=p, process_count=2) for p in (0, 1)]
    assert parts[0].steps_per_epoch == parts[1].steps_per_epoch
    seen = [np.concatenate([fx.decode_tags(b['image'])[0] for b in _take(s, s.steps_per_epoch)])
            for s in parts]
    assert set(seen[0]).isdisjoint(seen[1])
    assert all(i % 10 in ID_CLASSES for i in np.concatenate(seen))


def _collect(eval_set):
    rows, batches = [], 0
    for batch in eval_set.batches():
        batches += 1
        assert batch['image'].shape[0] == batch['mask'].shape[0] == batch['label'].shape[0]
        assert (batch['label'][~batch['mask']] == -1).all()
        rows.append({k: v[batch['mask']] for k, v in batch.items()})
    assert batches == eval_set.num_batches
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def test_eval_sets_cover_each_example_once_with_masks(demo_cfg):
    sets = {s.name: s for s in data.eval_datasets(demo_cfg, batch_size=B, process_index=0, process_count=1)}
    assert [(s.name, s.kind) for s in sets.values()] == [
        ('id_test', 'id'), ('fine_ood_test', 'fine_ood'), ('animal_mnist', 'coarse_ood')]
    test_index = np.arange(1000, 1000 + NUM_TEST)
    expected_id = sorted(i for i in test_index if (i - 1000) % 10 in ID_CLASSES)
    expected_ood = sorted(i for i in test_index if (i - 1000) % 10 not in ID_CLASSES)
    rows = _collect(sets['id_test'])
    index, label = fx.decode_tags(rows['image'])
    assert sorted(index) == expected_id and sets['id_test'].num_examples == len(expected_id)
    np.testing.assert_array_equal(rows['label'], [REMAP[int(c)] for c in label])
    last = list(sets['id_test'].batches())[-1]
    assert last['mask'].sum() == len(expected_id) % B and not last['mask'][-1]
    rows = _collect(sets['fine_ood_test'])
    assert sorted(fx.decode_tags(rows['image'])[0]) == expected_ood
    assert (rows['label'] == -1).all()
    assert sorted(fx.decode_tags(_collect(sets['animal_mnist'])['image'])[0]) == list(range(5000, 5040))


def test_eval_images_are_the_source_pixels(demo_cfg, tmp_path):
    arrays = fx.write_fake_fashion(str(tmp_path / 'again'), num_train=NUM_TRAIN, num_test=NUM_TEST)
    rows = _collect(data.eval_datasets(demo_cfg, batch_size=B, process_index=0, process_count=1)[0])
    index, _ = fx.decode_tags(rows['image'])
    np.testing.assert_array_equal(rows['image'][..., 0], arrays['test'][0][index - 1000] / np.float32(255))


def test_eval_processes_split_examples_disjointly_with_equal_batches(demo_cfg):
    count = 3  # 30 ID test images over 3 parts of 50 mixed ones: uneven parts
    per_process = [data.eval_datasets(demo_cfg, batch_size=B, process_index=p, process_count=count)[0]
                   for p in range(count)]
    assert len({s.num_batches for s in per_process}) == 1
    indices = [fx.decode_tags(_collect(s)['image'])[0] for s in per_process]
    union = np.concatenate(indices)
    assert len(union) == len(set(union)) == per_process[0].num_examples
    assert sorted(union) == sorted(i for i in range(1000, 1000 + NUM_TEST) if (i - 1000) % 10 in ID_CLASSES)


def test_validation_sets_hold_out_train_images_not_test(demo_cfg):
    cfg = ml_collections.ConfigDict(demo_cfg.to_dict())
    cfg.val_fraction = 0.25
    val = {s.name: s for s in data.validation_datasets(cfg, batch_size=B, process_index=0, process_count=1)}
    fit = data.id_train_eval_dataset(cfg, batch_size=B, process_index=0, process_count=1)
    val_index = fx.decode_tags(_collect(val['id_val'])['image'])[0]
    fit_index = fx.decode_tags(_collect(fit)['image'])[0]
    all_id_train = [i for i in range(NUM_TRAIN) if i % 10 in ID_CLASSES]
    assert set(val_index).isdisjoint(fit_index)
    assert sorted(np.concatenate([val_index, fit_index])) == all_id_train
    assert sum(1 for i in range(NUM_TRAIN) if i % 10 in ID_CLASSES) * 0.1 < len(val_index)
    assert list(val) == ['id_val']  # no held-out class image is offered for selection
    diag = data.fine_ood_diagnostic_dataset(cfg, batch_size=B, process_index=0, process_count=1)
    assert diag.name == 'fine_ood_diag'
    ood_index = fx.decode_tags(_collect(diag)['image'])[0]
    assert sorted(ood_index) == [i for i in range(NUM_TRAIN) if i % 10 not in ID_CLASSES]
    stream = _stream(cfg, seed=0)
    trained = np.concatenate([fx.decode_tags(b['image'])[0] for b in _take(stream, stream.steps_per_epoch)])
    assert set(trained) <= set(fit_index)
    info = data.dataset_info(cfg, process_count=1)
    assert info.train_size == len(fit_index) and info.image_shape == (28, 28, 1)
    assert info.num_id_classes == 6 and info.class_split.ood_classes == (4, 5, 6, 7)


def test_ignored_classes_are_read_nowhere(demo_cfg):
    """A leave-classes-out run: ID {0,1,2,3}, its OOD the held-out ID classes {8,9}, and the
    split's own OOD classes {4..7} ignored: no set, train or eval, may hold one of their images."""
    cfg = ml_collections.ConfigDict(demo_cfg.to_dict())
    cfg.id_classes, cfg.num_id_classes, cfg.ignore_classes = [0, 1, 2, 3], 4, [4, 5, 6, 7]
    cfg.val_fraction = 0.25
    kw = dict(batch_size=B, process_index=0, process_count=1)
    train = [i for i in range(NUM_TRAIN) if i % 10 < 4]
    test = [i for i in range(1000, 1000 + NUM_TEST) if (i - 1000) % 10 < 4]
    seen = {}
    for s in (data.validation_datasets(cfg, **kw) + data.eval_datasets(cfg, **kw)
              + [data.fine_ood_diagnostic_dataset(cfg, **kw), data.id_train_eval_dataset(cfg, **kw)]):
        rows = _collect(s)
        seen[s.name] = (sorted(fx.decode_tags(rows['image'])[0]), rows['label'])
    fit, val = seen['id_train'][0], seen['id_val'][0]
    assert sorted(fit + val) == train and val
    assert seen['id_test'][0] == test
    assert set(seen['id_test'][1]) == {0, 1, 2, 3}  # remapped over the four ID classes
    assert seen['fine_ood_test'][0] == [i for i in range(1000, 1000 + NUM_TEST) if (i - 1000) % 10 >= 8]
    assert seen['fine_ood_diag'][0] == [i for i in range(NUM_TRAIN) if i % 10 >= 8]
    stream = _stream(cfg, seed=0)
    batches = _take(stream, stream.steps_per_epoch)
    trained = np.concatenate([fx.decode_tags(b['image'])[0] for b in batches])
    assert set(trained) <= set(train) and set(np.concatenate([b['label'] for b in batches])) <= {0, 1, 2, 3}
    info = data.dataset_info(cfg, process_count=1)
    assert info.class_split.ood_classes == (8, 9) and info.class_split.ignored_classes == (4, 5, 6, 7)
    assert info.train_size == len(fit)


@pytest.mark.parametrize('cache', [False, True])
def test_outlier_validation_is_held_out_from_the_outlier_stream(demo_cfg, cache):
    cfg = ml_collections.ConfigDict(demo_cfg.to_dict())
    cfg.val_fraction, cfg.outlier_val_fraction, cfg.cache = 0.25, 0.25, cache
    val = {s.name: s for s in data.validation_datasets(cfg, batch_size=B, process_index=0, process_count=1)}
    assert [(s.name, s.kind) for s in val.values()] == [('id_val', 'id'), ('outlier_val', 'ood')]
    rows = _collect(val['outlier_val'])
    held_out = fx.decode_tags(rows['image'])[0]
    assert (rows['label'] == -1).all() and len(held_out) == len(set(held_out)) == 10  # 25 % of 40
    stream = _stream(cfg, seed=0)
    drawn = np.concatenate([fx.decode_tags(b['ood_image'])[0]
                            for b in _take(stream, 2 * stream.steps_per_epoch)])
    assert set(drawn).isdisjoint(held_out)
    assert set(drawn) | set(held_out) == set(range(5000, 5040))  # the stream draws all the rest
    selection = np.concatenate([fx.decode_tags(_collect(v)['image'])[0] for v in val.values()])
    fashion = selection[selection < 5000]  # fake Fashion train 0..119, test 1000..1049
    assert len(fashion) and (fashion < NUM_TRAIN).all()  # no test image
    assert all(i % 10 in ID_CLASSES for i in fashion)  # nothing from the held-out classes
    with pytest.raises(data.DataConfigError, match='outlier_val_fraction=1.0'):
        cfg.outlier_val_fraction = 1.0
        data.validation_datasets(cfg, batch_size=B, process_index=0, process_count=1)


def test_class_count_mismatch_fails_at_start(demo_cfg):
    cfg = ml_collections.ConfigDict(demo_cfg.to_dict())
    cfg.num_classes = 12
    with pytest.raises(data.DataConfigError, match='num_classes=12'):
        _stream(cfg, seed=0)


# --- catalog datasets under tfds.testing.mock_data -------------------------------------------

def _catalog_cfg():
    return ml_collections.ConfigDict(dict(
        dataset='caltech_birds2011', data_dir=None, num_classes=200, num_id_classes=150, split=1,
        id_classes=None, outlier_dataset='dtd', coarse_ood=('oxford_flowers102',), val_fraction=0.0,
        image_size=24, resize_size=32, grayscale=False, normalize='imagenet', color_jitter=True,
        random_flip=True, shuffle_buffer=100))


def test_catalog_streams_under_mock_data():
    cfg = _catalog_cfg()
    split = data.class_split(200, 150, split=1)
    with tfds.testing.mock_data(num_examples=60):
        decoders = tfds.decode.PartialDecoding(  # the features the pipeline reads: same mock draws
            {'image': True, 'label': True}, decoders={'image': tfds.decode.SkipDecoding()})
        labels = np.array([ex['label'] for ex in tfds.as_numpy(
            tfds.load('caltech_birds2011', split='test', decoders=decoders))])
        n_id = int(np.isin(labels, split.id_classes).sum())
        stream = data.train_stream(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
        assert stream.steps_per_epoch == n_id // 4
        batch = next(stream)
        assert batch['image'].shape == batch['ood_image'].shape == (4, 24, 24, 3)
        assert batch['image'].dtype == batch['ood_image'].dtype == np.float32
        assert batch['image'].min() < 0  # ImageNet normalisation centres the data
        assert batch['label'].dtype == np.int32 and ((0 <= batch['label']) & (batch['label'] < 150)).all()
        sets = data.eval_datasets(cfg, batch_size=16, process_index=0, process_count=1)
        assert [s.kind for s in sets] == ['id', 'fine_ood', 'coarse_ood']
        assert sets[0].num_examples == n_id and sets[1].num_examples == len(labels) - n_id
        assert sets[2].num_examples == 60
        ids = _collect(sets[0])
        assert len(ids['label']) == n_id and ids['image'].shape[1:] == (24, 24, 3)
        expected = sorted(split.label_map()[labels[np.isin(labels, split.id_classes)]])
        assert sorted(ids['label']) == expected


def _png(seed):
    buffer = io.BytesIO()
    from PIL import Image
    Image.fromarray(np.full((10, 10, 3), seed, np.uint8)).save(buffer, format='PNG')
    return buffer.getvalue()


def _fake_catalog(num=24, corrupt=(5,)):
    """as_dataset_fn for mock_data: encoded PNGs (one per label), some replaced by garbage."""
    images = [b'not an image at all' if i in corrupt else _png(i) for i in range(num)]
    labels = np.arange(num, dtype=np.int64) % 200

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        del self, split, decoders, read_config, shuffle_files, kwargs
        return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})

    return as_dataset


def test_corrupt_images_are_skipped_and_counted_not_fatal():
    cfg = _catalog_cfg()
    cfg.id_classes = list(range(150))  # labels 0..23 are all ID
    with tfds.testing.mock_data(as_dataset_fn=_fake_catalog()):
        sets = data.eval_datasets(cfg, batch_size=16, process_index=0, process_count=1)
        rows = _collect(sets[0])
        assert sets[0].num_examples == 24 and len(rows['label']) == 23
        assert 5 not in rows['label']
        stream = data.train_stream(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
        batches = _take(stream, stream.steps_per_epoch * 2)
        assert all(b['image'].shape == (4, 24, 24, 3) for b in batches)
        assert stream.skipped_images >= 2  # one in each stream of epoch 0 (dtd mocks the same)


def test_in_memory_cache_keeps_streams_complete_deterministic_and_resumable(demo_cfg):
    cfg = copy.deepcopy(demo_cfg)
    cfg.cache = True
    stream = _stream(cfg, seed=7)
    first_epoch = _take(stream, stream.steps_per_epoch)
    seen = np.concatenate([fx.decode_tags(b['image'])[0] for b in first_epoch])
    assert len(set(seen)) == len(seen)  # an epoch has no repeats
    assert all(i % 10 in ID_CLASSES for i in seen)
    full = first_epoch + _take(stream, 4)
    resumed = _take(_stream(cfg, seed=7, start_step=7), len(full) - 7)
    for x, y in zip(full[7:], resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    plain = data.eval_datasets(demo_cfg, batch_size=16, process_index=0, process_count=1)[0]
    cached = data.eval_datasets(cfg, batch_size=16, process_index=0, process_count=1)[0]
    for _ in range(2):  # the second pass reads the cache
        for x, y in zip(plain.batches(), cached.batches()):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
