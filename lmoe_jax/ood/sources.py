"""Turn what users hold (EvalSets, numpy arrays, tf.data datasets) into one batch stream format.

A *batch source* is a zero-argument callable returning a fresh iterator of numpy dicts
``{'image': float32 [B, ...], 'label': int32 [B] (-1: none), 'mask': bool [B]}``; ``mask`` marks the real
rows of a padded batch. Every evaluation path consumes only that.
"""
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

import numpy as np

BatchSource = Callable[[], Iterator[Mapping[str, np.ndarray]]]
#: 'ood': outliers of unknown kind (e.g. held-out auxiliary outliers)
KINDS = ('id', 'fine_ood', 'coarse_ood', 'ood')


class EvalSet(NamedTuple):
    """One evaluation set. ``kind``: one of ``KINDS``; ``batches()``: a fresh iterator of padded,
    masked numpy batches. The data module also fills in the sizes (``num_examples`` over all
    processes, ``num_batches`` per process, the same on every process).

    Any object with ``name``, ``kind`` and ``batches`` attributes works wherever this one does.
    """
    name: str
    kind: str
    batches: BatchSource
    num_examples: Optional[int] = None
    num_batches: Optional[int] = None


def is_eval_set(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ('name', 'kind', 'batches'))


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    pad = np.zeros((size - len(x),) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


def array_source(images, labels=None, batch_size: int = 256) -> BatchSource:
    """Batches of ``images`` (and ``labels``); the last one padded to ``batch_size`` and masked."""
    images = np.asarray(images)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(f'images must be a non-empty array [N, ...]; got shape {images.shape}.')
    if labels is None:
        labels = np.full(len(images), -1, np.int32)  # unlabelled
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f'{len(images)} images but {len(labels)} labels.')
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1; got {batch_size}.')

    def batches():
        for start in range(0, len(images), batch_size):
            img = images[start:start + batch_size]
            n = len(img)
            yield {'image': pad_rows(np.asarray(img, np.float32), batch_size),
                   'label': pad_rows(labels[start:start + batch_size], batch_size),
                   'mask': np.arange(batch_size) < n}
    return batches


def _is_tf_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith('tensorflow') and hasattr(obj, 'as_numpy_iterator')


def tf_dataset_source(dataset, batch_size: int = 256) -> BatchSource:
    """Batches from a tf.data dataset of dicts ({'image', 'label'[, 'mask']}) or (image, label)
    tuples, batched or not (unbatched ones are batched here; the last batch is then short)."""
    spec = dataset.element_spec
    if isinstance(spec, Mapping):
        image_spec = spec['image']
    else:
        image_spec = spec[0] if isinstance(spec, tuple) else spec
    if image_spec.shape.rank == 3:  # single images: batch them here
        dataset = dataset.batch(batch_size)

    def batches():
        for element in dataset.as_numpy_iterator():
            if isinstance(element, Mapping):
                image, label, mask = element['image'], element.get('label'), element.get('mask')
            elif isinstance(element, tuple):
                image, label, mask = element[0], (element[1] if len(element) > 1 else None), None
            else:
                image, label, mask = element, None, None
            n = len(image)
            yield {'image': np.asarray(image, np.float32),
                   'label': np.full(n, -1, np.int32) if label is None else np.asarray(label, np.int32),
                   'mask': np.ones(n, bool) if mask is None else np.asarray(mask, bool)}
    return batches


def as_batch_source(data: Any, batch_size: int = 256) -> BatchSource:
    """Any supported input -> batch source. Accepts an EvalSet-like object, a callable batch
    source, a tf.data dataset, an image array, an ``(images, labels)`` pair or a dict with
    'image' (and 'label')."""
    if is_eval_set(data):
        return data.batches
    if _is_tf_dataset(data):
        return tf_dataset_source(data, batch_size)
    if callable(data):
        return data
    if isinstance(data, Mapping) and 'image' in data:
        return array_source(data['image'], data.get('label'), batch_size)
    if isinstance(data, tuple) and len(data) == 2:
        return array_source(data[0], data[1], batch_size)
    if isinstance(data, (np.ndarray, list)) or hasattr(data, '__array__'):
        return array_source(data, None, batch_size)
    raise ValueError(f'cannot read evaluation data of type {type(data).__name__}: pass an EvalSet, '
                     'a tf.data dataset, an image array, an (images, labels) pair or a dict with "image".')


def iterate_real_rows(source: BatchSource, limit_batches: Optional[int] = None):
    """Yield (batch, mask) with mask defaulting to all rows; stops after ``limit_batches``."""
    for i, batch in enumerate(source()):
        if limit_batches is not None and i >= limit_batches:
            return
        if 'image' not in batch:
            raise ValueError(f"evaluation batches must be dicts with an 'image' entry; got keys "
                             f'{sorted(batch)}.')
        n = len(batch['image'])
        mask = np.asarray(batch['mask'], bool) if 'mask' in batch else np.ones(n, bool)
        yield batch, mask
