"""Interleaved A/B of a model's forward+backward or train step under convolution variants.

One process compiles ``value_and_grad`` of the model (BatchNorm in train mode), or with
``--method`` lmoe_jax's production train step of that preset, once per variant (``default``: lax's
convolutions, i.e. ``model.matmul_convs=False``; ``auto``: as shipped; the xla_variants.py patches
and this script's ``nochunks`` / ``chunksN``),
then runs the variants in turn, so a load change on a shared host hits them all alike; it prints
the median wall and process-CPU time per step. ``--check`` first verifies the rewritten
convolutions against direct float64 numpy loops (and the 1x1 dot against the product), so a
variant that is fast because it is wrong cannot pass unnoticed.

    .venv/bin/python benchmarks/conv_ab.py --image_size=64 --variants=default,smallmap,smallmap_dot1x1
    .venv/bin/python benchmarks/conv_ab.py --image_size=224 --variants=default,dot1x1,im2col_all --reps=4
    .venv/bin/python benchmarks/conv_ab.py --image_size=224 --variants=smallmap_dot1x1 --reps=3 \
        --profile=/tmp/prof  # + thread time per op kind, from a jax.profiler trace of one step
    # the production train step of a method preset (lmoe_jax.parallel.jit_train_step), small_cnn:
    .venv/bin/python benchmarks/conv_ab.py --model=small_cnn --image_size=28 --num_classes=6 \
        --batch_size=64 --method=lmoe --variants=nochunks,chunks2,chunks3 --reps=9

``--profile`` reads the trace with ``jax.profiler.ProfileData`` (jaxlib's XSpace reader).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))
sys.path.insert(0, HERE)


def reference_conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """NHWC/HWIO cross-correlation by direct loops over output pixels, in float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    w = np.asarray(w, np.float64)
    k = w.shape[0]
    ho, wo = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, i, j] = np.einsum('nabc,abco->no', patch, w)
    return out


def check() -> None:
    """Rewritten convolutions == float64 loops (forward), and == lax's convolution (gradients)."""
    import jax
    from jax import lax

    import xla_variants

    rng = np.random.default_rng(0)
    dn = lax.conv_dimension_numbers((1, 4, 4, 1), (1, 1, 1, 1), ('NHWC', 'HWIO', 'NHWC'))
    small, worst = xla_variants.make_small_map_conv(None, pointwise_as_dot=True), 0.0
    for h, k, s, p in [(2, 3, 1, 1), (4, 3, 2, 1), (5, 3, 2, 1), (9, 7, 2, 3), (3, 1, 2, 0),
                       (8, 1, 1, 0), (6, 3, 1, 1)]:
        x = rng.normal(size=(2, h, h, 6)).astype(np.float32)
        w = rng.normal(size=(k, k, 6, 4)).astype(np.float32)
        pad = ((p, p), (p, p))
        ref = reference_conv(x, w, s, p)
        got = small(x, w, (s, s), pad, dimension_numbers=dn)
        err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()

        def loss(fn):
            return lambda x, w: (fn(x, w, (s, s), pad, dimension_numbers=dn) ** 2).sum()

        g_ref = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
        g_new = jax.grad(loss(small), (0, 1))(x, w)
        gerr = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(g_ref, g_new))
        worst = max(worst, err, gerr)
        print(f'check h={h} k={k} stride={s} pad={p}: forward rel err {err:.1e}, '
              f'gradient rel err {gerr:.1e}')
    if worst > 1e-5:
        raise SystemExit(f'rewritten convolution disagrees with the reference: {worst:.2e}')


def _conv_kind(line: str) -> str:
    """fwd / input-grad / weight-grad of an optimized-HLO convolution.

    After XLA:CPU's layout normalisation every convolution reads ``b01f_01io->b01f``; a weight
    gradient is the one whose window is a whole feature map (or rhs-dilated by the stride), an
    input gradient is lhs-dilated (strided layers) or reads a transposed (flipped) kernel.
    """
    size = re.search(r'size=(\d+)x', line)
    if ((size and int(size.group(1)) > 7) or 'rhs_dilate' in line
            or (size and size.group(1) == '7' and 'pad=1_1' in line)):
        return 'conv weight-grad'
    if 'lhs_dilate' in line or 'transpose(jvp' in line or 'transpose_copy' in line:
        return 'conv input-grad'
    return 'conv fwd'


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """Top-level instruction name -> kind (conv fwd/input-grad/weight-grad, dot, copy/transpose,
    elementwise fusion, ...), from the optimized HLO of the entry computation and its fusions."""
    comps, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line)
        if head:
            current = comps.setdefault(head.group(2), [])
        elif current is not None and '=' in line:
            current.append(line)
    kinds = {}
    for lines in comps.values():
        for line in lines:
            m = re.match(r'\s*(ROOT )?%?([\w.\-]+) = .*? (\w[\w\-]*)\(', line)
            if not m:
                continue
            name, op = m.group(2), m.group(3)
            body = lines
            called = re.search(r'calls=%?([\w.\-]+)', line)
            if called:
                body = comps.get(called.group(1), [])
            ops = {re.match(r'\s*(ROOT )?%?[\w.\-]+ = .*? (\w[\w\-]*)\(', b).group(2)
                   for b in body if re.match(r'\s*(ROOT )?%?[\w.\-]+ = .*? (\w[\w\-]*)\(', b)}
            convs = [b for b in body if ' convolution(' in b] if called else (
                [line] if op == 'convolution' else [])
            if convs:
                kinds[name] = _conv_kind(convs[0] + line)
            elif op == 'dot' or (called and 'dot' in ops):
                kinds[name] = 'dot'
            elif op in ('copy', 'transpose') or (called and ops & {'copy', 'transpose'}):
                kinds[name] = 'copy/transpose (fused)'
            elif op in ('reduce', 'reduce-window') or (called and ops & {'reduce'}):
                kinds[name] = 'reduce (BatchNorm stats, ...)'
            elif op in ('fusion',):
                kinds[name] = 'elementwise fusion'
            else:
                kinds[name] = op
    return kinds


def profile(run_once, hlo_text: str, log_dir: str, top: int = 15) -> None:
    """Trace one call of ``run_once`` (it waits for its result); print thread time per op kind
    and the top ops (name, kind, shape)."""
    import glob

    import jax
    from jax.profiler import ProfileData  # jaxlib's own XSpace reader: no TensorFlow needed

    run_once()
    with jax.profiler.trace(log_dir):
        run_once()
    path = sorted(glob.glob(f'{log_dir}/**/*.xplane.pb', recursive=True))[-1]
    kinds, per_op = hlo_kinds(hlo_text), {}
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in kinds:
                    per_op[ev.name] = per_op.get(ev.name, 0) + ev.duration_ns / 1e6
    total = sum(per_op.values())
    by_kind = {}
    for name, ms in per_op.items():
        by_kind[kinds[name]] = by_kind.get(kinds[name], 0) + ms
    print(f'op thread time {total:.0f} ms in {len(per_op)} ops ({path})')
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f'  {kind:32s} {ms:8.0f} ms {100 * ms / total:5.1f}%')
    shapes = {m.group(1): m.group(2) for m in re.finditer(
        r'%?([\w.\-]+) = (\S+\[[^\]]*\])', hlo_text)}
    for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f'  top {name:40s} {kinds[name]:28s} {ms:7.1f} ms {shapes.get(name, "")}')


def _local_patches() -> dict:
    """Variants of this script on top of xla_variants' (each replaces ``resnet._layers``' conv).

    ``auto``: the model as shipped (``model.matmul_convs='auto'``); ``nochunks``: the shipped
    rewrites without batch chunks (``model.matmul_convs=True`` before the chunks shipped);
    ``chunksN``: with N batch chunks for the YNNPACK-sized spatial convolutions; ``chunksallN``:
    for every spatial convolution; ``ynnpadN``: see :func:`_ynn_padded`.
    """
    from lmoe_jax.models import cpu_convs
    patches = {'auto': None,
               'nochunks': cpu_convs.make_small_map_conv(None, pointwise_as_dot=True)}
    for k in (2, 3, 4, 6):
        patches[f'chunks{k}'] = cpu_convs.make_small_map_conv(None, pointwise_as_dot=True,
                                                              batch_chunks=k)
        patches[f'chunksall{k}'] = cpu_convs.make_small_map_conv(
            None, pointwise_as_dot=True, batch_chunks=k, all_channels=True)
        patches[f'ynnpad{k}'] = _ynn_padded(patches[f'chunks{k}'], k)
    return patches


def _ynn_padded(fallback, chunks: int):
    """Candidate: spatial convolutions with <= 16 channels on both sides (which XLA:CPU gives to
    Eigen) with their output channels zero-padded to 17, so that XLA gives them to YNNPACK, in
    ``chunks`` batch chunks, the padding sliced off again; the rest through ``fallback``."""
    import jax.numpy as jnp

    from lmoe_jax.models import cpu_convs

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
        kh, kw, cin, cout = rhs.shape
        if (kh * kw > 1 and max(cin, cout) <= cpu_convs.YNN_MAX_SMALL_CHANNELS
                and not isinstance(padding, str) and feature_group_count == 1 and not kwargs
                and lhs_dilation in (None, (1, 1)) and rhs_dilation in (None, (1, 1))):
            extra = cpu_convs.YNN_MAX_SMALL_CHANNELS + 1 - cout
            w = jnp.pad(rhs, ((0, 0), (0, 0), (0, 0), (0, extra)))
            n = max(1, min(chunks, lhs.shape[0] // 16))
            y = cpu_convs.batch_chunked_conv(lhs, w, window_strides, padding, n,
                                             dimension_numbers=dimension_numbers,
                                             precision=precision)
            return y[..., :cout]
        return fallback(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, precision, **kwargs)
    return conv


def _apply_variant(name: str, original_layers) -> bool:
    """Patch ``resnet._layers`` for variant ``name``; True when the model should be built with
    ``matmul_convs='auto'`` (the shipped default) rather than lax's convolutions."""
    import functools

    import xla_variants
    from lmoe_jax.models import resnet

    resnet._layers = original_layers
    local = _local_patches()
    if name == 'auto':
        return True
    if name in local:
        def layers(dtype, train, bn_axis_name, matmul_convs=False, fn=local[name]):
            conv, norm = original_layers(dtype, train, bn_axis_name, matmul_convs)
            return functools.partial(conv, conv_general_dilated=fn), norm
        resnet._layers = layers
    elif name != 'default':
        xla_variants.apply(name)
    return False


def build_grad(args, name, original_layers):
    """value_and_grad of a loss on the model's train-mode output: (run_once, hlo)."""
    import jax

    from lmoe_jax.models import create_model

    n, b = args.image_size, args.batch_size
    x = np.random.default_rng(0).normal(size=(b, n, n, args.channels)).astype(np.float32)
    auto = _apply_variant(name, original_layers)
    # matmul_convs=False: 'default' is lax's convolutions, whatever the backend.
    model = create_model(dict(name=args.model, width=args.width,
                              matmul_convs='auto' if auto else False), args.num_classes)
    variables = jax.jit(lambda r, m=model: m.init(r, x[:1], train=False))(jax.random.key(0))

    def loss(params, x, m=model, v=variables):
        out, _ = m.apply({'params': params, 'batch_stats': v['batch_stats']}, x, train=True,
                         mutable=['batch_stats'])
        return (out ** 2).mean()

    fn = jax.jit(jax.value_and_grad(loss)).lower(variables['params'], x).compile()
    params = variables['params']
    return (lambda: jax.block_until_ready(fn(params, x))), fn.as_text()


def build_train_step(args, name, original_layers):
    """lmoe_jax's production step of ``args.method`` (jit_train_step, state donated), as
    benchmarks/jax_step.py builds it: (run_once, hlo)."""
    import jax

    import common
    from lmoe_jax import losses, parallel, train
    from lmoe_jax.models import create_model

    auto = _apply_variant(name, original_layers)
    n, b, c, k = args.image_size, args.batch_size, args.channels, args.num_classes
    model = create_model(dict(name=args.model, width=args.width,
                              matmul_convs='auto' if auto else False), k)
    tx, lr_fn = train.make_optimizer(common.OPTIMIZER, 10_000)
    mesh = parallel.make_mesh(jax.devices())
    box = {'state': parallel.init_state(jax.random.key(0, impl='rbg'), model, tx, lr_fn,
                                        (n, n, c), mesh)}
    rng = np.random.default_rng(0)
    batch = parallel.global_batch({
        'image': rng.normal(size=(b, n, n, c)).astype(np.float32),
        'label': rng.integers(0, k, b).astype(np.int32),
        'ood_image': rng.normal(size=(b, n, n, c)).astype(np.float32)}, mesh)
    key = parallel.replicate(jax.random.key(1), mesh)
    fn = parallel.jit_train_step(losses.get_method(args.method), mesh).lower(
        box['state'], batch, key).compile()

    def run_once():
        box['state'], metrics = fn(box['state'], batch, key)
        jax.block_until_ready((box['state'], metrics))
    return run_once, fn.as_text()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet50', help='resnet50, small_cnn, ...')
    parser.add_argument('--width', type=int, default=None, help="the model's width (default: its own)")
    parser.add_argument('--image_size', type=int, default=64)
    parser.add_argument('--channels', type=int, default=None, help='default: 1 for small_cnn, else 3')
    parser.add_argument('--num_classes', type=int, default=100)
    parser.add_argument('--batch_size', type=int, default=8)
    parser.add_argument('--method', default=None,
                        help="time lmoe_jax's train step of this preset (baseline, mixoe_mixup, "
                             'lmoe, ...) instead of value_and_grad of a loss of the model output')
    parser.add_argument('--reps', type=int, default=8, help='timed rounds (first one dropped)')
    parser.add_argument('--variants', default='default,smallmap,smallmap_dot1x1',
                        help="comma-separated: 'default' (lax), 'auto' (as shipped), 'nochunks', "
                             "'chunksN', or any xla_variants patch")
    parser.add_argument('--check', action='store_true', help='verify the rewrites first')
    parser.add_argument('--profile', default=None, metavar='DIR',
                        help='then trace one step per variant into DIR and print time per op kind')
    args = parser.parse_args()
    if args.channels is None:
        args.channels = 1 if args.model == 'small_cnn' else 3
    if args.check:
        check()

    import common
    from lmoe_jax.models import resnet

    build = build_train_step if args.method else build_grad
    original, compiled = resnet._layers, {}
    for name in args.variants.split(','):
        t0 = time.perf_counter()
        compiled[name] = build(args, name, original)
        print(f'{name}: compiled in {time.perf_counter() - t0:.1f} s', flush=True)
    resnet._layers = original

    print(f'load average before {common.load_average()}', flush=True)
    wall, cpu = {k: [] for k in compiled}, {k: [] for k in compiled}
    for _ in range(args.reps):
        for name, (run_once, _) in compiled.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run_once()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    print(f'load average after {common.load_average()}')
    for name in compiled:
        w, c = wall[name][1:], cpu[name][1:]
        print(f'{name:16s} wall median {np.median(w):.4f} s (min {min(w):.4f}) | '
              f'CPU median {np.median(c):.4f} s (min {min(c):.4f})')
    if args.profile:
        for name, (run_once, hlo) in compiled.items():
            print(f'--- profile {name}')
            profile(run_once, hlo, os.path.join(args.profile, name))


if __name__ == '__main__':
    main()
