"""CUB-200-2011, MixOE benchmark protocol: 150 ID / 50 fine-grained OOD bird classes.

Stage 1: cross-entropy baseline for 90 epochs from ImageNet weights (torchvision ResNet-50);
stage 2: the OE-family `method` fine-tunes it for 10 epochs; batch 32 ID + 32 outliers at 448 px;
SGD Nesterov, lr 1e-3, weight decay 1e-5, cosine per step down to 1e-6.

  python main.py --config=configs/cub.py --workdir=runs/cub_lmoe
  python main.py --config=configs/cub.py --config.method=mixoe_mixup --config.data.split=1 ...

ImageNet weights: `bash scripts/get_pretrained.sh resnet50 ~/weights` then
--config.model.pretrained=~/weights/resnet50.tv_in1k.safetensors (the default below is the hub id,
fetched through huggingface_hub's cache when the machine is online).
Outliers: places365_small stands in for the MixOE protocol's WebVision subset (not in TFDS).
"""
from configs import default


def fine_grained_benchmark(dataset: str, num_classes: int, num_id: int, coarse_ood):
    """The shared MixOE protocol; each dataset config fills in its names and class counts."""
    c = default.get_config()
    c.method = 'lmoe'
    c.data.dataset = dataset
    c.data.num_classes = num_classes
    c.data.num_id_classes = num_id
    c.data.split = 0  # 0, 1, 2 are the standard class splits
    c.data.outlier_dataset = 'places365_small'
    c.data.coarse_ood = tuple(coarse_ood)
    c.data.coarse_ood_subsample = True  # each coarse set cut to the ID test size
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


def get_config():
    return fine_grained_benchmark('caltech_birds2011', 200, 150,
                                  coarse_ood=('cars196', 'oxford_flowers102', 'dtd'))
