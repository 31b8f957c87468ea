"""Models: torchvision layout, shapes and dtypes, and a numpy re-computation of the forward pass.

The numpy reference below is written from torchvision's definition (symmetric padding k//2,
maxpool 3x3/2 pad 1 with -inf, v1.5 stride in the 3x3 conv, BN eps 1e-5 momentum 0.1), not
from the Flax code, so padding or stride mistakes show up as numeric differences.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lmoe_jax.models import MODEL_NAMES, BasicBlock, Bottleneck, create_model

EPS = 1e-5


def _config(name, width=None, dtype='float32', **extra):
    c = ml_collections.ConfigDict({'name': name, 'dtype': dtype, 'pretrained': None})
    if width is not None:
        c.width = width
    c.update(extra)
    return c


def _random_variables(model, x, seed=0):
    """Variables of `model` with random values (numpy), far from the identity BN.

    Built from `jax.eval_shape(model.init)` so no init program is compiled (CPU init of a
    ResNet compiles dozens of RNG kernels and costs far more than the forward pass).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def fill(path, s):
        leaf = path[-1].key
        if leaf == 'kernel':
            return rng.normal(0, np.sqrt(1.0 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
        if leaf in ('scale', 'var'):
            return rng.uniform(0.5, 1.5 if leaf == 'scale' else 2.0, s.shape).astype(np.float32)
        return rng.normal(0, 0.1, s.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


# ----------------------------------------------------------------- numpy reference (torchvision)

def np_conv(x, kernel, stride, pad):
    """NHWC conv with an HWIO kernel and symmetric zero padding, like torch.nn.Conv2d."""
    kh, kw = kernel.shape[:2]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out += patch @ kernel[i, j]
    return out


def np_maxpool_3x3_s2_p1(x):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho = (x.shape[1] - 3) // 2 + 1
    wo = (x.shape[2] - 3) // 2 + 1
    out = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    for i in range(3):
        for j in range(3):
            out = np.maximum(out, x[:, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2, :])
    return out


def np_bn(x, p, s):
    return (x - s['mean']) / np.sqrt(s['var'] + EPS) * p['scale'] + p['bias']


def relu(x):
    return np.maximum(x, 0)


def np_block(x, p, s, bottleneck, stride):
    if bottleneck:
        y = relu(np_bn(np_conv(x, p['conv1']['kernel'], 1, 0), p['bn1'], s['bn1']))
        y = relu(np_bn(np_conv(y, p['conv2']['kernel'], stride, 1), p['bn2'], s['bn2']))
        y = np_bn(np_conv(y, p['conv3']['kernel'], 1, 0), p['bn3'], s['bn3'])
    else:
        y = relu(np_bn(np_conv(x, p['conv1']['kernel'], stride, 1), p['bn1'], s['bn1']))
        y = np_bn(np_conv(y, p['conv2']['kernel'], 1, 1), p['bn2'], s['bn2'])
    if 'downsample_0' in p:
        x = np_bn(np_conv(x, p['downsample_0']['kernel'], stride, 0),
                  p['downsample_1'], s['downsample_1'])
    return relu(y + x)


def np_resnet(variables, x, blocks, bottleneck, small_stem=False):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['params'])
    s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['batch_stats'])
    x = np.asarray(x, np.float64)
    if small_stem:
        x = relu(np_bn(np_conv(x, p['conv1']['kernel'], 1, 1), p['bn1'], s['bn1']))
    else:
        x = relu(np_bn(np_conv(x, p['conv1']['kernel'], 2, 3), p['bn1'], s['bn1']))
        x = np_maxpool_3x3_s2_p1(x)
    for stage, n in enumerate(blocks):
        for j in range(n):
            name = f'layer{stage + 1}_{j}'
            stride = 2 if stage > 0 and j == 0 else 1
            x = np_block(x, p[name], s[name], bottleneck, stride)
    feats = x.mean(axis=(1, 2))
    return feats @ p['fc']['kernel'] + p['fc']['bias'], feats


# ----------------------------------------------------------------- tests

@pytest.mark.parametrize('name,blocks,bottleneck,size,small', [
    ('resnet18', (2, 2, 2, 2), False, 33, False),   # odd size: exercises the padding arithmetic
    ('resnet50', (3, 4, 6, 3), True, 32, False),
    ('small_cnn', (1, 1, 1), False, 28, True),
])
def test_forward_matches_numpy_reference(name, blocks, bottleneck, size, small):
    model = create_model(_config(name, width=4), num_classes=5)
    x = np.random.default_rng(1).normal(size=(2, size, size, 1 if small else 3)).astype(np.float32)
    variables = _random_variables(model, x)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))(
        variables, x)
    ref_logits, ref_feats = np_resnet(variables, x, blocks, bottleneck, small_stem=small)
    # float32 XLA convs against a float64 reference over up to 50 layers.
    np.testing.assert_allclose(np.asarray(feats), ref_feats, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-4, atol=1e-4)
    # the features are the input of fc
    fc = variables['params']['fc']
    np.testing.assert_allclose(np.asarray(logits), np.asarray(feats) @ fc['kernel'] + fc['bias'],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name,expected', [
    # torchvision's published parameter counts (num_classes=1000), trainable params only.
    ('resnet18', 11_689_512), ('resnet34', 21_797_672), ('resnet50', 25_557_032)])
def test_full_width_parameter_count_matches_torchvision(name, expected):
    model = create_model(_config(name), num_classes=1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                               train=False))
    count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes['params']))
    assert count == expected
    logits, feats = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3)),
                                                         return_features=True), shapes)
    assert logits.shape == (2, 1000)
    assert feats.shape == (2, 2048 if name == 'resnet50' else 512)


def test_module_names_follow_torchvision_keys():
    model = create_model(_config('resnet50', width=4), num_classes=3)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert set(v) == {'params', 'batch_stats'}
    p = v['params']
    assert sorted(p) == sorted(['conv1', 'bn1', 'fc'] + [
        f'layer{i}_{j}' for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)])
    assert sorted(p['layer1_0']) == ['bn1', 'bn2', 'bn3', 'conv1', 'conv2', 'conv3',
                                     'downsample_0', 'downsample_1']
    assert 'downsample_0' not in p['layer1_1']
    assert p['layer2_0']['conv2']['kernel'].shape == (3, 3, 8, 8)
    assert p['fc']['kernel'].shape == (4 * 8 * 4, 3)
    assert sorted(v['batch_stats']['layer3_0']['downsample_1']) == ['mean', 'var']


@pytest.mark.parametrize('name', ['resnet18', 'small_cnn'])
def test_bfloat16_compute_keeps_float32_params_and_outputs(name):
    model = create_model(_config(name, width=4, dtype='bfloat16'), num_classes=7)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = _random_variables(model, x)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(shapes))

    @jax.jit
    def run(v, x):
        logits, feats = model.apply(v, x, train=False, return_features=True)
        logits_tr, updates = model.apply(v, x, train=True, mutable=['batch_stats'])
        return logits, feats, logits_tr, updates

    logits, feats, logits_tr, updates = run(variables, x)
    assert logits.dtype == feats.dtype == logits_tr.dtype == jnp.float32
    assert logits.shape == (2, 7) and np.isfinite(np.asarray(logits)).all()
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(updates))
    # bf16 compute stays close to the float32 model with the same variables.
    ref = jax.jit(create_model(_config(name, width=4), num_classes=7).apply)(variables, x)
    scale = np.abs(np.asarray(ref)).max()
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() <= 0.05 * scale + 0.05


def test_train_mode_updates_batch_stats_with_torchvision_momentum():
    model = create_model(_config('small_cnn', width=4), num_classes=3)
    x = np.random.default_rng(2).normal(size=(4, 28, 28, 1)).astype(np.float32)
    variables = _random_variables(model, x)
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
        variables, x)
    # Stem BN sees conv1(x); torch: running = 0.9 * running + 0.1 * batch statistic.
    h = np_conv(x.astype(np.float64), variables['params']['conv1']['kernel'].astype(np.float64),
                1, 1)
    old = variables['batch_stats']['bn1']
    np.testing.assert_allclose(np.asarray(updates['batch_stats']['bn1']['mean']),
                               0.9 * old['mean'] + 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-5,
                               atol=1e-5)
    # Flax uses the biased batch variance (torch: unbiased, a factor n/(n-1) = 1.0003 here).
    np.testing.assert_allclose(np.asarray(updates['batch_stats']['bn1']['var']),
                               0.9 * old['var'] + 0.1 * h.var(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-5)
    assert jax.tree_util.tree_structure(updates['batch_stats']) == \
        jax.tree_util.tree_structure(variables['batch_stats'])


def test_train_mode_normalizes_with_batch_statistics():
    """In train mode the output must not depend on the running statistics."""
    model = create_model(_config('small_cnn', width=4), num_classes=3)
    x = np.random.default_rng(3).normal(size=(4, 28, 28, 1)).astype(np.float32)
    v = _random_variables(model, x, seed=0)
    other = {'params': v['params'],
             'batch_stats': _random_variables(model, x, seed=5)['batch_stats']}
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0])
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    np.testing.assert_allclose(np.asarray(train(v, x)), np.asarray(train(other, x)), rtol=1e-6,
                               atol=1e-6)
    assert not np.allclose(np.asarray(evaluate(v, x)), np.asarray(evaluate(other, x)), atol=1e-3)


def test_zero_init_residual_flag():
    x = jnp.zeros((1, 8, 8, 16))
    for block, last in ((Bottleneck, 'bn3'), (BasicBlock, 'bn2')):
        key = jax.random.key(0, impl='rbg')
        off = block(4, downsample=True).init(key, x, train=False)['params']
        on = block(4, downsample=True, zero_init_residual=True).init(key, x, train=False)['params']
        np.testing.assert_array_equal(off[last]['scale'], 1.0)
        np.testing.assert_array_equal(on[last]['scale'], 0.0)
        np.testing.assert_array_equal(on['bn1']['scale'], 1.0)
        np.testing.assert_array_equal(on['downsample_1']['scale'], 1.0)
    # The real init of a whole model: flag passed down, torchvision initial values (BN scale
    # 1, running mean 0, var 1), float32 everywhere. An 'rbg' key because compiling threefry
    # for every parameter shape costs ~10 s of CPU even for this tiny model.
    model = create_model(_config('small_cnn', width=4, zero_init_residual=True), 3)
    v = jax.jit(lambda rng, x: model.init(rng, x, train=False))(
        jax.random.key(0, impl='rbg'), jnp.zeros((2, 28, 28, 1)))
    assert set(v) == {'params', 'batch_stats'}
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v))
    np.testing.assert_array_equal(v['params']['layer3_0']['bn2']['scale'], 0.0)
    np.testing.assert_array_equal(v['params']['layer2_0']['bn1']['scale'], 1.0)
    np.testing.assert_array_equal(v['batch_stats']['layer3_0']['bn1']['mean'], 0.0)
    np.testing.assert_array_equal(v['batch_stats']['layer3_0']['bn1']['var'], 1.0)
    kernel = np.asarray(v['params']['layer3_0']['conv2']['kernel'])  # fan_out = 3*3*16
    assert kernel.shape == (3, 3, 16, 16)
    assert 0.7 < kernel.std() / np.sqrt(2.0 / 144) < 1.3


def test_width_defaults_to_torchvision_and_dict_configs_work():
    model = create_model({'name': 'resnet18'}, 10)
    assert model.width == 64 and model.dtype == jnp.float32
    assert create_model({'name': 'small_cnn'}, 10).width == 16
    assert create_model({'name': 'resnet50', 'dtype': 'bfloat16'}, 10).dtype == jnp.bfloat16


def test_bn_axis_name_averages_statistics_across_devices():
    """With the pmap axis name, per-device BN equals BN over the global batch."""
    model = create_model(_config('small_cnn', width=4), 3)
    n = 2
    x = np.random.default_rng(4).normal(size=(n * 2, 28, 28, 1)).astype(np.float32)
    v = _random_variables(model, x)
    global_logits, global_upd = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(v, x)
    synced = create_model(_config('small_cnn', width=4), 3, bn_axis_name='batch')
    out, upd = jax.pmap(lambda v, x: synced.apply(v, x, train=True, mutable=['batch_stats']),
                        axis_name='batch', in_axes=(None, 0), devices=jax.devices()[:n])(
        v, x.reshape(n, 2, 28, 28, 1))
    np.testing.assert_allclose(np.asarray(out).reshape(-1, 3), np.asarray(global_logits),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(upd['batch_stats']['bn1']['mean'][0]),
                               np.asarray(global_upd['batch_stats']['bn1']['mean']), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize('bad,match', [
    ({'name': 'vit_b16'}, 'resnet18, resnet34, resnet50, small_cnn'),
    ({'name': 'resnet18', 'dtype': 'int8'}, 'float32, bfloat16'),
    ({'name': 'resnet18', 'width': 0}, 'positive integer'),
    ({'name': 'resnet18', 'matmul_convs': 'yes'}, "True, False or 'auto'"),
    ({'name': 'resnet18', 'matmul_convs': 1}, "True, False or 'auto'"),
    ({'name': 'resnet18', 'matmul_convs': None}, "True, False or 'auto'"),
])
def test_bad_config_raises_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        create_model(bad, 10)


def test_model_names_are_the_documented_ones():
    assert MODEL_NAMES == ('resnet18', 'resnet34', 'resnet50', 'small_cnn')


def _assert_same_outputs_and_gradients(plain, fast, variables, x):
    """Logits, features and the parameter gradients of a loss on both agree (float32 order)."""
    def loss(params, model):
        logits, feats = model.apply({**variables, 'params': params}, x, train=False,
                                    return_features=True)
        return jnp.sum(logits ** 2) + jnp.sum(feats), (logits, feats)

    (_, (z1, f1)), g1 = jax.value_and_grad(loss, has_aux=True)(variables['params'], plain)
    (_, (z2, f2)), g2 = jax.value_and_grad(loss, has_aux=True)(variables['params'], fast)
    np.testing.assert_allclose(z2, z1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f2, f1, rtol=1e-4, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_matmul_convs_compute_the_same_model():
    """model.matmul_convs (tiny-map 3x3 and 1x1 convolutions as matrix products) changes speed
    only: same parameter tree, same logits, features and gradients as lax convolutions.
    ResNet-50 at 64 px has 2x2 maps in its last stage, where the rewrite applies."""
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    plain = create_model(_config('resnet50', width=4, matmul_convs=False), 7)
    fast = create_model(_config('resnet50', width=4, matmul_convs=True), 7)
    variables = _random_variables(plain, x)
    assert jax.tree.structure(jax.eval_shape(lambda: fast.init(jax.random.key(0), x))) == \
        jax.tree.structure(variables)

    _assert_same_outputs_and_gradients(plain, fast, variables, x)


def test_matmul_convs_auto_means_the_cpu_backend(monkeypatch):
    """'auto' (the default, and configs/default.py's value) turns the rewrite on where
    jax.default_backend() is 'cpu' and off on any other backend; True/False are kept."""
    from configs import default

    assert jax.default_backend() == 'cpu'  # conftest: 8 CPU devices
    assert default.get_config().model.matmul_convs == 'auto'
    assert create_model({'name': 'resnet50'}, 3).matmul_convs is True
    assert create_model(_config('resnet50', matmul_convs='auto'), 3).matmul_convs is True
    assert create_model(_config('resnet50', matmul_convs=False), 3).matmul_convs is False
    assert create_model(_config('resnet50', matmul_convs=np.bool_(True)), 3).matmul_convs is True
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    assert create_model(_config('resnet50', matmul_convs='auto'), 3).matmul_convs is False
    assert create_model(_config('resnet50', matmul_convs=True), 3).matmul_convs is True


def test_matmul_convs_auto_builds_the_rewritten_convolutions_on_cpu():
    """Not just the flag: the lowered program of the 'auto' model on CPU has the rewrite's dots
    in place of the 1x1 convolutions, the plain model has none."""
    x = jnp.zeros((1, 32, 32, 3))

    def ops(matmul_convs):
        model = create_model(_config('resnet50', width=4, matmul_convs=matmul_convs), 3)
        v = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
        text = jax.jit(lambda v: model.apply(v, x)).lower(v).as_text()
        return text.count('stablehlo.convolution'), text.count('stablehlo.dot_general')

    plain_convs, plain_dots = ops(False)
    auto_convs, auto_dots = ops('auto')
    # ResNet-50 has 53 convolutions, 36 of them 1x1 (16 blocks x 2 + 4 projections), and one dot
    # (fc). At 32 px the maps are 8/8/4/2/1 px (stem, layer1-4): the 3x3 convolutions whose
    # input or output map has fewer than 9 pixels are layer3's 6 (2x2 out) and layer4's 3 (1x1),
    # so 'auto' on CPU keeps 53 - 36 - 9 = 8 convolutions and has 1 + 36 + 9 = 46 dots.
    assert (plain_convs, plain_dots) == (53, 1)
    assert (auto_convs, auto_dots) == (8, 46)


@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_conv_as_2d_dot_matches_numpy(stride):
    """cpu_convs.conv_or_dot (1x1 convolution as a 2-D [N*H*W, C] @ [C, O] dot, the form whose
    weight gradient XLA:CPU contracts without a transposing copy): forward, input gradient and
    weight gradient equal the same products written out in float64 numpy."""
    from jax import lax

    from lmoe_jax.models import cpu_convs

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    w = rng.normal(size=(1, 1, 3, 4)).astype(np.float32)
    g = rng.normal(size=(2, -(-5 // stride), -(-6 // stride), 4)).astype(np.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
    out, vjp = jax.vjp(lambda x, w: cpu_convs.conv_or_dot(x, w, (stride, stride), 'VALID',
                                                        dimension_numbers=dn), x, w)
    gx, gw = vjp(jnp.asarray(g))
    xs, w2, g64 = x[:, ::stride, ::stride].astype(np.float64), w[0, 0].astype(np.float64), g
    np.testing.assert_allclose(out, np.einsum('nhwc,co->nhwo', xs, w2), rtol=1e-5, atol=1e-5)
    gx_ref = np.zeros(x.shape)
    gx_ref[:, ::stride, ::stride] = np.einsum('nhwo,co->nhwc', g64, w2)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw[0, 0], np.einsum('nhwc,nhwo->co', xs, g64), rtol=1e-5,
                               atol=1e-5)


def test_matmul_convs_batch_chunks_compute_the_same_small_cnn():
    """The batch-chunked 3x3 convolutions of 'auto' on CPU (cpu_convs.num_batch_chunks: > 16
    channels, chunks of >= 16 images) change speed only: small_cnn (width 16) on 48 images has
    its 4 layer2/layer3 3x3 convolutions split in 3, and the same logits, features and gradients
    as lax convolutions (eval mode; the per-op bound is tests/test_cpu_convs.py's)."""
    from lmoe_jax.models import cpu_convs

    x = np.random.default_rng(2).normal(size=(48, 28, 28, 1)).astype(np.float32)
    plain = create_model(_config('small_cnn', width=16, matmul_convs=False), 6)
    fast = create_model(_config('small_cnn', width=16, matmul_convs='auto'), 6)
    variables = _random_variables(plain, x)
    text = jax.jit(lambda v: fast.apply(v, x)).lower(variables).as_text()
    plain_text = jax.jit(lambda v: plain.apply(v, x)).lower(variables).as_text()
    # lax: 7 3x3 + 2 1x1 convolutions; 'auto': the 1x1 ones are dots, 4 of the 3x3 ones x 3.
    assert plain_text.count('stablehlo.convolution') == 9
    assert cpu_convs.matmul_conv_batch_chunks == 3
    assert text.count('stablehlo.convolution') == 3 + 4 * 3

    _assert_same_outputs_and_gradients(plain, fast, variables, x)
