"""Pretrained-weight import: key/layout mapping, clear errors, and parity with torchvision.

Without torch the tests write torchvision-keyed .safetensors files themselves (keys and
OIHW layout spelled out here from torchvision's naming). The parity tests build real
torchvision models and are skipped with a visible reason when torch is not installed.
"""
import importlib.util
import re
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from lmoe_jax.models import (PretrainedMismatchError, PretrainedUnavailableError, create_model,
                             load_pretrained, maybe_load_pretrained)

HAVE_TORCH = (importlib.util.find_spec('torch') is not None
              and importlib.util.find_spec('torchvision') is not None)
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason='torch/torchvision not installed: parity with torchvision not checked '
    '(pip install torch torchvision, see docs/models.md)')


def _init(name, width=4, num_classes=5, seed=0, size=32):
    """The model and variables of its shapes with random values (as a fresh init would have).

    `jax.eval_shape` instead of `model.init`: only shapes matter to the importer, and a real
    CPU init compiles RNG kernels for every parameter shape (seconds per model).
    """
    model = create_model(ml_collections.ConfigDict(
        {'name': name, 'width': width, 'dtype': 'float32', 'pretrained': None}), num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                               train=False))
    rng = np.random.default_rng(seed)
    return model, jax.tree_util.tree_map(
        lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def _torchvision_state(variables, seed=0):
    """A torchvision-keyed state dict with random values of the shapes `variables` implies.

    Written from torchvision's naming: `layer1.0.downsample.1.running_var`, conv weights
    OIHW, fc.weight (out, in), BN weight/bias/running_mean/running_var/num_batches_tracked.
    """
    rng = np.random.default_rng(seed)
    state = {}

    def walk(tree, prefix):
        for name, sub in tree.items():
            module = re.sub(r'^(layer\d|downsample)_(\d+)$', r'\1.\2', name)
            key = f'{prefix}{module}'
            if 'kernel' in sub:
                k = sub['kernel'].shape
                shape = (k[3], k[2], k[0], k[1]) if len(k) == 4 else (k[1], k[0])
                state[f'{key}.weight'] = rng.normal(size=shape).astype(np.float32)
                if 'bias' in sub:
                    state[f'{key}.bias'] = rng.normal(size=(k[1],)).astype(np.float32)
            elif 'scale' in sub:
                c = sub['scale'].shape
                state[f'{key}.weight'] = rng.uniform(0.5, 1.5, c).astype(np.float32)
                state[f'{key}.bias'] = rng.normal(size=c).astype(np.float32)
                state[f'{key}.running_mean'] = rng.normal(size=c).astype(np.float32)
                state[f'{key}.running_var'] = rng.uniform(0.5, 2, c).astype(np.float32)
                state[f'{key}.num_batches_tracked'] = np.array(7, np.int64)
            else:
                walk(sub, f'{key}.')

    walk(variables['params'], '')
    return state


# ----------------------------------------------------------------- without torch

def test_safetensors_values_land_in_flax_layout(tmp_path):
    _, fresh = _init('resnet50', num_classes=5, seed=1)
    _, donor = _init('resnet50', num_classes=1000)
    state = _torchvision_state(donor)
    path = tmp_path / 'w.safetensors'
    save_file(state, str(path))
    loaded = load_pretrained(fresh, str(path), model_name='resnet50')
    p, s = loaded['params'], loaded['batch_stats']
    w = state['layer2.0.conv2.weight']  # OIHW
    o, i, h, k = 3, 1, 2, 0
    assert p['layer2_0']['conv2']['kernel'][h, k, i, o] == w[o, i, h, k]
    np.testing.assert_array_equal(p['layer2_0']['conv2']['kernel'], w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p['layer3_0']['downsample_0']['kernel'][0, 0],
                                  state['layer3.0.downsample.0.weight'][:, :, 0, 0].T)
    np.testing.assert_array_equal(p['bn1']['scale'], state['bn1.weight'])
    np.testing.assert_array_equal(p['layer4_2']['bn3']['bias'], state['layer4.2.bn3.bias'])
    np.testing.assert_array_equal(s['layer1_0']['downsample_1']['mean'],
                                  state['layer1.0.downsample.1.running_mean'])
    np.testing.assert_array_equal(s['layer4_2']['bn3']['var'], state['layer4.2.bn3.running_var'])
    # Head re-initialised for 5 classes: the fresh init, not the file's 1000-way fc.
    assert p['fc']['kernel'].shape == (4 * 8 * 4, 5)
    np.testing.assert_array_equal(p['fc']['kernel'], fresh['params']['fc']['kernel'])
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(fresh)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(loaded))


def test_keep_head_loads_fc_and_module_prefix_is_stripped(tmp_path):
    _, v = _init('resnet18', num_classes=1000)
    state = {f'module.{k}': a for k, a in _torchvision_state(v).items()}
    path = tmp_path / 'w.safetensors'
    save_file(state, str(path))
    loaded = load_pretrained(v, str(path), model_name='resnet18', keep_head=True)
    np.testing.assert_array_equal(loaded['params']['fc']['kernel'], state['module.fc.weight'].T)
    np.testing.assert_array_equal(loaded['params']['fc']['bias'], state['module.fc.bias'])


def test_directory_and_bfloat16_file(tmp_path):
    import ml_dtypes
    _, v = _init('resnet18')
    state = {k: (a.astype(ml_dtypes.bfloat16) if a.dtype == np.float32 else a)
             for k, a in _torchvision_state(v).items()}
    save_file(state, str(tmp_path / 'model.safetensors'))
    loaded = load_pretrained(v, str(tmp_path), model_name='resnet18')
    got = loaded['params']['layer1_1']['conv2']['kernel']
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(
        got, state['layer1.1.conv2.weight'].astype(np.float32).transpose(2, 3, 1, 0))


@pytest.mark.parametrize('file_model,file_width,match', [
    # resnet50 file into resnet18: the first differing key is layer1.0.conv1 (1x1 vs 3x3).
    ('resnet50', 4, r"'layer1\.0\.conv1\.weight' has shape \(4, 4, 1, 1\) but .*"
                    r"expects \(4, 4, 3, 3\).*looks like resnet50"),
    # resnet34 holds every resnet18 key with the same shape, plus layer1.2: must not load.
    ('resnet34', 4, r"'layer1\.2\.conv1\.weight' .* has no place .*looks like resnet34"),
    # another width: caught at the first key.
    ('resnet18', 8, r"'conv1\.weight' has shape \(8, 3, 7, 7\) but .*width 4.*"
                    r"expects \(4, 3, 7, 7\)"),
])
def test_other_architecture_names_first_mismatching_key(tmp_path, file_model, file_width, match):
    _, target = _init('resnet18')
    _, donor = _init(file_model, width=file_width)
    path = tmp_path / 'w.safetensors'
    save_file(_torchvision_state(donor), str(path))
    with pytest.raises(PretrainedMismatchError, match=match):
        load_pretrained(target, str(path), model_name='resnet18')


def test_missing_key_is_named(tmp_path):
    _, v = _init('resnet18')
    state = _torchvision_state(v)
    del state['layer3.1.bn2.running_var']
    save_file(state, str(tmp_path / 'w.safetensors'))
    with pytest.raises(PretrainedMismatchError, match=r"'layer3\.1\.bn2\.running_var'.*missing"):
        load_pretrained(v, str(tmp_path / 'w.safetensors'), model_name='resnet18')


@pytest.mark.parametrize('source', ['/nonexistent/resnet50.safetensors', 'weights/r50.pth'])
def test_missing_file_says_what_to_do(source):
    _, v = _init('resnet18')
    with pytest.raises(FileNotFoundError, match='does not exist.*get_pretrained.sh'):
        load_pretrained(v, source, model_name='resnet18')


@pytest.mark.parametrize('suffix', ['safetensors', 'pth'])
def test_corrupt_file_says_download_again(tmp_path, suffix):
    path = tmp_path / f'w.{suffix}'
    path.write_bytes(b'<html>not weights</html>')
    if suffix == 'pth' and not HAVE_TORCH:
        pytest.skip('torch not installed: the .pth reader is not reached')
    with pytest.raises(PretrainedUnavailableError, match='corrupt or a truncated download'):
        load_pretrained({}, str(path), model_name='resnet18')


def test_unknown_suffix_and_directory_without_weights(tmp_path):
    (tmp_path / 'weights.npz').write_bytes(b'')
    with pytest.raises(PretrainedUnavailableError, match=r'name it \*\.safetensors or \*\.pth'):
        load_pretrained({}, str(tmp_path / 'weights.npz'), model_name='resnet18')
    with pytest.raises(FileNotFoundError, match='has no model.safetensors'):
        load_pretrained({}, str(tmp_path), model_name='resnet18')


def test_small_cnn_has_no_imagenet_weights():
    with pytest.raises(PretrainedMismatchError, match='no ImageNet weights for small_cnn'):
        load_pretrained({}, 'timm/resnet50.tv_in1k', model_name='small_cnn')


def _fake_hub(monkeypatch, download):
    module = types.ModuleType('huggingface_hub')
    module.hf_hub_download = download
    monkeypatch.setitem(sys.modules, 'huggingface_hub', module)


def test_hub_id_offline_says_where_to_put_the_file(monkeypatch):
    calls = []

    def offline(repo_id, filename, local_files_only=False):
        calls.append((repo_id, filename, local_files_only))
        raise ConnectionError('no network')

    _fake_hub(monkeypatch, offline)
    _, v = _init('resnet50')
    with pytest.raises(PretrainedUnavailableError,
                       match=r"timm/resnet50\.tv_in1k.*get_pretrained\.sh.*"
                                      r"config\.model\.pretrained=/path/to/model\.safetensors"):
        load_pretrained(v, 'hf-hub:timm/resnet50.tv_in1k', model_name='resnet50')
    # cache first, then the network
    assert calls == [('timm/resnet50.tv_in1k', 'model.safetensors', True),
                     ('timm/resnet50.tv_in1k', 'model.safetensors', False)]


def test_hub_id_uses_the_cached_file(monkeypatch, tmp_path):
    _, v = _init('resnet18')
    state = _torchvision_state(v)
    save_file(state, str(tmp_path / 'model.safetensors'))
    _fake_hub(monkeypatch, lambda repo_id, filename, local_files_only=False:
              str(tmp_path / filename))
    loaded = load_pretrained(v, 'timm/resnet18.tv_in1k', model_name='resnet18')
    np.testing.assert_array_equal(loaded['batch_stats']['bn1']['mean'], state['bn1.running_mean'])


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)  # import raises ImportError
    with pytest.raises(PretrainedUnavailableError, match='pip install huggingface_hub'):
        load_pretrained({}, 'timm/resnet18.tv_in1k', model_name='resnet18')


def test_maybe_load_pretrained_from_config(tmp_path):
    _, v = _init('resnet18')
    cfg = ml_collections.ConfigDict({'name': 'resnet18', 'width': 4, 'pretrained': None})
    assert maybe_load_pretrained(v, cfg) is not v
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: a is b, maybe_load_pretrained(v, cfg), v))
    state = _torchvision_state(v)
    save_file(state, str(tmp_path / 'w.safetensors'))
    cfg.pretrained = str(tmp_path / 'w.safetensors')
    loaded = maybe_load_pretrained(v, cfg)
    np.testing.assert_array_equal(loaded['params']['conv1']['kernel'],
                                  state['conv1.weight'].transpose(2, 3, 1, 0))


def test_pth_without_torch_suggests_safetensors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch', None)  # as on a machine without torch
    path = tmp_path / 'resnet18.pth'
    path.write_bytes(b'not really a pickle')
    with pytest.raises(PretrainedUnavailableError, match='needs torch.*safetensors'):
        load_pretrained({}, str(path), model_name='resnet18')


# ----------------------------------------------------------------- parity with torchvision

# Measured on this machine (CPU, float32, 2x64x64 inputs, random weights with BN statistics far
# from the identity; docs/models.md): max abs difference <= 1.4e-4 with logits up to ~50,
# relative error (L2) <= 1e-6. The tolerances leave an order of magnitude of margin.
LOGIT_ATOL, FEATURE_ATOL, REL_TOL = 1e-3, 1e-3, 1e-4


def _torchvision_model(name, seed):
    import torch
    import torchvision
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():  # BN running stats and affine params far from the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def _torch_forward(model, x_nhwc):
    import torch
    feats = {}
    hook = model.avgpool.register_forward_hook(
        lambda mod, inp, out: feats.setdefault('f', torch.flatten(out, 1)))
    with torch.no_grad():
        logits = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    hook.remove()
    return logits.numpy().astype(np.float64), feats['f'].numpy().astype(np.float64)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@needs_torch
@pytest.mark.parametrize('name', ['resnet18', 'resnet34', 'resnet50'])
def test_parity_with_torchvision(tmp_path, name):
    import torch
    from safetensors.torch import save_file as torch_save_file
    tv = _torchvision_model(name, seed=0)
    state = tv.state_dict()
    torch_save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'w.safetensors'))
    torch.save(state, str(tmp_path / 'w.pth'))
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    ref_logits, ref_feats = _torch_forward(tv, x)

    model, fresh = _init(name, width=64, num_classes=1000, size=64)
    loaded = load_pretrained(fresh, str(tmp_path / 'w.safetensors'), model_name=name,
                             keep_head=True)
    from_pth = load_pretrained(fresh, str(tmp_path / 'w.pth'), model_name=name, keep_head=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, loaded)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                                     return_features=True))(loaded, x)
    logits, feats = np.asarray(logits, np.float64), np.asarray(feats, np.float64)
    print(f'{name}: logits max|d|={np.abs(logits - ref_logits).max():.2e} '
          f'rel={_rel(logits, ref_logits):.2e} (max|ref|={np.abs(ref_logits).max():.2f}); '
          f'features max|d|={np.abs(feats - ref_feats).max():.2e} rel={_rel(feats, ref_feats):.2e}')
    assert np.abs(feats - ref_feats).max() <= FEATURE_ATOL and _rel(feats, ref_feats) <= REL_TOL
    assert np.abs(logits - ref_logits).max() <= LOGIT_ATOL and _rel(logits, ref_logits) <= REL_TOL

    # Head re-initialised for 7 ID classes: backbone as above, fc as freshly initialised.
    _, fresh7 = _init(name, width=64, num_classes=7, seed=4, size=64)
    loaded7 = load_pretrained(fresh7, str(tmp_path / 'w.pth'), model_name=name)
    np.testing.assert_array_equal(loaded7['params']['fc']['kernel'],
                                  fresh7['params']['fc']['kernel'])
    for collection in ('params', 'batch_stats'):
        backbone = {k: v for k, v in loaded[collection].items() if k != 'fc'}
        head_free = {k: v for k, v in loaded7[collection].items() if k != 'fc'}
        jax.tree_util.tree_map(np.testing.assert_array_equal, head_free, backbone)
