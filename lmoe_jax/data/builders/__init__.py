"""TFDS builders the catalog lacks; importing this module registers them with TFDS.

``PROJECT_BUILDERS`` is the registry ``sources`` reads: each class declares how it is prepared,
its source-directory knob, its splits and its manual instructions (builders/common.py).
"""
from lmoe_jax.data.builders.animal_mnist import AnimalMnist
from lmoe_jax.data.builders.common import ProjectBuilder
from lmoe_jax.data.builders.digits28 import Digits28
from lmoe_jax.data.builders.fashion_mnist_idx import FashionMnistIdx
from lmoe_jax.data.builders.fgvc_aircraft import FgvcAircraft

PROJECT_BUILDERS = {cls.name: cls for cls in (
    FashionMnistIdx, AnimalMnist, Digits28, FgvcAircraft)}


def project_builder(name: str):
    """The project's builder class registered as ``name``, or None (a TFDS catalog dataset)."""
    return PROJECT_BUILDERS.get(name)


__all__ = ['AnimalMnist', 'Digits28', 'FashionMnistIdx', 'FgvcAircraft', 'PROJECT_BUILDERS',
           'ProjectBuilder', 'project_builder']
