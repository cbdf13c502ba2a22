"""16-bit fixed point as in EIE: weights and activations in Q formats, wide accumulator.

EIE stores its 16 shared weights as 16-bit fixed-point values and multiplies
them with 16-bit fixed-point activations (docs/references.md: 16 bits keep AlexNet's
accuracy, 8 bits do not). Here each array gets its own Q format, the largest
number of fraction bits that still holds its largest magnitude; products are
summed in int64, so the sum itself is exact and the only errors are the two
roundings to 16 bits.
"""

from __future__ import annotations

import math

import numpy as np

from deepshrink.tensor import CompressedTensor

#: Word width of EIE's weights and activations (Han et al., ISCA 2016, section 4).
FIXED_BITS = 16
_INT_MAX = (1 << (FIXED_BITS - 1)) - 1
_INT_MIN = -(1 << (FIXED_BITS - 1))


def fraction_bits(values: np.ndarray, axis: int | None = None) -> int | np.ndarray:
    """Fraction bits of the Q format that fits ``max |values|`` in 16 signed bits.

    Args:
        values: a float array.
        axis: ``None`` for one format for the whole array; else one per slice
            along ``axis`` (one per sample), shaped to broadcast against ``values``.

    Examples:
        >>> fraction_bits(np.array([0.75, -0.1]))  # 0.75 < 2**0: Q0.15
        15
        >>> fraction_bits(np.array([3.0]))  # 3 < 2**2: Q2.13
        13
        >>> fraction_bits(np.array([[3.0, 0.0], [0.5, 0.0]]), axis=0).ravel().tolist()
        [13, 15]
    """
    values = np.asarray(values)
    others = tuple(i for i in range(values.ndim) if axis is None or i != axis % values.ndim)
    peak = np.max(np.abs(values), axis=others, keepdims=axis is not None, initial=0.0)
    _, exponent = np.frexp(peak)  # peak = f * 2**exponent, 0.5 <= f < 1
    frac = np.where((peak == 0.0) | ~np.isfinite(peak), FIXED_BITS - 1, FIXED_BITS - 1 - exponent)
    return int(frac) if axis is None else frac.astype(np.int64)


def to_fixed(values: np.ndarray, axis: int | None = None) -> tuple[np.ndarray, int | np.ndarray]:
    """Round ``values`` to int16 in their own Q format (round half to even, saturating).

    Args:
        values: a float array.
        axis: as in :func:`fraction_bits`: one Q format per slice along it (per
            sample, so a sample's result does not depend on its batch).

    Returns:
        ``(q, frac)``: int16 array with ``values ~= q * 2**-frac``, and ``frac``.

    Examples:
        >>> q, frac = to_fixed(np.array([0.5, -0.25, 0.0], dtype=np.float32))
        >>> q.tolist(), frac
        ([16384, -8192, 0], 15)
    """
    frac = fraction_bits(values, axis)
    scaled = np.rint(np.asarray(values, dtype=np.float64) * np.exp2(frac))
    return np.clip(scaled, _INT_MIN, _INT_MAX).astype(np.int16), frac


def from_fixed(acc: np.ndarray, frac: int | np.ndarray) -> np.ndarray:
    """Wide integer accumulators with ``frac`` fraction bits (a scalar or per sample) back to float32."""
    return (acc.astype(np.float64) * np.exp2(-np.asarray(frac, dtype=np.float64))).astype(np.float32)


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
    # float64 products of integers: exact (|sum| <= cols * 127 * 127 < 2**53) and BLAS-fast, where int64 has no BLAS
    sums = q.astype(np.float64) @ weights.astype(np.float64, copy=False).T
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
    from deepshrink.engine.layouts import int8_values

    rows, cols = tensor.shape[0], math.prod(tensor.shape[1:])
    values, scale, outlier = int8_values(tensor)
    weights = np.zeros(rows * cols, dtype=np.float64)
    weights[tensor.positions] = values[tensor.codes]
    far = outlier[tensor.codes]
    row, col = np.divmod(tensor.positions[far], max(cols, 1))
    return weights.reshape(rows, cols), scale, (row, col, tensor.codebook[tensor.codes[far]])
