"""Stanford Cars (TFDS cars196), MixOE benchmark protocol: 150 ID / 46 fine-grained OOD classes.

Same protocol as configs/cub.py (ResNet-50 from ImageNet weights, 90 + 10 epochs, 448 px).
"""
from configs import cub


def get_config():
    return cub.fine_grained_benchmark('cars196', 196, 150,
                                      coarse_ood=('caltech_birds2011', 'oxford_flowers102', 'dtd'))
