"""The offline demo: fine-grained OOD on Fashion-MNIST, outliers from Animal-MNIST, digits as coarse OOD.

ID = {T-shirt/top, Trouser, Pullover, Dress, Bag, Ankle boot}; fine-grained OOD = {Coat, Sandal,
Shirt, Sneaker}, each with a close ID sibling. Everything is on disk after `scripts/setup.sh`
(Debian's dataset-fashion-mnist, the animal-mnist wheel, scikit-learn's digits): no downloads.

Two stages as in the MixOE protocol: `baseline_epochs` of cross-entropy, then `num_epochs` of
the OE-family `method`, fine-tuned from the baseline.
"""
from configs import default


def get_config():
    c = default.get_config()
    c.method = 'lmoe'
    c.data.dataset = 'fashion_mnist_idx'
    c.data.num_classes = 10
    c.data.num_id_classes = 6
    c.data.id_classes = (0, 1, 2, 3, 8, 9)
    c.data.outlier_dataset = 'animal_mnist'
    c.data.coarse_ood = ('digits28',)
    c.data.val_fraction = 0.1
    c.data.image_size = 28
    c.data.resize_size = 0
    c.data.grayscale = True
    c.data.normalize = 'none'
    c.data.color_jitter = False
    c.data.random_flip = True
    c.data.crop_padding = 0
    c.data.shuffle_buffer = 60_000
    c.data.cache = True  # 60k 28x28 images: decode once

    c.model.name = 'small_cnn'
    c.model.width = 8
    c.model.dtype = 'float32'

    c.batch_size = 64
    c.baseline_epochs = 5  # stage 1 (cross-entropy only), then `num_epochs` of `method`
    c.num_epochs = 2
    c.optimizer = 'sgd'
    c.learning_rate = 0.05
    c.end_learning_rate = 1e-4
    c.weight_decay = 5e-4
    c.eval_batch_size = 500
    c.log_every_steps = 100
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    return c
