"""FGVC-Aircraft (100 variants; lmoe_jax's own TFDS builder), MixOE protocol: 90 ID / 10 OOD classes.

The archive is downloaded by URL when online, or placed by hand: see docs/data.md
(--config.data.manual_dir=DIR). Same protocol as configs/cub.py.
"""
from configs import cub


def get_config():
    return cub.fine_grained_benchmark('fgvc_aircraft', 100, 90,
                                      coarse_ood=('caltech_birds2011', 'cars196', 'dtd'))
