"""Convolutions as matrix products where XLA:CPU has no fast kernel (model.matmul_convs).

Found by profiling the train step on CPU (docs/benchmarks.md): XLA swaps the operands of a
convolution whose window has more pixels than its input (ResNet-50's 3x3 convolutions on the 2x2
maps of its last stage at 64 px), and the swapped form runs in generic loops; XLA also computes
the weight gradient of a 1x1 convolution as a convolution over the whole map. Written as matrix
products they are 2.5-3.3x faster for ResNet-50 at 64 px on CPU. XLA:CPU also runs each YNNPACK
convolution on one thread; split into batch chunks, the chunks run side by side. Same parameters,
same numbers up to float summation order. Measured on CPU only, hence on by default on the CPU backend only
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


#: XLA:CPU hands a convolution to YNNPACK only when ``max(in, out channels)`` exceeds this and it
#: has no lhs dilation (``IsConvolutionOpSupportedByYnn`` in xla/backends/cpu/ynn_support.cc).
YNN_MAX_SMALL_CHANNELS = 16


def batch_chunked_conv(lhs, rhs, window_strides, padding, chunks: int, **conv_kwargs):
    """``lax.conv_general_dilated`` (NHWC) over ``chunks`` near-equal batch slices, concatenated.

    XLA:CPU runs each YNNPACK convolution on the calling thread only, so one large convolution
    keeps one core busy; independent per-chunk convolutions (forward, input gradients and the
    per-chunk weight gradients, summed by autodiff) are separate ops that the thunk executor
    runs side by side. Each output element is the same sum as lax's; only the weight gradient
    adds ``chunks`` partial sums in another order.
    """
    n = lhs.shape[0]
    bounds = [round(i * n / chunks) for i in range(chunks + 1)]
    ys = [lax.conv_general_dilated(lhs[a:b], rhs, window_strides, padding, **conv_kwargs)
          for a, b in zip(bounds, bounds[1:]) if b > a]
    return jnp.concatenate(ys, axis=0) if len(ys) > 1 else ys[0]


def num_batch_chunks(lhs_shape, rhs_shape, batch_chunks: int, min_chunk: int,
                     all_channels: bool = False) -> int:
    """How many batch chunks :func:`make_small_map_conv` uses for an NHWC/HWIO convolution.

    Only convolutions that go to YNNPACK (``max(in, out) > 16`` channels) with a spatial kernel
    are split (1x1 ones are dots; Eigen's convolutions already use every thread), and never
    into chunks of fewer than ``min_chunk`` images. ``all_channels``: every spatial convolution
    (their weight gradients go to YNNPACK whatever the channels: the batch is their feature axis).
    """
    kh, kw, cin, cout = rhs_shape
    if batch_chunks <= 1 or kh * kw == 1 or (
            max(cin, cout) <= YNN_MAX_SMALL_CHANNELS and not all_channels):
        return 1
    return max(1, min(batch_chunks, lhs_shape[0] // max(1, min_chunk)))


def make_small_map_conv(max_output_pixels: int | None = None, pointwise_as_dot: bool = False,
                        batch_chunks: int = 1, min_chunk: int = 16, all_channels: bool = False):
    """A ``conv_general_dilated`` that uses :func:`conv_as_patches_dot` on small feature maps.

    ``max_output_pixels=None``: where the input or output map has fewer pixels than the kernel
    window (XLA's operand-swap condition, which the forward or the input gradient would meet);
    otherwise: every convolution with at most that many output pixels. ``pointwise_as_dot``:
    1x1 convolutions go through :func:`conv_or_dot` as well. ``batch_chunks`` > 1: the other
    spatial convolutions that XLA:CPU gives to YNNPACK run as that many batch chunks
    (:func:`batch_chunked_conv`, :func:`num_batch_chunks`).
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
            chunks = num_batch_chunks(lhs.shape, rhs.shape, batch_chunks, min_chunk, all_channels)
            if chunks > 1:
                return batch_chunked_conv(lhs, rhs, window_strides, padding, chunks,
                                          dimension_numbers=dimension_numbers,
                                          precision=precision)
        return fallback(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                        feature_group_count=feature_group_count, precision=precision, **kwargs)
    return conv


#: Batch chunks of the YNNPACK-sized spatial convolutions in :data:`matmul_conv` (3: -12% wall for
#: the ResNet-50 64 px LMoE step at B=32 on 2 cores, docs/benchmarks.md, issue 22).
matmul_conv_batch_chunks = 3

#: What ``model.matmul_convs=True`` uses: small-map 3x3 convolutions and 1x1 convolutions as dots,
#: the other spatial convolutions with > 16 channels in batch chunks of >= 16 images.
matmul_conv = make_small_map_conv(None, pointwise_as_dot=True,
                                  batch_chunks=matmul_conv_batch_chunks)
