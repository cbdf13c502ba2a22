"""Relative (difference) indexing of sparse positions, as in Deep Compression.

A sorted list of flat positions becomes a stream of gaps (the number of zeros
before each kept weight), each stored in ``index_bits`` bits. A gap too large to
fit is bridged with *escape* symbols: the largest symbol ``E = 2**index_bits - 1``
means "skip E positions, no weight here", so real gaps are ``0 .. E - 1``.

Unlike the paper's filler *zero weight*, an escape carries no codebook index, so
it costs only index bits and the codebook need not hold a zero. The number of
escapes for a gap ``g`` is ``g // E``.

Encoding is vectorised NumPy; decoding is one numba pass that allocates only
the positions (a stream from a file may be large: no temporaries of its size).
"""

from __future__ import annotations

import numpy as np

from deepshrink.coding import kernels
from deepshrink.errors import DeepShrinkError

MAX_INDEX_BITS = 16


def _escape(index_bits: int) -> int:
    if not isinstance(index_bits, (int, np.integer)) or not 1 <= index_bits <= MAX_INDEX_BITS:
        raise DeepShrinkError(f"index_bits={index_bits!r} must be an integer in 1..{MAX_INDEX_BITS}")
    return (1 << int(index_bits)) - 1


def _symbol_dtype(index_bits: int) -> type:
    return np.uint8 if index_bits <= 8 else np.uint16


def encode_relative(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Encode sorted flat positions as a gap stream with escapes.

    Args:
        positions: strictly increasing non-negative integers.
        index_bits: bits per stored gap, 1..16.

    Returns:
        The symbol stream (uint8 for <= 8 bits, else uint16); its length is
        ``len(positions)`` plus the number of escapes.

    Examples:
        >>> encode_relative(np.array([0, 2, 20]), 3).tolist()
        [0, 1, 7, 7, 3]
    """
    escape = _escape(index_bits)
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1  # zeros before each kept weight
    if gaps.size and gaps.min() < 0:
        raise DeepShrinkError("positions must be strictly increasing and non-negative")
    n_escapes = gaps // escape
    real_slots = np.cumsum(n_escapes + 1) - 1  # where each real gap lands in the stream
    stream = np.full(int(real_slots[-1]) + 1 if gaps.size else 0, escape, dtype=_symbol_dtype(index_bits))
    stream[real_slots] = gaps % escape
    return stream


def decode_relative(stream: np.ndarray, index_bits: int) -> np.ndarray:
    """Invert :func:`encode_relative`: a gap stream back to flat positions (int64).

    Raises:
        DeepShrinkError: when a symbol does not fit in ``index_bits``.
    """
    escape = _escape(index_bits)
    stream = np.ascontiguousarray(stream)
    if stream.size and int(stream.max()) > escape:
        raise DeepShrinkError(f"relative index {int(stream.max())} does not fit in {index_bits} bits")
    if stream.dtype.kind not in "ui":
        stream = stream.astype(np.int64)
    return kernels.relative_positions(stream, np.int64(escape))  # one pass, no stream-sized temporaries


def count_escapes(positions: np.ndarray, index_bits: int) -> int:
    """Number of escape symbols :func:`encode_relative` would emit (for size accounting)."""
    escape = _escape(index_bits)
    gaps = np.diff(np.asarray(positions, dtype=np.int64), prepend=-1) - 1
    return int((gaps // escape).sum())
