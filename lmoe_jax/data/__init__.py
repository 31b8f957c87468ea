"""Data: class splits, TFDS builders the catalog lacks, and the tf.data train / eval streams.

``class_split`` is light; everything else imports TensorFlow, so it loads on first use.
"""
from lmoe_jax.data.splits import ClassSplit, class_split

_LAZY = {
    'dataset_info': 'pipeline', 'train_stream': 'pipeline', 'eval_datasets': 'pipeline',
    'validation_datasets': 'pipeline', 'id_train_eval_dataset': 'pipeline',
    'fine_ood_diagnostic_dataset': 'pipeline',
    'DatasetInfo': 'pipeline', 'EvalSet': 'pipeline', 'TrainStream': 'pipeline',
    'transform_from_config': 'preprocess',
    'DatasetNotReadyError': 'sources', 'DataConfigError': 'sources', 'open_builder': 'sources',
    'DataFileError': 'files',
}

__all__ = ['ClassSplit', 'class_split', *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module = importlib.import_module(f'lmoe_jax.data.{_LAZY[name]}')
        return getattr(module, name)
    raise AttributeError(f'module lmoe_jax.data has no attribute {name!r}')
