"""Import torchvision-layout ImageNet ResNet weights into the Flax variables of `create_model`.

Sources (`config.model.pretrained`; files and directories may be local or gs:// URLs, read
through etils.epath):
  * a `.safetensors` file (read with numpy; no torch needed), e.g. timm's `resnet50.tv_in1k`,
    which holds torchvision's original weights under torchvision's key names;
  * a torchvision `.pth`/`.pt` file (needs torch; read with `weights_only=True`, never a
    plain unpickle);
  * a directory holding `model.safetensors`;
  * a Hugging Face hub id such as `timm/resnet50.tv_in1k` (or `hf-hub:timm/resnet50.tv_in1k`),
    fetched through `huggingface_hub` and its cache.

Key mapping: torchvision `layer2.0.downsample.1.running_var` <-> Flax
`batch_stats['layer2_0']['downsample_1']['var']` ('.' after `layerN` / `downsample` becomes
'_'; weight -> kernel or scale, running_mean/var -> mean/var). Conv kernels go from torch
OIHW to Flax HWIO, the fc kernel is transposed. The classifier `fc` is kept from the
freshly initialised variables (re-initialised for the ID class count) unless `keep_head`.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

HUB_FILENAME = 'model.safetensors'
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
_HUB_ID = re.compile(r'^(?:hf-hub:|hf://)?([\w.-]+/[\w.-]+)$')
_LEAF_TO_TORCH = {
    ('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}
# (blocks per stage, bottleneck?) -> torchvision name; for messages about a wrong file.
_KNOWN = {((2, 2, 2, 2), False): 'resnet18', ((3, 4, 6, 3), False): 'resnet34',
          ((3, 4, 6, 3), True): 'resnet50', ((3, 4, 23, 3), True): 'resnet101',
          ((3, 8, 36, 3), True): 'resnet152'}


class PretrainedMismatchError(ValueError):
    """The weights file does not fit the configured model (another architecture or width)."""


class PretrainedUnavailableError(FileNotFoundError):
    """The weights cannot be read here: offline hub id, or a reader (torch, huggingface_hub)
    that is not installed. A FileNotFoundError, so callers that report missing files catch it."""


def load_pretrained(variables: Mapping[str, Any], source: str, *, model_name: str = 'model',
                    keep_head: bool = False) -> dict:
    """Return `variables` with every backbone weight and BN statistic taken from `source`.

    `variables` is the output of `model.init` ({'params', 'batch_stats'}); `source` a file,
    directory or hub id (see module docstring). `fc` stays as initialised unless
    `keep_head=True` (then its shape must match the file's). Raises FileNotFoundError for a
    missing file, PretrainedMismatchError naming the first mismatching key and shapes, and
    PretrainedUnavailableError (a FileNotFoundError) with instructions when a hub id cannot
    be fetched or a reader is not installed.
    """
    if model_name == 'small_cnn':
        raise PretrainedMismatchError(
            "There are no ImageNet weights for small_cnn; set config.model.pretrained to None "
            "or use resnet18/resnet34/resnet50.")
    state = read_state_dict(source)
    return assign_state_dict(variables, state, source=str(source), model_name=model_name,
                             keep_head=keep_head)


def maybe_load_pretrained(variables: Mapping[str, Any], model_config: Any) -> dict:
    """The trainer's entry point: load `model_config.pretrained` if it is set, else no-op."""
    source = model_config.get('pretrained', None)
    if not source:
        return dict(variables)
    return load_pretrained(variables, source, model_name=model_config.get('name', 'model'))


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """Flax variable path -> torchvision state_dict key, e.g. ('layer1_0','bn1','mean')."""
    *modules, leaf = path
    return '.'.join([m.replace('_', '.') for m in modules] + [_LEAF_TO_TORCH[collection, leaf]])


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch tensor shape of a Flax array: HWIO conv -> OIHW, (in, out) dense -> (out, in)."""
    if len(flax_shape) == 4:
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    if len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def to_flax(array: np.ndarray) -> np.ndarray:
    """torch layout -> Flax layout (inverse of `torch_shape`), as float32."""
    array = np.asarray(array).astype(np.float32)
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def assign_state_dict(variables: Mapping[str, Any], state: Mapping[str, np.ndarray], *,
                      source: str = 'state dict', model_name: str = 'model',
                      keep_head: bool = False) -> dict:
    """Copy a torchvision-keyed numpy state dict into `variables` (checked first, then built)."""
    state = _clean_keys(state)
    expected = {}  # torch key -> (collection, flax path, flax shape)
    for collection in ('params', 'batch_stats'):
        flat = traverse_util.flatten_dict(dict(variables[collection]))
        for path, value in flat.items():
            if path[0] == 'fc' and not keep_head:
                continue
            expected[torch_key(collection, path)] = (collection, path, tuple(value.shape))
    describe = f"config.model.name={model_name!r} (width {_width_of(variables)})"
    file_keys = {k for k in state if keep_head or not k.startswith('fc.')}
    for key in sorted(file_keys | set(expected), key=_torchvision_order):
        if key not in state:
            missing = len(set(expected) - file_keys)
            raise PretrainedMismatchError(
                f"{source}: key {key!r} needed by {describe} is missing from the file "
                f"({missing} missing in all).{_architecture_hint(state, model_name)}")
        if key not in expected:
            raise PretrainedMismatchError(
                f"{source}: key {key!r} (shape {tuple(state[key].shape)}) has no place in "
                f"{describe}.{_architecture_hint(state, model_name)}")
        want = torch_shape(expected[key][2])
        if tuple(state[key].shape) != want:
            raise PretrainedMismatchError(
                f"{source}: key {key!r} has shape {tuple(state[key].shape)} but {describe} "
                f"expects {want}.{_architecture_hint(state, model_name)}")
    out = {k: v for k, v in variables.items()}
    for collection in ('params', 'batch_stats'):
        flat = traverse_util.flatten_dict(dict(variables[collection]))
        for path in flat:
            key = torch_key(collection, path)
            if key in expected:
                flat[path] = jnp.asarray(to_flax(state[key]))
        out[collection] = traverse_util.unflatten_dict(flat)
    return out


def read_state_dict(source: str) -> dict[str, np.ndarray]:
    """Numpy arrays under torchvision keys from a file, a directory or a hub id."""
    source = os.path.expanduser(str(source))  # a string operation; the I/O goes through epath
    path = None if source.startswith(('hf-hub:', 'hf://')) else epath.Path(source)
    if path is not None and path.is_dir():
        path = path / HUB_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"Pretrained weights directory {source!r} has no {HUB_FILENAME}; set "
                "config.model.pretrained to the .safetensors or .pth file itself.")
        return _read_safetensors(path)
    if path is not None and path.is_file():
        if source.endswith('.safetensors'):
            return _read_safetensors(path)
        if source.endswith(TORCH_SUFFIXES):
            return _read_torch(path)
        raise PretrainedUnavailableError(
            f"Cannot tell the format of {source!r}: name it *.safetensors or *.pth "
            "(a torchvision state_dict).")
    hub = _HUB_ID.match(source)
    looks_like_file = source.endswith(('.safetensors',) + TORCH_SUFFIXES) or source.startswith(
        ('/', './', '../', 'gs://'))
    if hub is None or looks_like_file:
        raise FileNotFoundError(
            f"Pretrained weights file {source!r} does not exist. Download it first (see "
            "docs/models.md: `bash scripts/get_pretrained.sh resnet50 DIR`) and set "
            "config.model.pretrained to its path, or to a hub id like timm/resnet50.tv_in1k.")
    return _read_safetensors(epath.Path(_hub_download(hub.group(1))))


def _read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    with _local_file(path) as local:
        try:
            return dict(load_file(local))
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise _unreadable(str(path), e) from e


@contextlib.contextmanager
def _local_file(path: epath.Path):
    """A local filename for `path`: itself, or a temporary copy of a gs:// (any URL) file.

    safetensors reads every dtype (bfloat16 included) only from a named local file, and
    `load_file` copies the arrays out, so the temporary copy can go as soon as it returns."""
    if '://' not in str(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = epath.Path(tmp) / path.name
        path.copy(local)
        yield str(local)


def _unreadable(path: str, error: Exception) -> PretrainedUnavailableError:
    return PretrainedUnavailableError(
        f"Cannot read pretrained weights {path!r} ({type(error).__name__}: {error}); the file is "
        "corrupt or a truncated download: delete it and download it again "
        "(bash scripts/get_pretrained.sh, see docs/models.md).")


def _read_torch(path: epath.Path) -> dict[str, np.ndarray]:
    name = str(path)
    try:
        import torch
    except ImportError as e:
        raise PretrainedUnavailableError(
            f"Reading {name!r} needs torch, which is not installed. Pass the same weights as "
            ".safetensors instead (e.g. the hub id timm/resnet50.tv_in1k, see docs/models.md), "
            "or convert once where torch exists: python -c \"import torch, safetensors.torch as s;"
            f" s.save_file(torch.load('{name}', weights_only=True), 'weights.safetensors')\""
        ) from e
    data = io.BytesIO(path.read_bytes())
    try:
        obj = torch.load(data, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  (unpickling errors of all kinds)
        raise _unreadable(name, e) from e
    for wrapper in ('state_dict', 'model'):  # training checkpoints nest the state dict
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{name!r} holds a {type(obj).__name__}, not a state_dict; save "
                         "model.state_dict() instead of the model object.")
    return {k: v.detach().float().cpu().numpy() for k, v in obj.items() if torch.is_tensor(v)}


def _hub_download(repo_id: str) -> str:
    manual = (f"On a machine with internet run `bash scripts/get_pretrained.sh {repo_id} DIR` "
              f"(or download https://huggingface.co/{repo_id}/resolve/main/{HUB_FILENAME}), copy "
              f"the file here and set config.model.pretrained=/path/to/{HUB_FILENAME}.")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise PretrainedUnavailableError(
            f"Fetching hub id {repo_id!r} needs `pip install huggingface_hub`. "
                          f"Or: {manual}") from e
    try:  # the cache first: works offline once the file was fetched
        return hf_hub_download(repo_id, HUB_FILENAME, local_files_only=True)
    except Exception:  # noqa: BLE001  (not cached: try the network next)
        pass
    try:
        return hf_hub_download(repo_id, HUB_FILENAME)
    except Exception as e:  # noqa: BLE001  (offline, unknown repo, auth: one message for all)
        raise PretrainedUnavailableError(f"Could not fetch {HUB_FILENAME} of hub id {repo_id!r} "
                      f"({type(e).__name__}: {e}). {manual}") from e


def _clean_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop BN step counters and the 'module.' prefix that DataParallel adds."""
    out = {}
    for key, value in state.items():
        if key.endswith('num_batches_tracked'):
            continue
        out[key[len('module.'):] if key.startswith('module.') else key] = value
    return out


_SUBMODULE_ORDER = ('conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample.0', 'downsample.1')
_LEAF_ORDER = ('weight', 'bias', 'running_mean', 'running_var')


def _torchvision_order(key: str) -> tuple:
    """Sort key giving torchvision's registration order (stem, layer1.0, ..., fc), so the
    'first mismatching key' does not depend on how a file happens to order its entries."""
    module, _, leaf = key.rpartition('.')
    leaf_rank = _LEAF_ORDER.index(leaf) if leaf in _LEAF_ORDER else len(_LEAF_ORDER)
    m = re.match(r'layer(\d+)\.(\d+)\.(.+)$', module)
    if m:
        sub = m.group(3)
        sub_rank = _SUBMODULE_ORDER.index(sub) if sub in _SUBMODULE_ORDER else len(_SUBMODULE_ORDER)
        return (1, int(m.group(1)), int(m.group(2)), sub_rank, leaf_rank, key)
    if module in ('conv1', 'bn1'):
        return (0, 0, 0, _SUBMODULE_ORDER.index(module), leaf_rank, key)
    return (2 if module == 'fc' else 3, 0, 0, 0, leaf_rank, key)


def _width_of(variables: Mapping[str, Any]) -> int | str:
    try:
        return int(variables['params']['conv1']['kernel'].shape[-1])
    except (KeyError, TypeError, AttributeError):
        return '?'


def _architecture_hint(state: Mapping[str, np.ndarray], model_name: str) -> str:
    """' The file looks like resnet34 (width 64).' plus what to do, when we can tell."""
    blocks = {}
    for key in state:
        m = re.match(r'layer(\d)\.(\d+)\.', key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = tuple(len(blocks.get(i, ())) for i in range(1, 5))
    bottleneck = any('.conv3.' in k for k in state)
    name = _KNOWN.get((stages, bottleneck))
    conv1 = state.get('conv1.weight')
    width = ('' if conv1 is None else
             f" (width {conv1.shape[0]}, {conv1.shape[1]} input channels)")
    if name is None:
        return (" The file is not a torchvision ResNet state dict we recognise; use torchvision "
                "ResNet-18/34/50 weights.")
    return (f" The file looks like {name}{width}; set config.model.name={name!r} (and width 64, "
            f"RGB input) or use {model_name} weights.")
