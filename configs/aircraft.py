"""FGVC-Aircraft (100 variants), MixOE's aircraft benchmark: 90 ID / 10 fine-grained OOD classes.

The archive is downloaded by URL when online, or placed by hand (docs/data.md). Splits from
MixOE's info/aircraft lists (validation = val.txt; a clone of github.com/zjysteven/MixOE):

  python -m lmoe_jax.data.prepare --config=configs/aircraft.py \\
      --config.data.mixoe_info=$HOME/MixOE/info --manual_dir=/data/manual
  python main.py --config=configs/aircraft.py --config.data.mixoe_info=$HOME/MixOE/info \\
      --config.data.manual_dir=/data/manual --workdir=runs/aircraft_lmoe

Protocol, outliers and their fallbacks (places365_small, folder:<path>): configs/cub.py.
Coarse OOD: MixOE's draw from the test lists of NABirds, Butterfly-200 and Stanford Cars
(pooled, random.seed(0) sample of the ID test size), reported per dataset (configs/cub.py).
"""
from configs import cub


def get_config():
    return cub.mixoe_benchmark('aircraft')
