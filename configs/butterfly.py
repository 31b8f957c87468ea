"""Butterfly-200, MixOE's butterfly benchmark: 150 ID / 50 fine-grained OOD classes per split.

Butterfly-200 comes as one folder of species (images_small/) without a split MixOE uses: every
split is read from MixOE's info/butterfly lists (validation = val.txt), so this config needs a
clone of github.com/zjysteven/MixOE. MixOE's lists number the species folders from 1
(001.Atrophaneura_horishanus -> 1) while its code draws the classes from range(200): class 0 has
no image and species 200 is never ID or fine OOD. This config reproduces that as is (see
docs/data.md, "Label numbering").

  python -m lmoe_jax.data.prepare --config=configs/butterfly.py \\
      --config.data.mixoe_info=$HOME/MixOE/info --manual_dir=/data/manual
  python main.py --config=configs/butterfly.py --config.data.mixoe_info=$HOME/MixOE/info \\
      --config.data.manual_dir=/data/manual --workdir=runs/butterfly_lmoe

Protocol, outliers and their fallbacks (places365_small, folder:<path>): configs/cub.py.
Coarse OOD: MixOE's draw from the test lists of NABirds, Stanford Cars and FGVC-Aircraft
(pooled, random.seed(0) sample of the ID test size), reported per dataset (configs/cub.py).
"""
from configs import cub


def get_config():
    return cub.mixoe_benchmark('butterfly')
