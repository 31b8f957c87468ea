"""Every knob of lmoe_jax, with its default. Other configs start from this one.

Override any value on the command line, e.g.
    python main.py --config=configs/cub.py --config.method=lmoe --config.batch_size=64
"""
import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed drives init, data order, outlier draws and lam draws

    # --- method: a preset name from lmoe_jax.losses.PRESETS, plus per-field overrides ---
    c.method = 'lmoe'  # baseline | oe | energy_oe | mixoe_mixup | mixoe_cutmix | lmoe | logit_mixoe | lmoe_sg | logit_mixoe_sg
    # Any LossWeights / mixing field set here replaces the preset's value (None = keep preset).
    c.loss = ml_collections.ConfigDict()
    c.loss.id = placeholder(float)  # weight of CE on ID images
    c.loss.oe = placeholder(float)  # weight of SoftCE(outlier logits, uniform)
    c.loss.energy = placeholder(float)  # weight of the EnergyOE margin loss
    c.loss.input_mix = placeholder(float)  # weight of SoftCE(f(mix(x, x_ood)), soft target)  (MixOE)
    c.loss.logit_mix = placeholder(float)  # weight of SoftCE(lam f(x) + (1-lam) f(x_ood), soft target)  (LMoE)
    c.loss.consistency = placeholder(float)  # weight of D(f(mix(x, x_ood)), logit mixture)  (LMoE)
    c.loss.m_in = placeholder(float)  # EnergyOE ID energy margin
    c.loss.m_out = placeholder(float)  # EnergyOE outlier energy margin
    c.loss.consistency_kind = placeholder(str)  # 'mse' (over logits) | 'kl' (of softmaxes)
    c.loss.stop_gradient = placeholder(str)  # 'none' | 'mixed_input' | 'logit_mixture': side held fixed in D
    c.loss.logit_mix_stop_id = placeholder(bool)  # True: lam*stop_gradient(f(x)) + (1-lam) f(x_ood)
    c.loss.mix = placeholder(str)  # 'mixup' | 'cutmix': how x_mix is built
    c.loss.alpha = placeholder(float)  # lam ~ Beta(alpha, alpha)
    c.loss.lam_per_example = placeholder(bool)  # one lam per example instead of one per step

    # --- data ---
    c.data = ml_collections.ConfigDict()
    c.data.dataset = 'caltech_birds2011'  # ID dataset (TFDS name or a builder of lmoe_jax.data)
    c.data.data_dir = placeholder(str)  # TFDS data_dir (None = TFDS default, ~/tensorflow_datasets)
    c.data.manual_dir = placeholder(str)  # where hand-downloaded archives are (FGVC-Aircraft)
    c.data.num_classes = 200  # classes in the ID dataset (checked against the data)
    c.data.num_id_classes = 150  # n of them are in-distribution, the rest fine-grained OOD
    c.data.split = 0  # MixOE class split index (0, 1, 2 are standard)
    c.data.id_classes = None  # explicit list of ID class ids, overrides `split`
    c.data.ignore_classes = None  # class ids in no set (neither ID nor OOD): leave-classes-out runs
    c.data.outlier_dataset = 'places365_small'  # auxiliary outliers for exposure
    c.data.coarse_ood = ('dtd', 'oxford_flowers102')  # coarse OOD test sets
    c.data.val_fraction = 0.0  # share of ID training images held out as ID validation
    c.data.outlier_val_fraction = 0.0  # share of the outliers held out as 'outlier_val' (selection)
    c.data.image_size = 448  # train crop / eval centre crop
    c.data.resize_size = 512  # resize before cropping
    c.data.grayscale = False  # 28 px grey demo sets
    c.data.normalize = 'imagenet'  # 'imagenet' | 'none' (scale to [0, 1] only)
    c.data.color_jitter = True  # MixOE's brightness 32/255 and saturation 0.5
    c.data.random_flip = True
    c.data.shuffle_buffer = 10_000
    c.data.cache = False  # decode small datasets once and keep them in memory (demo-sized sets)
    # tf.data's autotuning (its model thread): off. On TF 2.21 destroying an epoch's iterator waits
    # for that thread's current sleep (up to 60 s) at the epoch boundary; off, map parallelism is the
    # core count and prefetch buffers still grow. docs/benchmarks.md: 'The epoch-boundary stall'.
    c.data.autotune = False
    c.data.crop_padding = 0  # 28 px training: pad by k pixels, random-crop back
    c.data.outlier_shuffle_buffer = placeholder(int)  # None = shuffle_buffer
    c.data.coarse_ood_subsample = False  # cut each coarse OOD set to the ID test size (MixOE)
    c.data.download = True  # let TFDS download catalog sets / FGVC-Aircraft when online
    c.data.fashion_mnist_dir = '/usr/share/datasets/fashion-mnist'  # idx files of the demo
    c.data.animal_mnist_dir = placeholder(str)  # None = the installed animal-mnist wheel's data

    # --- model ---
    c.model = ml_collections.ConfigDict()
    c.model.name = 'resnet50'  # resnet18 | resnet34 | resnet50 | small_cnn
    c.model.width = 64  # base width (small_cnn: channels of the first block)
    c.model.dtype = 'float32'  # compute dtype: float32 | bfloat16 (params and logits stay float32)
    # True | False | 'auto' (= on the CPU backend only): tiny-map 3x3 and 1x1 convs as matmuls,
    # 2.5-3x faster ResNet-50 @64px on CPU. Typed `object` so =True on the command line is a bool.
    c.model.matmul_convs = ml_collections.FieldReference('auto', field_type=object)
    c.model.pretrained = placeholder(str)  # ImageNet weights: a .safetensors/.pth path or a hub id

    # --- optimisation ---
    c.batch_size = 32  # global ID batch; the outlier batch has the same size
    c.num_epochs = 10.0  # epochs of `method` over the ID training set (fractions allowed)
    c.baseline_epochs = 0.0  # > 0: first train a cross-entropy baseline (stage 1) in <workdir>/baseline
    c.baseline_learning_rate = placeholder(float)  # stage-1 learning rate (None = learning_rate)
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.optimizer = 'sgd'  # sgd (Nesterov) | adam | adamw
    c.learning_rate = 1e-3  # peak learning rate
    c.end_learning_rate = 1e-6  # cosine decays to this
    c.warmup_steps = 0
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-5
    c.grad_clip_norm = 0.0  # 0 = no clipping

    # --- runtime ---
    c.parallelism = 'jit'  # 'jit' (Mesh + NamedSharding, multi-host ready) | 'pmap'
    c.init_from = placeholder(str)  # workdir of a finished run: load its params and batch stats (stage 2)
    c.log_every_steps = 50
    c.eval_every_steps = 1000  # ID validation accuracy (and 'best' checkpoint) period
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3  # the last k, plus the best by validation accuracy
    c.eval_batch_size = 64
    c.profile = False  # CLU profile of a few steps
    c.compilation_cache_dir = placeholder(str)  # None = $JAX_COMPILATION_CACHE_DIR or <workdir>/jax_cache; '' = JAX's own
    c.scores = ('msp', 'max_logit', 'energy', 'odin', 'gen', 'kl_matching', 'mahalanobis', 'vim', 'react')
    return c
