"""What a product declared int8 computes: the definition the engine's int8 kernels and PyTorch share.

A tensor declared int8 (``CompressedTensor.arithmetic``) multiplies in int8: each input row (a
token) rounded to int8 on its own scale, the codebook rounded to int8 with one scale for the
layer (its far centroids, :data:`INT8_OUTLIER_FACTOR`, kept in float32), exact integer sums,
then float32 steps in a fixed order. :func:`int8_matmul_reference` is that definition in
NumPy: the engine's C kernels are bit-exact against it, and a PyTorch model computes it for
its declared layers (:mod:`deepshrink.compress.int8`). The engine's ``arithmetic="int8"``
computes the same products on any tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from deepshrink.errors import DeepShrinkError
from deepshrink.tensor import CompressedTensor

#: A centroid beyond this many times the layer's mean weight magnitude is an outlier for int8: its
#: weights are computed in float32 from a short list, so that one far centroid (importance-weighted
#: k-means keeps a few large weights as their own centroid) does not coarsen every other's int8 step.
INT8_OUTLIER_FACTOR = 8.0
#: The most weights (a fraction of the kept ones) the float32 outlier list takes; the largest centroids first.
INT8_OUTLIER_SHARE = 0.01
#: Columns an int8 product takes: its int32 sums hold at most 65,535 columns of 255 x 127.
MAX_INT8_COLUMNS = (1 << 16) - 1


def int8_codebook(codebook: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.float32, np.ndarray]:
    """The centroids rounded to int8 with one scale for the layer, outliers set apart.

    Args:
        codebook: the centroids.
        counts: how many weights use each (default one each).

    Returns:
        ``(values, scale, outlier)``: int8 values (0 for outliers), the float32 scale
        (``max |inlier| / 127``) and which centroids are outliers (see :data:`INT8_OUTLIER_FACTOR`).

    Examples:
        >>> values, scale, outlier = int8_codebook(np.array([0.5, -1.27, 0.0, 90.0], dtype=np.float32), [500, 500, 500, 1])
        >>> values.tolist(), float(scale), outlier.tolist()
        ([50, -127, 0, 0], 0.009999999776482582, [False, False, False, True])
    """
    magnitude = np.abs(codebook).astype(np.float64)
    counts = np.ones(len(codebook)) if counts is None else np.asarray(counts, dtype=np.float64)
    mean = (magnitude * counts).sum() / max(counts.sum(), 1.0)
    order = np.argsort(-magnitude, kind="stable")
    within = np.zeros(len(codebook), dtype=bool)
    within[order[np.cumsum(counts[order]) <= INT8_OUTLIER_SHARE * counts.sum()]] = True
    outlier = within & (magnitude > INT8_OUTLIER_FACTOR * mean)
    peak = np.float32(np.max(magnitude[~outlier], initial=0.0))
    scale = np.float32(peak / np.float32(127) if peak > 0 else 1)
    values = np.where(outlier, 0, np.clip(np.rint(codebook / scale), -127, 127)).astype(np.int8)
    return values, scale, outlier


def int8_values(tensor: CompressedTensor) -> tuple[np.ndarray, np.float32, np.ndarray]:
    """:func:`int8_codebook` of the tensor's codebook, weighted by how many weights use each centroid."""
    return int8_codebook(tensor.codebook, np.bincount(tensor.codes, minlength=len(tensor.codebook)))


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of the float32 ``x`` to int8 on its own: ``q = rint(x * 127 / max|row|)``.

    The engine's int8 products quantize their activations this way (per token, so a
    token's result does not depend on its batch), in these float32 operations.

    Returns:
        ``(q, scale)``: int32 array in [-127, 127] and the float32 scale of each row, ``x ~= q * scale``;
        a row holding a NaN or an infinity gets zeros and scale NaN.

    Examples:
        >>> q, s = quantize_int8(np.array([[0.5, -1.0, 0.25]], dtype=np.float32))
        >>> q.tolist(), s.tolist()
        ([[64, -127, 32]], [0.007874015718698502])
    """
    finite = np.isfinite(x).all(axis=-1)
    peak = np.max(np.abs(np.where(finite[..., None], x, 0)), axis=-1, initial=np.float32(0)).astype(np.float32)
    some = peak > 0
    inverse = np.divide(np.float32(127), peak, out=np.zeros_like(peak), where=some)
    scale = np.divide(peak, np.float32(127), out=np.zeros_like(peak), where=some)
    scale[~finite] = np.nan  # a NaN or an infinity: the row's products are NaN, as in float32
    q = np.clip(np.rint(np.where(finite[..., None], x, 0) * inverse[..., None]), -127, 127).astype(np.int32)
    return q, scale


def int8_matmul_reference(
    x: np.ndarray,
    weights: np.ndarray,
    scale: np.float32,
    bias: np.ndarray,
    outliers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """``x @ W.T + bias`` as the engine's int8 products compute it: their NumPy reference.

    Args:
        x: ``(batch, cols)`` float32.
        weights: ``(rows, cols)`` integers in [-127, 127]; ``W = weights * scale`` plus the outliers.
        scale: the weights' float32 scale.
        bias: ``(rows,)`` float32.
        outliers: ``(rows, cols, values)`` of the weights kept in float32, in row-major order.

    Returns:
        ``(batch, rows)`` float32: exact integer sums, then one float32 multiply and one add,
        then each outlier's product added in order.
    """
    q, token_scale = quantize_int8(x)
    # float64 products of integers: exact (|sum| <= cols * 127 * 127 < 2**53) and BLAS-fast, where int64 has no BLAS;
    # torch's, on its own threads: NumPy's BLAS threads, spinning beside torch's, made a declared MiniLM's torch ops
    # 5-10x slower (5 ms a LayerNorm of 17 tokens)
    sums = (torch.from_numpy(q.astype(np.float64)) @ torch.from_numpy(weights.astype(np.float64, copy=False)).T).numpy()
    out = sums.astype(np.float32) * (token_scale * np.float32(scale))[:, None] + bias
    for row, col, value in zip(*(outliers or ((), (), ()))):
        out[:, row] = out[:, row] + x[:, col] * np.float32(value)
    return out


def int8_weights(tensor: CompressedTensor) -> tuple[np.ndarray, np.float32, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The int8 weights of ``tensor``'s int8 products, for :func:`int8_matmul_reference`.

    Returns:
        ``(weights, scale, outliers)``: the ``(rows, cols)`` int8 values as float64 (pruned ones 0),
        the float32 scale, and the weights kept in float32 as ``(rows, cols, values)`` in row-major order.

    Examples:
        >>> t = CompressedTensor((2, 2), np.array([0, 3]), np.array([1, 0]), np.array([0.5, -1.0]), 1)
        >>> weights, scale, outliers = int8_weights(t)
        >>> weights.tolist(), float(scale)
        ([[-127.0, 0.0], [0.0, 64.0]], 0.007874015718698502)
    """
    rows, cols = tensor.shape[0], math.prod(tensor.shape[1:])
    values, scale, outlier = int8_values(tensor)
    weights = np.zeros(rows * cols, dtype=np.float64)
    weights[tensor.positions] = values[tensor.codes]
    far = outlier[tensor.codes]
    row, col = np.divmod(tensor.positions[far], max(cols, 1))
    return weights.reshape(rows, cols), scale, (row, col, tensor.codebook[tensor.codes[far]])


def pad_amounts(
    padding: int | tuple[int, int] | str, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``F.pad``'s ``(left, right, top, bottom)`` for ``nn.Conv2d``'s ``padding``.

    ``"same"`` pads ``dilation * (kernel - 1)`` per axis, the odd one on the right /
    bottom, as PyTorch does.

    Examples:
        >>> pad_amounts("same", (4, 3), (1, 1), (1, 2)), pad_amounts((1, 2), (3, 3), (2, 2), (1, 1))
        ((2, 2, 1, 2), (2, 2, 1, 1))
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise DeepShrinkError(f"padding='same' needs stride 1, got stride={stride}")
        total_h, total_w = (d * (k - 1) for k, d in zip(kernel, dilation))
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    if isinstance(padding, str):
        raise DeepShrinkError(f"padding={padding!r} is not 'same', 'valid' or a number")
    pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
    return (pad_w, pad_w, pad_h, pad_h)


def taps_first(weight: CompressedTensor) -> CompressedTensor:
    """An ``(out, in, kh, kw)`` weight as the ``(out, kh * kw * in)`` matrix of a channels-last patch's order.

    Column ``(i * kw + j) * in + c`` holds tap ``(i, j)`` of channel ``c``: the order of
    the engine's channels-last patches (``nhwc_patches``). Same codes and codebook, moved.
    """
    out, channels, kh, kw = weight.shape
    row, rest = np.divmod(weight.positions, channels * kh * kw)
    channel, tap = np.divmod(rest, kh * kw)
    return moved(weight, (out, kh * kw * channels), (row * (kh * kw) + tap) * channels + channel)


def as_conv2d(weight: CompressedTensor) -> CompressedTensor:
    """An ``(out, in, k)`` ``nn.Conv1d`` weight as the ``(out, in, 1, k)`` weight of the 1-row 2-D convolution it is."""
    out, channels, k = weight.shape
    return CompressedTensor((out, channels, 1, k), weight.positions, weight.codes, weight.codebook, weight.bits,
                            weight.arithmetic)  # fmt: skip


def moved(weight: CompressedTensor, shape: tuple[int, ...], positions: np.ndarray) -> CompressedTensor:
    """``weight``'s codes at new ``positions`` (the same weights, reshaped and reordered)."""
    order = np.argsort(positions, kind="stable")
    return CompressedTensor(shape, positions[order], weight.codes[order], weight.codebook, weight.bits,
                            weight.arithmetic)  # fmt: skip


def int8_conv2d_reference(
    x: np.ndarray,
    weights: np.ndarray,
    scale: np.float32,
    bias: np.ndarray,
    outliers: tuple[np.ndarray, np.ndarray, np.ndarray],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: tuple[int, int],
) -> np.ndarray:
    """A convolution (``groups=1``, zero padding) as the engine's int8 kernels compute it: its NumPy reference.

    One int8 product (:func:`int8_matmul_reference`) of the patches, each output position a token,
    a patch tap by tap as the engine gathers it: so quantized on its own, and its outliers added in
    the engine's order.

    Args:
        x: ``(batch, channels, H, W)`` float32.
        weights, scale, outliers: :func:`int8_weights` of the weight's :func:`taps_first` matrix.
        bias: ``(out,)`` float32.
        kernel, stride, padding, dilation: as ``nn.Conv2d``'s (pairs; ``padding`` also ``"same"`` / ``"valid"``).

    Returns:
        ``(batch, out, out_h, out_w)`` float32.
    """
    (kh, kw), channels = kernel, x.shape[1]
    image = F.pad(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), pad_amounts(padding, kernel, stride, dilation)
    )
    columns = F.unfold(image, kernel, dilation=dilation, stride=stride)  # (batch, channels * taps, positions)
    batch, _, positions = columns.shape
    patches = columns.reshape(batch, channels, kh * kw, positions).permute(0, 3, 2, 1).reshape(-1, kh * kw * channels)
    rows = int8_matmul_reference(patches.contiguous().numpy(), weights, scale, bias, outliers)
    out_h = (image.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (image.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return np.ascontiguousarray(rows.reshape(batch, out_h, out_w, -1).transpose(0, 3, 1, 2))
