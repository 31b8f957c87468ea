"""Any folder of images as a dataset: ``config.data.outlier_dataset='folder:<path>'``.

For users with their own outliers (or a coarse OOD set). Every image file below the folder, at
any depth, is one example (torchvision's extensions, case-insensitive; names may hold spaces);
the folder names mean nothing (one label, 0). Bytes are kept as they are where TensorFlow
decodes them, other formats become PNG (image_files.py); unreadable files are skipped and
counted. One split, 'train', used for training outliers and, as a coarse OOD set, for testing.

Each folder gets its own prepared copy: the builder config is named after the folder's last
component and a hash of its resolved path (``<data_dir>/image_tree/<name>_<hash>/``), so two
folders never share one and every VM that names the same path (e.g. gs://bucket/outliers)
finds the same copy. A prepared copy is not compared with the folder later (hashing a large
tree at every open would cost minutes): delete it to rebuild after changing the folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Optional

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from lmoe_jax.data import provenance
from lmoe_jax.data.builders import image_files
from lmoe_jax.data.builders.common import ProjectBuilder

PREFIX = 'folder:'


@dataclasses.dataclass(eq=False)
class TreeConfig(tfds.core.BuilderConfig):
    root: str = ''  # the folder, as resolved (absolute local path or gs:// URI)


def tree_config(root: epath.PathLike) -> TreeConfig:
    """The builder config of one folder: a readable name plus a hash of its resolved path."""
    resolved = provenance.resolved(root)
    stem = re.sub(r'[^a-z0-9]+', '_', resolved.rstrip('/').rsplit('/', 1)[-1].lower()).strip('_')
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return TreeConfig(name=f'{stem[:40] or "root"}_{digest}', root=resolved,
                      description=f'Every image under {resolved}.')


class ImageTree(ProjectBuilder):
    """Every image file below one folder (``root``), one label."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Images of a folder tree, original bytes where TF decodes them.'}
    TEST_SPLIT = 'train'  # one split
    FILE_NAME_FEATURE = 'image/filename'
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "config.data.outlier_dataset='folder:<path>' reads every image file (.jpg, .jpeg, .png, "
        '.bmp, .webp, .ppm, .pgm, .tif, .tiff) below <path>, at any depth.')

    def __init__(self, *, root: Optional[epath.PathLike] = None, **kwargs):
        if not root and 'config' not in kwargs:
            raise ValueError("image_tree needs a folder: name the dataset 'folder:<path>'.")
        kwargs.setdefault('config', tree_config(root) if root else None)
        super().__init__(**kwargs)

    @property
    def root(self) -> epath.Path:
        return epath.Path(self.builder_config.root)

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__.split('\n\n')[0],
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=['image']),
                'image/filename': tfds.features.Text(),  # path relative to the folder
            }),
            supervised_keys=('image', 'label'),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self.root.is_dir():
            raise FileNotFoundError(f'folder:{self.root}: no such folder. '
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        files = image_files.image_paths(self.root)
        if not files:
            raise FileNotFoundError(f'folder:{self.root} holds no image file. '
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        return {'train': self._generate_examples(files)}

    def _generate_examples(self, files):
        skipped = 0
        loaded = image_files.read_images(path for _, path in files)  # in order
        for (name, path), (_, data) in zip(files, loaded):
            if data is None:
                skipped += 1
                logging.warning('folder:%s: skipping unreadable file %s', self.root, path)
                continue
            yield name, {'image': data, 'label': 0, 'image/filename': name}
        if skipped:
            logging.warning('folder:%s: skipped %d unreadable files', self.root, skipped)
