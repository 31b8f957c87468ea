"""NABirds, MixOE's bird benchmark: 200 ID / 55 fine-grained OOD classes per split.

MixOE's bird benchmark is not all of NABirds: its eval.py takes the classes range(200 + 55) of
its info/bird lists, in the lists' own numbering. So this config reads every split from those
lists (train.txt, val.txt = validation, test.txt) and needs a clone of github.com/zjysteven/MixOE:

  git clone https://github.com/zjysteven/MixOE $HOME/MixOE
  python -m lmoe_jax.data.prepare --config=configs/nabirds.py \\
      --config.data.mixoe_info=$HOME/MixOE/info --manual_dir=/data/manual
  python main.py --config=configs/nabirds.py --config.data.mixoe_info=$HOME/MixOE/info \\
      --config.data.manual_dir=/data/manual --workdir=runs/nabirds_lmoe

Protocol, outliers and their fallbacks (places365_small, folder:<path>): configs/cub.py.
Coarse OOD: MixOE's draw from the test lists of Butterfly-200, Stanford Cars and FGVC-Aircraft
(pooled, random.seed(0) sample of the ID test size), reported per dataset (configs/cub.py).
Where to get each dataset and what to place where: docs/data.md.
"""
from configs import cub


def get_config():
    return cub.mixoe_benchmark('bird')
