"""The OE-family step written in PyTorch: the comparison point of train_step.py and gpu.py.

A torchvision ResNet (or a twin of lmoe_jax's ``small_cnn``) trained the usual PyTorch way: the
loss assembled from the logits, ``loss.backward()``, ``optimizer.step()``, scheduler step. The
objective's weights and the lam draw come from ``lmoe_jax.losses.get_method`` (the same presets
as the JAX step), so the work per step matches. Two forward layouts:

* ``forward='separate'`` (train_step.py): one forward per image set (ID, outliers, mixed), as in
  the MixOE code base; BatchNorm normalises each set with its own statistics;
* ``forward='concat'`` (gpu.py): one forward over the concatenation, as ``lmoe_jax.train``
  does, so both frameworks run the same layers on the same 1-3 x B images.

``compile=True`` wraps the model in ``torch.compile`` (the loss and the optimiser stay eager).
Used for timing only, never for numbers that tests compare against.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

import common


def cutmix(x, x_ood, lam: float, rng: np.random.Generator):
    """Paste a box of area ~(1 - lam) of the outlier into the ID images; exact lam back."""
    h, w = x.shape[-2:]
    cut = np.sqrt(1.0 - lam)
    bh, bw = int(h * cut), int(w * cut)
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    y0, y1 = np.clip(cy - bh // 2, 0, h), np.clip(cy + bh // 2, 0, h)
    x0, x1 = np.clip(cx - bw // 2, 0, w), np.clip(cx + bw // 2, 0, w)
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = x_ood[..., y0:y1, x0:x1]
    return mixed, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def objective(weights, logits_id, logits_ood, logits_mix, labels, lam: float, num_classes: int):
    """``lmoe_jax.losses.oe_family_loss`` in PyTorch (float32 logits in, scalar loss out)."""
    import torch
    import torch.nn.functional as F

    def soft_ce(logits, target):
        return -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()

    loss = float(weights.id) * F.cross_entropy(logits_id, labels)
    target = lam * F.one_hot(labels, num_classes).float() + (1.0 - lam) / num_classes
    logits_lmix = None
    if logits_ood is not None:
        if float(weights.oe):
            loss = loss + float(weights.oe) * soft_ce(
                logits_ood, torch.full_like(logits_ood, 1.0 / num_classes))
        if float(weights.energy):
            e_id, e_ood = -torch.logsumexp(logits_id, -1), -torch.logsumexp(logits_ood, -1)
            loss = loss + float(weights.energy) * (
                F.relu(e_id - float(weights.m_in)).square().mean()
                + F.relu(float(weights.m_out) - e_ood).square().mean())
        if weights.logit_mix_stop_id:
            raise NotImplementedError('the PyTorch reference has no logit_mix_stop_id')
        logits_lmix = lam * logits_id + (1.0 - lam) * logits_ood
        if float(weights.logit_mix):
            loss = loss + float(weights.logit_mix) * soft_ce(logits_lmix, target)
    if logits_mix is not None and float(weights.input_mix):
        loss = loss + float(weights.input_mix) * soft_ce(logits_mix, target)
    if logits_mix is not None and logits_lmix is not None and float(weights.consistency):
        if weights.consistency_kind != 'mse' or weights.stop_gradient != 'none':
            raise NotImplementedError('the PyTorch reference has the mse consistency only')
        loss = loss + float(weights.consistency) * F.mse_loss(logits_mix, logits_lmix)
    return loss


def make_step(model, optimizer, scheduler, method_name: str, num_classes: int, autocast,
              forward: str = 'separate'):
    """A closure doing one training step of ``method_name``; lam drawn on the host (MixOE)."""
    import torch

    from lmoe_jax import losses

    method = losses.get_method(method_name)
    if method.lam_per_example:
        raise NotImplementedError('the PyTorch reference draws one lam per batch')
    if forward not in ('separate', 'concat'):
        raise ValueError(f"forward must be 'separate' or 'concat', got {forward!r}")
    rng = np.random.default_rng(0)

    def step(x, y, x_ood):
        lam, x_mix = 1.0, None
        if method.needs_lam:
            lam = float(rng.beta(method.alpha, method.alpha))
        if method.needs_mix:
            if method.mix == 'cutmix':
                x_mix, lam = cutmix(x, x_ood, lam, rng)
            else:
                x_mix = lam * x + (1.0 - lam) * x_ood
        parts = [x] + ([x_ood] if method.needs_ood else []) + ([x_mix] if method.needs_mix else [])
        with autocast():
            if forward == 'concat':
                logits = model(torch.cat(parts) if len(parts) > 1 else x).float()
                chunks = list(logits.chunk(len(parts)))
            else:
                chunks = [model(p).float() for p in parts]
            logits_id = chunks.pop(0)
            logits_ood = chunks.pop(0) if method.needs_ood else None
            logits_mix = chunks.pop(0) if method.needs_mix else None
            loss = objective(method.weights, logits_id, logits_ood, logits_mix, y, lam,
                             num_classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss

    return step


def small_cnn(num_classes: int, channels: int, width: int = 16):
    """lmoe_jax's ``small_cnn`` in torch.nn: 3x3 stem, three stages of one BasicBlock each.

    The block is torchvision's ``BasicBlock`` (conv3x3(stride)-BN-ReLU-conv3x3-BN, 1x1/stride +
    BN projection, add, ReLU), written out so that this case needs torch only, not torchvision.
    """
    from torch import nn

    def conv(cin, cout, k, stride=1):
        return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(conv(cin, cout, 3, stride), nn.BatchNorm2d(cout),
                                      nn.ReLU(inplace=True), conv(cout, cout, 3),
                                      nn.BatchNorm2d(cout))
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers = [conv(channels, width, 3), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    cin = width
    for i in range(3):
        features = width * 2 ** i
        layers.append(BasicBlock(cin, features, 1 if i == 0 else 2))
        cin = features
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def build_model(name: str, num_classes: int, channels: int, width: int | None = None):
    """torchvision's ResNet of that name (width 64 only), or the ``small_cnn`` twin."""
    import torch

    if name == 'small_cnn':
        return small_cnn(num_classes, channels, width or 16)
    import torchvision
    if name not in ('resnet18', 'resnet34', 'resnet50'):
        raise ValueError(f'no PyTorch reference for model {name!r}')
    if width not in (None, 64):
        raise ValueError(f'torchvision {name} has width 64 only, got {width}')
    model = getattr(torchvision.models, name)(num_classes=num_classes)
    if channels != 3:
        model.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return model


def run(spec: dict) -> dict:
    """Time one (case, method) in this process; the same report fields as the JAX worker."""
    import torch

    device = spec.get('device', 'auto')
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if spec.get('threads'):
        torch.set_num_threads(spec['threads'])
    if device == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.manual_seed(0)
    n, b, c, k = spec['image_size'], spec['batch_size'], spec['channels'], spec['num_classes']
    channels_last = spec.get('memory_format', 'contiguous') == 'channels_last' or \
        spec.get('variant') == 'channels_last'
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(spec['model'], k, c, spec.get('width')).to(device)
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=common.OPTIMIZER.learning_rate,
                                momentum=common.OPTIMIZER.momentum,
                                nesterov=common.OPTIMIZER.nesterov,
                                weight_decay=common.OPTIMIZER.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, 10_000, eta_min=common.OPTIMIZER.end_learning_rate)
    if spec.get('compile'):
        model = torch.compile(model)
    if spec['dtype'] == 'bfloat16':
        autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    step = make_step(model, optimizer, scheduler, spec['method'], k, autocast,
                     spec.get('forward', 'separate'))

    gen = np.random.default_rng(0)
    to = lambda a: torch.from_numpy(a).to(device).contiguous(memory_format=memory_format)  # noqa
    x = to(gen.normal(size=(b, c, n, n)).astype(np.float32))
    x_ood = to(gen.normal(size=(b, c, n, n)).astype(np.float32))
    y = torch.from_numpy(gen.integers(0, k, b)).to(device)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

    # Memory baseline before the first step, as in the JAX worker; here it also counts the
    # gradients and momentum buffers that PyTorch allocates lazily in the first step.
    sync()
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    common.reset_rss_peak()
    rss_before = common.rss_mib()
    first_steps = []
    for _ in range(max(1, spec['warmup'])):  # >= 1: the first run allocates (and compiles)
        t0 = time.perf_counter()
        loss = step(x, y, x_ood)
        sync()
        first_steps.append(time.perf_counter() - t0)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f'non-finite loss in {spec}')
    times, cpu_times = common.time_steps(lambda: step(x, y, x_ood), spec['steps'],
                                         lambda _: sync())
    out = common.summarize(times, b, common.forward_passes(spec['method']), cpu_times)
    out.update(device=torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
               torch=torch.__version__, torch_threads=torch.get_num_threads(),
               first_step_s=first_steps[0])
    if spec.get('compile'):  # the first step traces and compiles the forward and the backward
        out['compile_s'] = max(first_steps[0] - out['step_s_median'], 0.0)
    if device == 'cuda':
        out['peak_mib'] = torch.cuda.max_memory_allocated() / 2**20
        out['peak_kind'] = 'torch.cuda.max_memory_allocated over the steps'
        out['memory_limit_mib'] = torch.cuda.get_device_properties(0).total_memory / 2**20
    else:
        peak = common.rss_peak_mib()
        if peak is not None and rss_before is not None:
            out['peak_mib'] = peak - rss_before
            out['peak_kind'] = 'host RSS high-water delta over the steps'
    return out
