"""cpu_convs' batch-chunked convolutions equal lax.conv_general_dilated, within a bound derived
from the computation.

Every output element of a convolution (forward, input gradient, weight gradient) is one sum of
k products of float32 numbers: k = kh*kw*C_in for the forward, kh*kw*C_out for the input
gradient, N*H_out*W_out for the weight gradient. Summed in float32 in any order (any bracketing,
with or without fused multiply-adds), the result is within gamma_k * sum_i |a_i b_i| of the exact
sum, gamma_k = k u / (1 - k u), u = 2**-24 (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., eq. 3.5). Two computations of the same sums therefore differ by at most
2 gamma_k * sum_i |a_i b_i|; sum_i |a_i b_i| is the same convolution (or its gradient) of the
absolute values, computed here by lax itself (a sum of non-negative terms, so its own rounding
error is a factor (1 + gamma_k) at most, covered by the slack below).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lmoe_jax.models import cpu_convs

U = 2.0 ** -24


def _gamma(k: int) -> float:
    return k * U / (1 - k * U)


def _conv_and_grads(conv, x, w, g, stride, pad):
    """Forward, input gradient and weight gradient of ``conv`` for the cotangent ``g``."""
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
    y, vjp = jax.vjp(lambda x, w: conv(x, w, (stride, stride), pad, dimension_numbers=dn,
                                       precision=lax.Precision.HIGHEST), x, w)
    gx, gw = vjp(g)
    return [np.asarray(a, np.float64) for a in (y, gx, gw)]


CASES = [  # (N, H, C_in, C_out, stride, chunks): uneven splits, strided, the small_cnn shapes
    (7, 9, 17, 5, 1, 3),
    (12, 8, 6, 24, 2, 2),
    (48, 14, 32, 32, 1, 3),
    (48, 28, 16, 32, 2, 3),
]


@pytest.mark.parametrize('n,h,cin,cout,stride,chunks', CASES)
def test_batch_chunked_conv_equals_lax(n, h, cin, cout, stride, chunks):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, h, h, cin)).astype(np.float32)
    w = rng.normal(size=(3, 3, cin, cout)).astype(np.float32)
    pad = ((1, 1), (1, 1))
    ho = (h + 2 - 3) // stride + 1
    g = rng.normal(size=(n, ho, ho, cout)).astype(np.float32)

    def chunked(lhs, rhs, window_strides, padding, **kw):
        return cpu_convs.batch_chunked_conv(lhs, rhs, window_strides, padding, chunks, **kw)

    got = _conv_and_grads(chunked, x, w, g, stride, pad)
    ref = _conv_and_grads(lax.conv_general_dilated, x, w, g, stride, pad)
    mag = _conv_and_grads(lax.conv_general_dilated, np.abs(x), np.abs(w), np.abs(g), stride, pad)
    # Control: the same computation with the last image (and its cotangent) zeroed, i.e. what a
    # chunking that lost its last chunk's last image would give, must break the bound.
    x0, g0 = x.copy(), g.copy()
    x0[-1], g0[-1] = 0, 0
    control = _conv_and_grads(lax.conv_general_dilated, x0, w, g0, stride, pad)
    terms = {'forward': 9 * cin, 'input gradient': 9 * cout, 'weight gradient': n * ho * ho}
    for (what, k), a, b, m, c in zip(terms.items(), got, ref, mag, control):
        assert a.shape == b.shape, what
        bound = 2 * _gamma(k) * m * (1 + 2 * _gamma(k)) + np.finfo(np.float32).tiny
        excess = np.abs(a - b) / bound
        assert excess.max() <= 1.0, f'{what}: |chunked - lax| is {excess.max():.2f}x the bound'
        assert (np.abs(c - b) / bound).max() > 1.0, f'{what}: the bound is vacuous'


def test_chunked_program_has_one_convolution_per_chunk_and_direction():
    """The split is real: forward and backward of a 3-chunk convolution hold 3 forward
    convolutions and 3 input-gradient + 3 weight-gradient convolutions (lax: 1 + 2)."""
    x, w = jnp.zeros((48, 14, 14, 32)), jnp.zeros((3, 3, 32, 32))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
    conv = cpu_convs.make_small_map_conv(None, pointwise_as_dot=True, batch_chunks=3)

    def count(fn):
        loss = lambda x, w: fn(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn).sum()  # noqa: E731
        fwd = jax.jit(loss).lower(x, w).as_text().count('stablehlo.convolution')
        both = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text().count('stablehlo.convolution')
        return fwd, both

    assert count(lax.conv_general_dilated) == (1, 2)
    assert count(conv) == (3, 6)


def test_num_batch_chunks_rule():
    """Only spatial kernels with > 16 channels on either side (XLA:CPU's YNNPACK condition),
    never chunks smaller than min_chunk, and never more than asked for."""
    rule = cpu_convs.num_batch_chunks
    assert rule((192, 14, 14, 32), (3, 3, 32, 32), 3, 16) == 3
    assert rule((192, 28, 28, 16), (3, 3, 16, 16), 3, 16) == 1   # Eigen's, already threaded
    assert rule((192, 28, 28, 16), (3, 3, 16, 32), 3, 16) == 3   # 16 -> 32: YNNPACK's
    assert rule((192, 14, 14, 32), (1, 1, 32, 64), 3, 16) == 1   # 1x1: a dot
    assert rule((40, 14, 14, 32), (3, 3, 32, 32), 3, 16) == 2    # chunks of >= 16 images
    assert rule((31, 14, 14, 32), (3, 3, 32, 32), 3, 16) == 1
    assert rule((192, 14, 14, 32), (3, 3, 32, 32), 1, 16) == 1
