"""Stanford Cars, MixOE's car benchmark: 150 ID / 46 fine-grained OOD classes per split.

Read by the project's `stanford_cars` builder from files placed by hand (docs/data.md), not
TFDS's `cars196`: that builder still downloads from http://ai.stanford.edu/~jkrause/car196/,
which has returned HTTP 404 since 2023 (tensorflow/datasets issues #5053 and #5656; the pull
request pointing at archived copies is not merged). Splits from MixOE's info/car lists
(validation = val.txt; a clone of github.com/zjysteven/MixOE):

  python -m lmoe_jax.data.prepare --config=configs/cars.py \\
      --config.data.mixoe_info=$HOME/MixOE/info --manual_dir=/data/manual
  python main.py --config=configs/cars.py --config.data.mixoe_info=$HOME/MixOE/info \\
      --config.data.manual_dir=/data/manual --workdir=runs/cars_lmoe

Protocol, outliers and their fallbacks (places365_small, folder:<path>): configs/cub.py.
Coarse OOD: MixOE's draw from the test lists of NABirds, Butterfly-200 and FGVC-Aircraft
(pooled, random.seed(0) sample of the ID test size), reported per dataset (configs/cub.py).
"""
from configs import cub


def get_config():
    return cub.mixoe_benchmark('car')
