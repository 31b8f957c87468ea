"""Interleaved A/B of ResNet-50 forward+backward under the convolution variants of xla_variants.py.

One process compiles ``value_and_grad`` of the model (BatchNorm in train mode) once per variant
(``default``: lax's convolutions, i.e. ``model.matmul_convs=False``),
then runs the variants in turn, so a load change on a shared host hits them all alike; it prints
the median wall and process-CPU time per step. ``--check`` first verifies the rewritten
convolutions against direct float64 numpy loops (and the 1x1 dot against the product), so a
variant that is fast because it is wrong cannot pass unnoticed.

    .venv/bin/python benchmarks/conv_ab.py --image_size=64 --variants=default,smallmap,smallmap_dot1x1
    .venv/bin/python benchmarks/conv_ab.py --image_size=224 --variants=default,dot1x1,im2col_all --reps=4
    .venv/bin/python benchmarks/conv_ab.py --image_size=224 --variants=smallmap_dot1x1 --reps=3 \
        --profile=/tmp/prof  # + thread time per op kind, from a jax.profiler trace of one step

``--profile`` needs TensorFlow's xplane proto (``tensorflow.tsl.profiler.protobuf``).
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


def profile(fn, params, x, hlo_text: str, log_dir: str, top: int = 15) -> None:
    """Trace one step; print thread time per op kind and the top ops (name, kind, shape)."""
    import glob

    import jax
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    jax.block_until_ready(fn(params, x))
    with jax.profiler.trace(log_dir):
        jax.block_until_ready(fn(params, x))
    space = xplane_pb2.XSpace()
    path = sorted(glob.glob(f'{log_dir}/**/*.xplane.pb', recursive=True))[-1]
    with open(path, 'rb') as f:
        space.ParseFromString(f.read())
    kinds, per_op = hlo_kinds(hlo_text), {}
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for ev in line.events:
                name = names.get(ev.metadata_id, '')
                if name in kinds:
                    per_op[name] = per_op.get(name, 0) + ev.duration_ps / 1e9
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image_size', type=int, default=64)
    parser.add_argument('--batch_size', type=int, default=8)
    parser.add_argument('--reps', type=int, default=8, help='timed rounds (first one dropped)')
    parser.add_argument('--variants', default='default,smallmap,smallmap_dot1x1')
    parser.add_argument('--check', action='store_true', help='verify the rewrites first')
    parser.add_argument('--profile', default=None, metavar='DIR',
                        help='then trace one step per variant into DIR and print time per op kind')
    args = parser.parse_args()
    if args.check:
        check()

    import jax

    import common
    import xla_variants
    from lmoe_jax.models import create_model, resnet

    n, b = args.image_size, args.batch_size
    x = np.random.default_rng(0).normal(size=(b, n, n, 3)).astype(np.float32)
    original, compiled = resnet._layers, {}
    for name in args.variants.split(','):
        resnet._layers = original
        if name != 'default':
            xla_variants.apply(name)
        # matmul_convs=False: 'default' is lax's convolutions, whatever the backend.
        model = create_model(dict(name='resnet50', matmul_convs=False), 100)
        variables = jax.jit(lambda r, m=model: m.init(r, x[:1], train=False))(jax.random.key(0))

        def loss(params, x, m=model, v=variables):
            out, _ = m.apply({'params': params, 'batch_stats': v['batch_stats']}, x, train=True,
                             mutable=['batch_stats'])
            return (out ** 2).mean()

        t0 = time.perf_counter()
        fn = jax.jit(jax.value_and_grad(loss)).lower(variables['params'], x).compile()
        compiled[name] = (variables['params'], fn, fn.as_text())
        print(f'{name}: compiled in {time.perf_counter() - t0:.1f} s', flush=True)
    resnet._layers = original

    wall, cpu = {k: [] for k in compiled}, {k: [] for k in compiled}
    for _ in range(args.reps):
        for name, (params, fn, _) in compiled.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(params, x))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    print(f'load average {common.load_average()}')
    for name in compiled:
        w, c = wall[name][1:], cpu[name][1:]
        print(f'{name:16s} wall median {np.median(w):.3f} s (min {min(w):.3f}) | '
              f'CPU median {np.median(c):.3f} s (min {min(c):.3f})')
    if args.profile:
        for name, (params, fn, hlo) in compiled.items():
            print(f'--- profile {name}')
            profile(fn, params, x, hlo, os.path.join(args.profile, name))


if __name__ == '__main__':
    main()
