"""TFDS builders the catalog lacks; importing this module registers them with TFDS.

``PROJECT_BUILDERS`` is the registry ``sources`` reads: each class declares how it is prepared,
its source-directory knob, its splits and its manual instructions (builders/common.py).
"""
from lmoe_jax.data.builders.animal_mnist import AnimalMnist
from lmoe_jax.data.builders.butterfly200 import Butterfly200
from lmoe_jax.data.builders.common import ProjectBuilder
from lmoe_jax.data.builders.digits28 import Digits28
from lmoe_jax.data.builders.fashion_mnist_idx import FashionMnistIdx
from lmoe_jax.data.builders.fgvc_aircraft import FgvcAircraft
from lmoe_jax.data.builders.image_tree import ImageTree
from lmoe_jax.data.builders.nabirds import Nabirds
from lmoe_jax.data.builders.stanford_cars import StanfordCars
from lmoe_jax.data.builders.webvision import Webvision1Outliers

PROJECT_BUILDERS = {cls.name: cls for cls in (
    FashionMnistIdx, AnimalMnist, Digits28, FgvcAircraft, Nabirds, Butterfly200, StanfordCars,
    Webvision1Outliers, ImageTree)}
FOLDER_PREFIX = 'folder:'  # config dataset names 'folder:<path>' = every image below <path>


def builder_args(name: str) -> tuple[str, dict]:
    """The TFDS name and extra constructor kwargs of a config dataset name."""
    if name.startswith(FOLDER_PREFIX):
        return ImageTree.name, {'root': name[len(FOLDER_PREFIX):]}
    return name, {}


def project_builder(name: str):
    """The project's builder class registered as ``name``, or None (a TFDS catalog dataset)."""
    return PROJECT_BUILDERS.get(builder_args(name)[0])


__all__ = ['AnimalMnist', 'Butterfly200', 'Digits28', 'FashionMnistIdx', 'FgvcAircraft',
           'FOLDER_PREFIX', 'ImageTree', 'Nabirds', 'PROJECT_BUILDERS', 'ProjectBuilder',
           'StanfordCars', 'Webvision1Outliers', 'builder_args', 'project_builder']
