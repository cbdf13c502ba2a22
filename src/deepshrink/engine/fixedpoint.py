"""16-bit fixed point as in EIE: weights and activations in Q formats, wide accumulator.

EIE stores its 16 shared weights as 16-bit fixed-point values and multiplies
them with 16-bit fixed-point activations (docs/references.md: 16 bits keep AlexNet's
accuracy, 8 bits do not). Here each array gets its own Q format, the largest
number of fraction bits that still holds its largest magnitude; products are
summed in int64, so the sum itself is exact and the only errors are the two
roundings to 16 bits.
"""

from __future__ import annotations

import numpy as np

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
