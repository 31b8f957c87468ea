"""TFDS builders the catalog lacks; importing this module registers them with TFDS."""
from lmoe_jax.data.builders.animal_mnist import AnimalMnist
from lmoe_jax.data.builders.digits28 import Digits28
from lmoe_jax.data.builders.fashion_mnist_idx import FashionMnistIdx
from lmoe_jax.data.builders.fgvc_aircraft import FgvcAircraft

# Builders that prepare from local files: safe to prepare automatically on first use.
OFFLINE_BUILDERS = ('fashion_mnist_idx', 'animal_mnist', 'digits28')
# config.data.<knob> holding each builder's source directory.
SOURCE_DIR_KNOBS = {'fashion_mnist_idx': 'fashion_mnist_dir', 'animal_mnist': 'animal_mnist_dir'}

__all__ = ['AnimalMnist', 'Digits28', 'FashionMnistIdx', 'FgvcAircraft',
           'OFFLINE_BUILDERS', 'SOURCE_DIR_KNOBS']
