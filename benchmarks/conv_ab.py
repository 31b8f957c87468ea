"""Interleaved A/B of ResNet-50 forward+backward under the convolution variants of xla_variants.py.

One process compiles ``value_and_grad`` of the model (BatchNorm in train mode) once per variant
(``default``: lax's convolutions, i.e. ``model.matmul_convs=False``),
then runs the variants in turn, so a load change on a shared host hits them all alike; it prints
the median wall and process-CPU time per step. ``--check`` first verifies the rewritten
convolutions against direct float64 numpy loops (and the 1x1 dot against the product), so a
variant that is fast because it is wrong cannot pass unnoticed.

    .venv/bin/python benchmarks/conv_ab.py --image_size=64 --variants=default,smallmap,smallmap_dot1x1
    .venv/bin/python benchmarks/conv_ab.py --image_size=224 --variants=default,dot1x1,im2col_all --reps=4
"""
from __future__ import annotations

import argparse
import os
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image_size', type=int, default=64)
    parser.add_argument('--batch_size', type=int, default=8)
    parser.add_argument('--reps', type=int, default=8, help='timed rounds (first one dropped)')
    parser.add_argument('--variants', default='default,smallmap,smallmap_dot1x1')
    parser.add_argument('--check', action='store_true', help='verify the rewrites first')
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
        compiled[name] = (variables['params'], fn)
        print(f'{name}: compiled in {time.perf_counter() - t0:.1f} s', flush=True)
    resnet._layers = original

    wall, cpu = {k: [] for k in compiled}, {k: [] for k in compiled}
    for _ in range(args.reps):
        for name, (params, fn) in compiled.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(params, x))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    print(f'load average {common.load_average()}')
    for name in compiled:
        w, c = wall[name][1:], cpu[name][1:]
        print(f'{name:16s} wall median {np.median(w):.3f} s (min {min(w):.3f}) | '
              f'CPU median {np.median(c):.3f} s (min {min(c):.3f})')


if __name__ == '__main__':
    main()
