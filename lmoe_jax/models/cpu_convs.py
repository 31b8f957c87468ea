"""Convolutions as matrix products where XLA:CPU has no fast kernel (model.matmul_convs).

Found by profiling the train step on CPU (docs/benchmarks.md): XLA swaps the operands of a
convolution whose window has more pixels than its input (ResNet-50's 3x3 convolutions on the 2x2
maps of its last stage at 64 px), and the swapped form runs in generic loops; XLA also computes
the weight gradient of a 1x1 convolution as a convolution over the whole map. Written as matrix
products they are 2.5-3.3x faster for ResNet-50 at 64 px on CPU. Same parameters, same numbers up
to float summation order. Measured on CPU only, hence on by default on the CPU backend only
(``model.matmul_convs='auto'``).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _is_pointwise(rhs_shape, padding, lhs_dilation, rhs_dilation, feature_group_count) -> bool:
    """A 1x1 kernel, no padding, no dilation, no groups: the convolution is a matrix product."""
    no_pad = padding == 'VALID' or (not isinstance(padding, str)
                                    and all(tuple(p) == (0, 0) for p in padding))
    ones = lambda d: d is None or all(v == 1 for v in d)  # noqa: E731
    return (tuple(rhs_shape[:-2]) == (1, 1) and no_pad and ones(lhs_dilation)
            and ones(rhs_dilation) and feature_group_count == 1)


def conv_or_dot(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` for NHWC/HWIO, except that 1x1 convolutions become a dot.

    XLA:CPU runs the weight gradient of a 1x1 convolution as a convolution whose window is the
    whole feature map, which is far slower than the matrix product it is; written as a dot
    (after the stride's subsampling) the forward, input-gradient and weight-gradient are all
    plain GEMMs. The dot is 2-D (``[N*H*W, C] @ [C, O]``): then the weight gradient is one dot
    contracting dimension 0 of both operands in place, whereas a 4-D einsum's weight gradient
    gets a fused copy of the activations into ``[C, N*H*W]`` that XLA:CPU runs slowly (2.6x the
    2-D form's time at 224 px, docs/benchmarks.md). Same parameters and numbers (up to float
    summation order).
    """
    nhwc = dimension_numbers is not None and tuple(
        getattr(dimension_numbers, 'lhs_spec', ())) == (0, 3, 1, 2)
    if nhwc and _is_pointwise(rhs.shape, padding, lhs_dilation, rhs_dilation,
                              feature_group_count) and not kwargs:
        sh, sw = window_strides
        x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
        n, h, w, c = x.shape
        y = jnp.dot(x.reshape(n * h * w, c), rhs[0, 0], precision=precision)
        return y.reshape(n, h, w, rhs.shape[-1])
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision,
                                    **kwargs)


def conv_as_patches_dot(lhs, rhs, window_strides, padding):
    """An NHWC/HWIO convolution as one dot over the concatenated shifted views (im2col by slicing).

    For tiny feature maps (ResNet-50's last stage at 64 px is 2x2) XLA swaps the operands of a
    3x3 convolution whose window covers the whole image and runs the result, a convolution that
    no fast CPU kernel takes, in generic loops; slices and one GEMM avoid that entirely.
    """
    kh, kw, cin, cout = rhs.shape
    (sh, sw), (ph, pw) = window_strides, padding
    x = jnp.pad(lhs, ((0, 0), tuple(ph), tuple(pw), (0, 0)))
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    views = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
             for i in range(kh) for j in range(kw)]
    cols = jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]
    return jnp.einsum('nhwk,ko->nhwo', cols, rhs.reshape(kh * kw * cin, cout))


def make_small_map_conv(max_output_pixels: int | None = None, pointwise_as_dot: bool = False):
    """A ``conv_general_dilated`` that uses :func:`conv_as_patches_dot` on small feature maps.

    ``max_output_pixels=None``: where the input or output map has fewer pixels than the kernel
    window (XLA's operand-swap condition, which the forward or the input gradient would meet);
    otherwise: every convolution with at most that many output pixels. ``pointwise_as_dot``:
    1x1 convolutions go through :func:`conv_or_dot` as well.
    """
    fallback = conv_or_dot if pointwise_as_dot else lax.conv_general_dilated

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
        nhwc = dimension_numbers is not None and tuple(
            getattr(dimension_numbers, 'lhs_spec', ())) == (0, 3, 1, 2)
        ones = lambda d: d is None or all(v == 1 for v in d)  # noqa: E731
        if (nhwc and not isinstance(padding, str) and ones(lhs_dilation) and ones(rhs_dilation)
                and feature_group_count == 1 and not kwargs):
            (ph, pw), (sh, sw) = padding, window_strides
            ho = (lhs.shape[1] + sum(ph) - rhs.shape[0]) // sh + 1
            wo = (lhs.shape[2] + sum(pw) - rhs.shape[1]) // sw + 1
            hi, wi = lhs.shape[1], lhs.shape[2]
            kernel_area = rhs.shape[0] * rhs.shape[1]
            if max_output_pixels is None:  # exactly where XLA would swap the operands
                use_dot = kernel_area > 1 and min(hi * wi, ho * wo) < kernel_area
            else:
                use_dot = ho * wo <= max_output_pixels
            if use_dot:
                return conv_as_patches_dot(lhs, rhs, window_strides, padding)
        return fallback(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                        feature_group_count=feature_group_count, precision=precision, **kwargs)
    return conv


#: What ``model.matmul_convs=True`` uses: small-map 3x3 convolutions and 1x1 convolutions as dots.
matmul_conv = make_small_map_conv(None, pointwise_as_dot=True)
