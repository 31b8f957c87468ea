"""tf.data pipelines: the endless, resumable train stream and the padded, masked eval sets.

Determinism and resume: epoch ``e`` of process ``p`` reads its own part of the ID training split,
shuffles files and a buffer with seeds derived from (seed, 'id', p, e), keeps the first
``steps_per_epoch * B`` ID examples and augments each with a stateless seed from
(seed, 'id-aug', p, e) and its position in the epoch. The outlier stream is re-shuffled with
seeds from (seed, 'ood', p, e) at every ID epoch (MixOE's random outlier offset per epoch) and
repeats endlessly within it. So ``start_step=k`` rebuilds epoch ``k // steps_per_epoch`` and skips
``(k % steps_per_epoch) * B`` serialized examples of each stream *before* decoding.

Model selection never sees the test's OOD classes: validation is held-out ID training images
and held-out auxiliary outliers (``config.data.outlier_val_fraction``), which the outlier
stream then never draws.

``config.data.image_lists`` (MixOE's info/<dataset> lists, image_lists.py) replaces the dataset's
splits and labels: train / val / test are exactly the listed images, validation is val.txt.
``config.data.coarse_ood_image_lists`` ({dataset: lists folder}) makes a coarse OOD set that
dataset's listed test images.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from lmoe_jax.data import image_lists, preprocess, sources
from lmoe_jax.data.preprocess import transform_from_config
from lmoe_jax.data.sources import DataConfigError, _get
from lmoe_jax.data.splits import OOD_LABEL, ClassSplit, class_split
from lmoe_jax.ood.sources import EvalSet  # one EvalSet type for the data module and the evaluation

AUTOTUNE = tf.data.AUTOTUNE


class DatasetInfo(NamedTuple):
    """What the trainer needs to know before the first batch."""

    name: str
    num_classes: int  # classes of the ID dataset, ID and held-out together
    num_id_classes: int
    class_split: ClassSplit
    image_shape: tuple  # (H, W, C) of every image the streams yield
    train_size: int  # ID training examples over all processes (after the validation hold-out)
    train_sizes: tuple  # ID training examples per process part (index = process_index)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Train steps per epoch for a per-process batch: every process takes the same number."""
        steps = min(self.train_sizes) // int(batch_size)
        if steps < 1:
            raise DataConfigError(
                f'batch_size={batch_size} per process is larger than the smallest process part '
                f'({min(self.train_sizes)} ID training images); lower config.batch_size.')
        return steps


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller leaves it to us
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= int(process_index) < int(process_count):
        raise ValueError(f'process_index={process_index} must be in 0..{process_count - 1}.')
    return int(process_index), int(process_count)


def _seed(*parts: Any) -> int:
    """A 31-bit seed that depends on every part (ints or short strings), order included."""
    words = []
    for part in parts:
        if isinstance(part, str):
            words.extend(part.encode())
            words.append(256)
        else:
            words.append(int(part) & 0xFFFFFFFF)
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


def _parts(split, count: int) -> list:
    return tfds.even_splits(split, n=count) if count > 1 else [split]


@dataclasses.dataclass(frozen=True)
class _IdData:
    """The ID dataset resolved once: builder, class split and which split strings to read."""

    name: str
    builder: Any
    split: ClassSplit
    train_split: str  # ID training images (after the validation hold-out)
    val_split: Optional[str]  # the held-out share, or None
    full_train_split: str
    test_split: str
    # With config.data.image_lists: the listed images of each split read above (else None).
    train_select: Optional[image_lists.Selection] = None
    val_select: Optional[image_lists.Selection] = None
    full_train_select: Optional[image_lists.Selection] = None
    test_select: Optional[image_lists.Selection] = None

    def id_label(self, label: tf.Tensor) -> tf.Tensor:
        return tf.gather(tf.constant(self.split.label_map(), tf.int64), label)

    def is_id(self, label: tf.Tensor) -> tf.Tensor:
        return self.id_label(label) >= 0

    def is_ood(self, label: tf.Tensor) -> tf.Tensor:  # not ID and not ignored
        return tf.equal(self.id_label(label), OOD_LABEL)


def _id_data(cfg) -> _IdData:
    name = _get(cfg, 'dataset')
    if not name:
        raise DataConfigError('config.data.dataset is empty; name the ID dataset.')
    builder = sources.open_builder(name, cfg)
    num_classes = int(_get(cfg, 'num_classes'))
    lists = _get(cfg, 'image_lists', None)
    if not lists and getattr(builder, 'NEEDS_IMAGE_LISTS', False):
        raise DataConfigError(
            f"dataset '{name}' has no official train/test split: set config.data.image_lists to "
            "MixOE's info/<dataset>/ folder (train.txt, val.txt, test.txt).")
    if not lists:
        sources.check_num_classes(builder, name, num_classes)
    split = class_split(num_classes, int(_get(cfg, 'num_id_classes')), int(_get(cfg, 'split', 0)),
                        _get(cfg, 'id_classes'), _get(cfg, 'ignore_classes', None))
    if lists:
        return _IdData(name, builder, split, **_listed_splits(builder, lists, num_classes, cfg))
    spec = sources.spec(name)
    fraction = float(_get(cfg, 'val_fraction', 0.0) or 0.0)
    if not 0.0 <= fraction < 1.0:
        raise DataConfigError(f'config.data.val_fraction={fraction} must be in [0, 1).')
    train_split, val_split = spec.train_split, None
    if fraction > 0:
        train_split = sources.slice_split(spec.train_split, 1 - fraction, builder, keep_head=True)
        val_split = sources.slice_split(spec.train_split, 1 - fraction, builder, keep_head=False)
    return _IdData(name, builder, split, train_split, val_split, spec.train_split, spec.test_split)


def _split_names(builder) -> dict:
    """Each split of the prepared dataset -> its file names."""
    return {s: sources.file_names_of(builder, s) for s in builder.info.splits.keys()}


def _listed_splits(builder, directory, num_classes: int, cfg) -> dict:
    """_IdData's split fields from MixOE's lists: each role reads the dataset splits that hold its
    images and keeps the listed ones with labels < num_classes (MixOE's range(ID + OOD))."""
    lists = image_lists.read_lists(directory)
    top = max(max(s.labels) for s in lists.values())
    if num_classes > top + 1:
        raise DataConfigError(
            f'config.data.num_classes={num_classes} but the labels of {directory} stop at {top}: '
            f'classes {top + 1}..{num_classes - 1} would have no image.')
    if float(_get(cfg, 'val_fraction', 0.0) or 0.0) > 0:
        logging.warning('config.data.val_fraction is ignored: with image_lists validation is val.txt.')
    names = _split_names(builder)
    out = {}
    for role in ('train', 'val', 'test'):
        if role not in lists:
            logging.warning('%s has no val.txt: no ID validation set.', directory)
            out.update(val_split=None, val_select=None)
            continue
        kept, dropped = image_lists.restrict(lists[role], num_classes)
        if dropped:
            logging.info('%s: %d images with labels >= num_classes=%d are no class of this '
                         'benchmark and are left out (as in MixOE).', lists[role].origin, dropped,
                         num_classes)
        if not kept.names:
            raise DataConfigError(f'{lists[role].origin} lists no image of a class below {num_classes}.')
        out[f'{role}_split'] = image_lists.splits_holding(kept, names)
        out[f'{role}_select'] = kept
    if out['val_select'] is None:
        out.update(full_train_split=out['train_split'], full_train_select=out['train_select'])
    else:
        full = image_lists.merged(out['train_select'], out['val_select'])
        out.update(full_train_split=image_lists.splits_holding(full, names), full_train_select=full)
    return out


def _coarse_selection(name: str, builder, cfg):
    """(split, selection) of a coarse OOD dataset: its listed test images when
    config.data.coarse_ood_image_lists names lists for it, else its whole test split."""
    directory = _get(_get(cfg, 'coarse_ood_image_lists', None) or {}, name)
    if not directory:
        if getattr(builder, 'NEEDS_IMAGE_LISTS', False):
            raise DataConfigError(
                f"coarse OOD dataset '{name}' has no official test split: add its MixOE lists "
                f"folder to config.data.coarse_ood_image_lists (e.g. {{'{name}': '.../info/...'}}).")
        return sources.spec(name).test_split, None
    selection = image_lists.read_lists(directory)['test']  # every label: MixOE keeps them all
    return image_lists.splits_holding(selection, _split_names(builder)), selection


@dataclasses.dataclass(frozen=True)
class _OutlierData:
    """The auxiliary outlier dataset split into what training sees and the held-out rest."""

    name: str
    builder: Any
    train_split: str  # the outliers the train stream draws from
    val_split: Optional[str]  # held out for model selection (never trained on), or None


def _outlier_data(cfg) -> _OutlierData:
    """config.data.outlier_val_fraction holds out the last share of each outlier split component
    (TFDS stores examples in shuffled order, so a fixed random subset of a prepared dataset)."""
    name = _get(cfg, 'outlier_dataset')
    if not name:
        raise DataConfigError('config.data.outlier_dataset is empty; name the outlier dataset.')
    builder = sources.open_builder(name, cfg)
    fraction = float(_get(cfg, 'outlier_val_fraction', 0.0) or 0.0)
    if not 0.0 <= fraction < 1.0:
        raise DataConfigError(f'config.data.outlier_val_fraction={fraction} must be in [0, 1).')
    split = sources.spec(name).train_split
    if fraction == 0:
        return _OutlierData(name, builder, split, None)
    return _OutlierData(name, builder,
                        sources.slice_split(split, 1 - fraction, builder, keep_head=True),
                        sources.slice_split(split, 1 - fraction, builder, keep_head=False))


def _count(builder, split, keep: Callable[[np.ndarray], np.ndarray], select=None) -> int:
    return int(np.sum(keep(sources.labels_of(builder, split, select))))


def _np_is_id(data: _IdData) -> Callable[[np.ndarray], np.ndarray]:
    table = data.split.label_map()
    return lambda labels: table[labels] >= 0


def _np_is_ood(data: _IdData) -> Callable[[np.ndarray], np.ndarray]:
    table = data.split.label_map()
    return lambda labels: table[labels] == OOD_LABEL


def _train_sizes(data: _IdData, process_count: int) -> tuple:
    return tuple(_count(data.builder, part, _np_is_id(data), data.train_select)
                 for part in _parts(data.train_split, process_count))


def dataset_info(data_config, *, process_count: Optional[int] = None) -> DatasetInfo:
    """Class split, image shape and ID training sizes (global and per process part)."""
    _, process_count = _process(0, process_count) if process_count else _process(None, None)
    data = _id_data(data_config)
    sizes = _train_sizes(data, process_count)
    return DatasetInfo(
        name=data.name, num_classes=data.split.num_classes,
        num_id_classes=len(data.split.id_classes), class_split=data.split,
        image_shape=transform_from_config(data_config).image_shape,
        train_size=int(sum(sizes)), train_sizes=sizes)


def _options(ds: tf.data.Dataset, cfg) -> tf.data.Dataset:
    """Deterministic order; tf.data's autotuning model thread only if ``config.data.autotune``:
    on TF 2.21 an iterator's destruction (every epoch boundary, every eval pass) waits for that
    thread's current sleep, which grows to 60 s, so long-lived iterators stalled the train loop
    for up to a minute per epoch (docs/benchmarks.md). Without it, AUTOTUNE map parallelism is
    the core count and prefetch buffers still grow; the elements and their order are the same."""
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    options.autotune.enabled = bool(_get(cfg, 'autotune', False))
    return ds.with_options(options)


class TrainStream:
    """Endless iterator of {'image', 'label', 'ood_image'} numpy batches; see the module doc.

    ``outliers=False`` (a method that trains on no outlier, e.g. stage 1's cross-entropy):
    batches have no 'ood_image' and the outlier stream is never read or augmented, which on a
    small machine is half the pipeline's CPU time; the ID batches are the same either way.

    Attributes: ``steps_per_epoch``; ``skipped_images``, the corrupt images skipped so far
    (a corrupt image is replaced by the next one, so batches after it in that epoch shift).
    """

    def __init__(self, data_config, *, batch_size: int, seed: int, start_step: int = 0,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 outliers: bool = True):
        self.process_index, self.process_count = _process(process_index, process_count)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise DataConfigError(f'batch_size={batch_size} must be >= 1.')
        if int(start_step) < 0:
            raise ValueError(f'start_step={start_step} must be >= 0.')
        self.seed = int(seed)
        self._cfg = data_config
        self._transform = transform_from_config(data_config)
        self._id = _id_data(data_config)
        sizes = _train_sizes(self._id, self.process_count)
        self.info_train_sizes = sizes
        self.steps_per_epoch = DatasetInfo(
            '', 0, 0, self._id.split, (), sum(sizes), sizes).steps_per_epoch(self.batch_size)
        self.outliers = bool(outliers)
        if self.outliers:
            outlier_data = _outlier_data(data_config)
            self._ood_builder = outlier_data.builder
            self._ood_part = _parts(outlier_data.train_split,
                                    self.process_count)[self.process_index]
        self._id_part = _parts(self._id.train_split, self.process_count)[self.process_index]
        self.skipped_images = 0
        self._cached = self._cached_sources() if _get(data_config, 'cache', False) else None
        self._batches = self._generate(int(start_step))

    def _cached_sources(self) -> dict:
        """config.data.cache: decode each stream's part once and keep it in memory (small sets).

        Read in file order (no per-epoch file shuffle); every epoch then shuffles the cached
        images with its own seed, so batches stay deterministic and resumable.
        """
        channels = self._transform.channels

        def decoded(ds):
            return ds.map(lambda ex: {**ex, 'image': preprocess.decode(ex['image'], channels)},
                          num_parallel_calls=AUTOTUNE).ignore_errors().cache()

        id_part = sources.read(self._id.builder, self._id_part, select=self._id.train_select).filter(
            lambda ex: self._id.is_id(ex['label']))
        cached = {'id': decoded(id_part)}
        if self.outliers:
            cached['ood'] = decoded(sources.read(self._ood_builder, self._ood_part))
        return cached

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._batches)

    def _stream(self, stream: str, epoch: int, skip: int) -> tf.data.Dataset:
        """One epoch of one stream: shuffled, positions enumerated, skipped, augmented, batched."""
        p, s, t = self.process_index, self.seed, self._transform
        take = self.steps_per_epoch * self.batch_size
        buffer = int(_get(self._cfg, 'shuffle_buffer', 10_000))
        if stream == 'id':
            if self._cached:
                ds = self._cached['id']
            else:
                ds = sources.read(self._id.builder, self._id_part, shuffle_files=True,
                                  file_seed=_seed(s, 'id-files', p, epoch),
                                  select=self._id.train_select)
                ds = ds.filter(lambda ex: self._id.is_id(ex['label']))
            ds = ds.shuffle(buffer, seed=_seed(s, 'id-shuffle', p, epoch),
                            reshuffle_each_iteration=False)
            ds = ds.repeat(2)  # spare examples replace corrupt ones; take() below cuts the epoch
        else:
            if self._cached:
                ds = self._cached['ood']
            else:
                ds = sources.read(self._ood_builder, self._ood_part, shuffle_files=True,
                                  file_seed=_seed(s, 'ood-files', p, epoch), reshuffle=True)
            ds = ds.repeat().shuffle(int(_get(self._cfg, 'outlier_shuffle_buffer', None) or buffer),
                                     seed=_seed(s, 'ood-shuffle', p, epoch),
                                     reshuffle_each_iteration=True)
        aug_key = _seed(s, f'{stream}-aug', p, epoch)
        id_label = self._id.id_label

        cached = self._cached is not None

        def prepare(position, example):
            image = example['image'] if cached else preprocess.decode(example['image'], t.channels)
            key = tf.stack([tf.constant(aug_key, tf.int64), position])
            out = {'image': preprocess.train_transform(image, key, t), 'pos': position}
            if stream == 'id':
                out['label'] = tf.cast(id_label(example['label']), tf.int32)
            return out

        ds = ds.enumerate().skip(skip)
        ds = ds.map(prepare, num_parallel_calls=AUTOTUNE).ignore_errors()
        return ds.take(take - skip).batch(self.batch_size, drop_remainder=True)

    def _epoch(self, epoch: int, skip: int) -> tf.data.Dataset:
        ds = self._stream('id', epoch, skip)
        if self.outliers:
            ds = tf.data.Dataset.zip(ds, self._stream('ood', epoch, skip)).map(
                lambda a, b: {'image': a['image'], 'label': a['label'], 'ood_image': b['image'],
                              'pos': a['pos'], 'ood_pos': b['pos']})
        return _options(ds.prefetch(AUTOTUNE), self._cfg)

    def _generate(self, start_step: int) -> Iterator[dict]:
        first_epoch, step_in_epoch = divmod(start_step, self.steps_per_epoch)
        for epoch in itertools.count(first_epoch):
            skip = step_in_epoch * self.batch_size if epoch == first_epoch else 0
            expected = {'pos': skip, 'ood_pos': skip} if self.outliers else {'pos': skip}
            steps = 0
            for batch in self._epoch(epoch, skip).as_numpy_iterator():
                for key in expected:  # gaps in positions are the corrupt images skipped
                    positions = batch.pop(key)
                    gaps = int(positions[-1] - expected[key] + 1 - len(positions))
                    if gaps:
                        self.skipped_images += gaps
                        logging.warning('train stream: skipped %d corrupt image(s) (%d so far)',
                                        gaps, self.skipped_images)
                    expected[key] = int(positions[-1]) + 1
                steps += 1
                yield batch
            if steps == 0:
                raise RuntimeError(
                    f'epoch {epoch} of the train stream yielded no batch: are all images of '
                    f"'{self._id.name}' or the outliers corrupt?")


def train_stream(data_config, *, batch_size: int, seed: int, start_step: int = 0,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 outliers: bool = True) -> TrainStream:
    """Endless, deterministic, resumable iterator of per-process train batches (see TrainStream)."""
    return TrainStream(data_config, batch_size=batch_size, seed=seed, start_step=start_step,
                       process_index=process_index, process_count=process_count,
                       outliers=outliers)


def _eval_set(name: str, kind: str, builder, split, keep_np, keep_tf, label_tf, cfg,
              batch_size: int, process_index: int, process_count: int, select=None) -> EvalSet:
    """Padded, masked eval batches of this process's part; every process yields as many batches.
    ``select``: only the images of an image list (image_lists.py)."""
    batch_size = int(batch_size)
    if batch_size < 1:
        raise DataConfigError(f'eval batch_size={batch_size} must be >= 1.')
    parts = _parts(split, process_count)
    counts = [_count(builder, part, keep_np, select) for part in parts]
    num_batches = math.ceil(max(counts) / batch_size) if counts else 0
    t = transform_from_config(cfg)
    part = parts[process_index]
    height, width, channels = t.image_shape
    empty = {'image': tf.zeros([batch_size, height, width, channels], tf.float32),
             'label': tf.fill([batch_size], tf.constant(-1, tf.int32)),
             'mask': tf.zeros([batch_size], tf.bool)}

    def prepare(example):
        image = preprocess.eval_transform(preprocess.decode(example['image'], channels), t)
        return {'image': image, 'label': tf.cast(label_tf(example['label']), tf.int32),
                'mask': tf.constant(True)}

    def pad(batch):
        missing = batch_size - tf.shape(batch['mask'])[0]
        return {key: tf.concat([value, empty[key][:missing]], axis=0) for key, value in batch.items()}

    prepared = sources.read(builder, part, select=select).filter(lambda ex: keep_tf(ex['label']))
    prepared = prepared.map(prepare, num_parallel_calls=AUTOTUNE).ignore_errors()
    if _get(cfg, 'cache', False):  # decoded once, kept in memory for every later pass
        prepared = prepared.cache()

    def batches() -> Iterator[dict]:
        ds = prepared.batch(batch_size).map(pad)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)
        yielded = 0
        for batch in _options(ds.prefetch(AUTOTUNE), cfg).as_numpy_iterator():
            yielded += int(batch['mask'].sum())
            yield batch
        if yielded != counts[process_index]:
            logging.warning('eval set %s: skipped %d corrupt image(s)', name,
                            counts[process_index] - yielded)

    return EvalSet(name, kind, batches, int(sum(counts)), int(num_batches))


def _all(labels):
    return np.ones(np.shape(labels), bool)


def _keep_all(label: tf.Tensor) -> tf.Tensor:
    return tf.constant(True)


def _ood_label(label: tf.Tensor) -> tf.Tensor:
    """OOD sets carry label -1."""
    return -tf.ones_like(label)


def eval_datasets(data_config, *, batch_size: int, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> list:
    """ID test, fine-grained OOD test (held-out classes) and every coarse OOD test set."""
    p, n = _process(process_index, process_count)
    data = _id_data(data_config)
    sets = [
        _eval_set('id_test', 'id', data.builder, data.test_split, _np_is_id(data), data.is_id,
                  data.id_label, data_config, batch_size, p, n, data.test_select),
        _eval_set('fine_ood_test', 'fine_ood', data.builder, data.test_split, _np_is_ood(data),
                  data.is_ood, _ood_label, data_config, batch_size, p, n, data.test_select),
    ]
    coarse = _get(data_config, 'coarse_ood', ()) or ()
    if isinstance(coarse, str):
        coarse = (coarse,)
    opened = []
    for name in coarse:
        if name == data.name:
            raise DataConfigError(f"config.data.coarse_ood lists the ID dataset '{name}'; remove it.")
        builder = sources.open_builder(name, data_config)
        opened.append((name, builder, *_coarse_selection(name, builder, data_config)))
    if _get(data_config, 'coarse_ood_subsample', False):
        opened = _subsampled(opened, sets[0].num_examples)
    for name, builder, split, select in opened:
        sets.append(_eval_set(name, 'coarse_ood', builder, split, _all, _keep_all,
                              _ood_label, data_config, batch_size, p, n, select))
    return sets


def _subsampled(opened: list, size: int) -> list:
    """Coarse OOD sets subsampled to ``size`` (the ID test size).

    When every set comes from image lists: MixOE's draw (eval.py: the others' test lists pooled in
    order, ``random.seed(0); random.sample(samples, len(id_set))``) over the sets in config order,
    the drawn images split back per dataset (a set that draws none is left out); together they
    are MixOE's one coarse set. Otherwise each set keeps its first ``size`` examples.
    """
    if any(select is None for *_, select in opened):
        out = []
        for name, builder, split, select in opened:
            if select is None:
                split = _subsample(builder, split, size)
            else:
                select = _subset(select, range(min(size, len(select.names))))
            out.append((name, builder, split, select))
        return out
    pool = [(k, i) for k, (*_, select) in enumerate(opened) for i in range(len(select.names))]
    if len(pool) <= size:
        return opened
    drawn = random.Random(0).sample(pool, size)
    out = []
    for k, (name, builder, split, select) in enumerate(opened):
        keep = sorted(i for j, i in drawn if j == k)
        if keep:
            out.append((name, builder, split, _subset(select, keep)))
        else:
            logging.info('coarse OOD %s: no image drawn into the subsample of %d', name, size)
    return out


def _subset(selection: image_lists.Selection, keep) -> image_lists.Selection:
    keep = list(keep)
    return image_lists.Selection(tuple(selection.names[i] for i in keep),
                                 tuple(selection.labels[i] for i in keep), selection.origin)


def _subsample(builder, split: str, size: int) -> str:
    """The first ``size`` examples of ``split`` (TFDS stores examples in shuffled order)."""
    total = sources.num_examples(builder, split)
    if total <= size:
        return split
    if '+' not in split:
        return f'{split}[:{size}]'
    return sources.slice_split(split, size / total, builder, keep_head=True)


def validation_datasets(data_config, *, batch_size: int, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> list:
    """Model-selection sets, none of them from test images or from the held-out (test OOD)
    classes: 'id_val' (held-out ID training images, when config.data.val_fraction > 0) and
    'outlier_val' (kind 'ood': held-out auxiliary outliers the train stream never draws, when
    config.data.outlier_val_fraction > 0)."""
    p, n = _process(process_index, process_count)
    data = _id_data(data_config)
    sets = []
    if data.val_split is not None:
        sets.append(_eval_set('id_val', 'id', data.builder, data.val_split, _np_is_id(data),
                              data.is_id, data.id_label, data_config, batch_size, p, n,
                              data.val_select))
    outliers = _outlier_data(data_config)
    if outliers.val_split is not None:
        sets.append(_eval_set('outlier_val', 'ood', outliers.builder, outliers.val_split, _all,
                              _keep_all, _ood_label, data_config, batch_size, p, n))
    return sets


def fine_ood_diagnostic_dataset(data_config, *, batch_size: int,
                                process_index: Optional[int] = None,
                                process_count: Optional[int] = None) -> EvalSet:
    """'fine_ood_diag': TRAINING images of the held-out classes, i.e. of the classes the test
    calls OOD. A diagnostic to report apart; choosing anything with it leaks the test's OOD
    classes into the choice, so it is not part of validation_datasets."""
    p, n = _process(process_index, process_count)
    data = _id_data(data_config)
    return _eval_set('fine_ood_diag', 'fine_ood', data.builder, data.full_train_split,
                     _np_is_ood(data), data.is_ood, _ood_label, data_config, batch_size, p, n,
                     data.full_train_select)


def id_train_eval_dataset(data_config, *, batch_size: int, process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> EvalSet:
    """ID training images (after the hold-out) with the eval transform, padded and masked:
    for fitting feature statistics (Mahalanobis, ViM)."""
    p, n = _process(process_index, process_count)
    data = _id_data(data_config)
    return _eval_set('id_train', 'id', data.builder, data.train_split, _np_is_id(data), data.is_id,
                     data.id_label, data_config, batch_size, p, n, data.train_select)
