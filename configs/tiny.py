"""Test-sized config: the demo's data layout on small fake idx files, a width-4 CNN, a few steps.

Tests point it at their files with
  --config.data.fashion_mnist_dir=DIR --config.data.animal_mnist_dir=DIR --config.data.data_dir=DIR
"""
from configs import fashion_mnist


def get_config():
    c = fashion_mnist.get_config()
    c.data.coarse_ood = ('animal_mnist',)  # no sklearn preparation in the unit tests
    c.data.shuffle_buffer = 256
    c.data.val_fraction = 0.2
    c.data.animal_mnist_dir = None  # the installed wheel; tests pass their fake pickles
    c.model.width = 4
    c.batch_size = 16
    c.baseline_epochs = 0
    c.num_epochs = 1
    c.num_train_steps = 12
    c.learning_rate = 0.05
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 4
    c.eval_batch_size = 32
    c.scores = ('msp', 'energy')
    return c
