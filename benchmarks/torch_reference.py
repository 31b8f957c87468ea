"""The OE-family step written the PyTorch way, as the comparison point of train_step.py.

MixOE-style loop on a torchvision ResNet: one forward per image set (ID, outliers, mixed), the
loss assembled from the logits, ``loss.backward()``, ``optimizer.step()``, scheduler step. The
objective and the lam draw follow DESIGN.md (the same weights as ``lmoe_jax.losses.PRESETS``),
so the work per step matches the JAX step; BatchNorm differs on purpose (separate forwards
normalise each set with its own statistics, the JAX step normalises the concatenation), as it
does between the two code bases. The PyTorch side is only used for timing, never for numbers
that tests compare against.
"""
from __future__ import annotations

import time

import numpy as np

# Weights of the presets timed here (DESIGN.md / lmoe_jax.losses.PRESETS).
PRESETS = {
    'baseline': dict(),
    'oe': dict(oe=1.0),
    'mixoe_mixup': dict(input_mix=5.0, mix='mixup', alpha=1.0),
    'mixoe_cutmix': dict(input_mix=5.0, mix='cutmix', alpha=2.0),
    'lmoe': dict(logit_mix=5.0, consistency=1.0, mix='mixup', alpha=1.0),
}


def soft_cross_entropy(logits, target):
    import torch
    return -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


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


def make_step(model, optimizer, scheduler, method: str, num_classes: int, autocast):
    """A closure doing one training step of ``method``; lam drawn on the host as MixOE does."""
    import torch
    import torch.nn.functional as F

    w = PRESETS[method]
    rng = np.random.default_rng(0)
    uniform = 1.0 / num_classes

    def step(x, y, x_ood):
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            if w.get('oe'):
                loss = loss + w['oe'] * soft_cross_entropy(model(x_ood), torch.full_like(
                    logits, uniform, dtype=torch.float32))
            if w.get('input_mix') or w.get('logit_mix'):
                lam = float(rng.beta(w['alpha'], w['alpha']))
                if w['mix'] == 'cutmix':
                    x_mix, lam = cutmix(x, x_ood, lam, rng)
                else:
                    x_mix = lam * x + (1.0 - lam) * x_ood
                target = lam * F.one_hot(y, num_classes).float() + (1.0 - lam) * uniform
                logits_mix = model(x_mix).float()
                if w.get('input_mix'):
                    loss = loss + w['input_mix'] * soft_cross_entropy(logits_mix, target)
                if w.get('logit_mix'):
                    logits_ood = model(x_ood).float()
                    logits_lmix = lam * logits.float() + (1.0 - lam) * logits_ood
                    loss = loss + w['logit_mix'] * soft_cross_entropy(logits_lmix, target)
                    loss = loss + w['consistency'] * F.mse_loss(logits_mix, logits_lmix)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss

    return step


def run(spec: dict) -> dict:
    """Time one (case, method) in this process; the same report fields as the JAX worker."""
    import contextlib

    import torch
    import torchvision

    from train_step import PASSES, reset_rss_peak, rss_mib, rss_peak_mib, summarize

    if spec['model'] not in ('resnet18', 'resnet34', 'resnet50'):
        raise ValueError(f"no PyTorch reference for model {spec['model']!r}; use a resnet")
    device = spec.get('device', 'auto')
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.set_num_threads(spec['threads'])
    if device == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.manual_seed(0)
    n, b, c, k = spec['image_size'], spec['batch_size'], spec['channels'], spec['num_classes']
    model = getattr(torchvision.models, spec['model'])(num_classes=k).to(device)
    if c != 3:
        model.conv1 = torch.nn.Conv2d(c, 64, 7, 2, 3, bias=False).to(device)
    memory_format = (torch.channels_last if spec.get('variant') == 'channels_last'
                     else torch.contiguous_format)
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                                weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10_000, eta_min=1e-6)
    if spec['dtype'] == 'bfloat16':
        autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    step = make_step(model, optimizer, scheduler, spec['method'], k, autocast)

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
    reset_rss_peak()
    rss_before = rss_mib()
    for _ in range(max(1, spec['warmup'])):  # >= 1: the first run allocates
        loss = step(x, y, x_ood)
    sync()
    if not np.isfinite(float(loss)):
        raise RuntimeError(f'non-finite loss in {spec}')
    times, cpu_times = [], []
    for _ in range(spec['steps']):
        t0, c0 = time.perf_counter(), time.process_time()
        step(x, y, x_ood)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    out = summarize(times, b, PASSES[spec['method']], cpu_times)
    out.update(device=torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
               torch=torch.__version__, torch_threads=torch.get_num_threads())
    if device == 'cuda':
        out['peak_mib'] = torch.cuda.max_memory_allocated() / 2**20
        out['peak_kind'] = 'torch.cuda.max_memory_allocated over the steps'
    else:
        peak = rss_peak_mib()
        if peak is not None and rss_before is not None:
            out['peak_mib'] = peak - rss_before
            out['peak_kind'] = 'host RSS high-water delta over the steps'
    return out
