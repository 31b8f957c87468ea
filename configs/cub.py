"""CUB-200-2011 (150 ID / 50 fine-grained OOD bird classes): the CUB variant of MixOE's bird
benchmark (MixOE's own bird benchmark is NABirds: configs/nabirds.py).

MixOE's protocol (shared by every benchmark config, `fine_grained_benchmark` below):
stage 1 cross-entropy baseline for 90 epochs from ImageNet weights (torchvision ResNet-50);
stage 2 the OE-family `method` fine-tunes it for 10 epochs; batch 32 ID + 32 outliers at 448 px
crops of 512 px images; SGD Nesterov, lr 1e-3, weight decay 1e-5, cosine per step down to 1e-6.
Outliers: WebVision 1.0 without MixOE's excluded concepts (`webvision1_outliers`); a user without
WebVision can use `--config.data.outlier_dataset=places365_small` (TFDS catalog, 24 GB) or any
folder of images, `--config.data.outlier_dataset=folder:/path/to/images`.
Coarse OOD: the test lists of MixOE's other benchmarks (here Butterfly-200, Stanford Cars,
FGVC-Aircraft) pooled in MixOE's order, and one random.seed(0) sample of the ID test size drawn
from the pool, as MixOE's eval.py does: the same images. One difference: MixOE scores that
sample as one set; we report its part from each dataset as its own set, plus their mean.
CUB has no MixOE image lists: train / test are TFDS's, 10% of train is held out for validation.
The coarse sets are the images of MixOE's test lists (Butterfly-200 has no other split), so
`--config.data.mixoe_info` must name the info/ folder of a clone of github.com/zjysteven/MixOE.

  python -m lmoe_jax.data.prepare --config=configs/cub.py --config.data.mixoe_info=$HOME/MixOE/info \\
      --manual_dir=/data/manual                        # once: prepares and checks every dataset
  python main.py --config=configs/cub.py --config.data.mixoe_info=$HOME/MixOE/info \\
      --config.data.manual_dir=/data/manual --workdir=runs/cub_lmoe

ImageNet weights: `bash scripts/get_pretrained.sh resnet50 ~/weights` then
--config.model.pretrained=~/weights/resnet50.tv_in1k.safetensors (the default below is the hub id,
fetched through huggingface_hub's cache when the machine is online).
"""
import ml_collections

from configs import default

# MixOE's four benchmarks (utils/dataset.py SPLIT_NUM_CLASSES), in its order: its name (= its
# info/<name>/ lists folder) -> (our dataset, ID classes, fine-grained OOD classes).
MIXOE_BENCHMARKS = {
    'bird': ('nabirds', 200, 55),
    'butterfly': ('butterfly200', 150, 50),
    'car': ('stanford_cars', 150, 46),
    'aircraft': ('fgvc_aircraft', 90, 10),
}


def fine_grained_benchmark(dataset: str, num_classes: int, num_id: int, coarse_ood):
    """The shared MixOE protocol; each dataset config fills in its names and class counts."""
    c = default.get_config()
    c.method = 'lmoe'
    c.data.dataset = dataset
    c.data.num_classes = num_classes
    c.data.num_id_classes = num_id
    c.data.split = 0  # 0, 1, 2 are the standard class splits
    c.data.outlier_dataset = 'webvision1_outliers'
    c.data.coarse_ood = tuple(coarse_ood)
    c.data.coarse_ood_subsample = True  # MixOE's pooled draw of the ID test size
    c.data.val_fraction = 0.1
    c.data.resize_size = 512
    c.data.image_size = 448
    c.data.normalize = 'imagenet'
    c.data.color_jitter = True

    c.model.name = 'resnet50'
    c.model.width = 64
    c.model.dtype = 'bfloat16'  # params, logits and losses stay float32
    c.model.pretrained = 'timm/resnet50.tv_in1k'

    c.batch_size = 32
    c.baseline_epochs = 90
    c.num_epochs = 10
    c.optimizer = 'sgd'
    c.learning_rate = 1e-3
    c.end_learning_rate = 1e-6
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-5
    c.eval_batch_size = 64
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    return c


def with_mixoe_lists(c, own, coarse):
    """``config.data.mixoe_info`` (MixOE's info/ folder) sets the image lists of the ID dataset
    (its info/<own>/, unless ``own`` is None) and of each coarse OOD set of MixOE's ``coarse``
    benchmarks; left unset (None), no lists are read."""
    info = ml_collections.FieldReference(None, field_type=str)
    c.data.mixoe_info = info
    if own is not None:
        c.data.image_lists = info + f'/{own}'
    c.data.coarse_ood_image_lists = ml_collections.ConfigDict(
        {MIXOE_BENCHMARKS[k][0]: info + f'/{k}' for k in coarse})
    return c


def mixoe_benchmark(key: str):
    """MixOE's benchmark ``key`` ('bird', 'butterfly', 'car', 'aircraft'): its dataset and class
    counts, coarse OOD = the other three, every split from MixOE's lists (validation = val.txt)."""
    dataset, num_id, num_ood = MIXOE_BENCHMARKS[key]
    others = [k for k in MIXOE_BENCHMARKS if k != key]
    c = fine_grained_benchmark(dataset, num_id + num_ood, num_id,
                               coarse_ood=[MIXOE_BENCHMARKS[k][0] for k in others])
    c.data.val_fraction = 0.0  # validation = the lists' val.txt
    return with_mixoe_lists(c, key, others)


def get_config():
    c = fine_grained_benchmark('caltech_birds2011', 200, 150,
                               coarse_ood=('butterfly200', 'stanford_cars', 'fgvc_aircraft'))
    return with_mixoe_lists(c, None, ('butterfly', 'car', 'aircraft'))
