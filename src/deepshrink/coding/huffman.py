"""Canonical Huffman coding (Deep Compression, section 4), and fixed-width packing as its special case.

Only the code *lengths* are stored: the canonical code is rebuilt from them by
sorting symbols by (length, symbol) and handing out consecutive codewords. A
fixed-width code of ``w`` bits is the canonical code in which every one of the
``2**w`` symbols has length ``w`` (codeword = the symbol's binary value), so the
same two kernels pack and unpack both.

Lengths are limited to :data:`MAX_HUFFMAN_LENGTH` so that each fits in a nibble
of the stored table and decoding needs one table of at most ``2**16`` entries.

Examples:
    >>> lengths = huffman_lengths(np.array([5, 1, 1, 0]))
    >>> lengths.tolist()
    [1, 2, 2, 0]
    >>> payload, n_bits = encode_prefix(np.array([0, 1, 0, 2]), lengths)
    >>> n_bits, decode_prefix(payload, 4, lengths).tolist()
    (6, [0, 1, 0, 2])
"""

from __future__ import annotations

import numpy as np

from deepshrink.coding import kernels
from deepshrink.errors import DeepShrinkError, FileFormatError

MAX_HUFFMAN_LENGTH = 15  # one nibble per stored length; 0 = symbol unused
MAX_TABLE_BITS = 16  # longest codeword the decoder accepts (fixed width up to 16 bits)


def huffman_lengths(counts: np.ndarray, max_length: int = MAX_HUFFMAN_LENGTH) -> np.ndarray:
    """Optimal prefix-code lengths for symbol ``counts``, limited to ``max_length`` bits.

    When the optimal tree is too deep, the counts are halved (used symbols keep
    at least 1) and the tree rebuilt: a simple limit that costs a fraction of a
    percent on the skewed streams where it triggers.

    Args:
        counts: ``(k,)`` non-negative occurrence counts.
        max_length: longest allowed code, 1..15.

    Returns:
        ``(k,)`` uint8 lengths, 0 for unused symbols; a single used symbol gets 1.

    Raises:
        DeepShrinkError: more used symbols than ``2**max_length`` codewords.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    if used.size > 1 << max_length:
        raise DeepShrinkError(f"{used.size} distinct symbols do not fit in {max_length}-bit Huffman codes")
    lengths = np.zeros(counts.size, dtype=np.uint8)
    if used.size <= 1:
        lengths[used] = 1
        return lengths
    weights = counts[used]
    while True:  # ends: all-ones weights give a balanced tree of depth ceil(log2(used)) <= max_length
        order = np.argsort(weights, kind="stable")
        depths = kernels.huffman_depths(np.ascontiguousarray(weights[order]))
        if depths.max() <= max_length:
            lengths[used[order]] = depths
            return lengths
        weights = np.maximum(weights >> 1, 1)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codeword of each symbol (int64), 0 where the length is 0.

    Sorted by (length, symbol), codeword ``i`` is the Kraft sum of the earlier
    codewords, read at its own length.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.flatnonzero(lengths)
    codes = np.zeros(lengths.size, dtype=np.int64)
    if not used.size:
        return codes
    top = int(lengths.max())
    order = used[np.argsort(lengths[used], kind="stable")]
    span = np.int64(1) << (top - lengths[order])  # slots of the 2**top table each codeword covers
    starts = np.cumsum(span) - span
    codes[order] = starts >> (top - lengths[order])
    return codes


def decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Lookup table of the canonical code: symbol and length for every ``max_length``-bit pattern.

    Raises:
        FileFormatError: the lengths are over-subscribed (no prefix code has them)
            or longer than 16 bits.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.flatnonzero(lengths)
    if not used.size:
        raise FileFormatError("Huffman table has no symbol")
    top = int(lengths.max())
    if top > MAX_TABLE_BITS:
        raise FileFormatError(f"Huffman code length {top} is over the limit of {MAX_TABLE_BITS}")
    order = used[np.argsort(lengths[used], kind="stable")]
    span = np.int64(1) << (top - lengths[order])
    if int(span.sum()) > 1 << top:
        raise FileFormatError("Huffman code lengths are over-subscribed (not a prefix code)")
    symbols = np.zeros(1 << top, dtype=np.uint16)
    table_lengths = np.zeros(1 << top, dtype=np.uint8)  # unfilled tail (incomplete code) stays 0: invalid
    filled = int(span.sum())
    symbols[:filled] = np.repeat(order, span)
    table_lengths[:filled] = np.repeat(lengths[order], span)
    return symbols, table_lengths, top


def encode_prefix(symbols: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Pack ``symbols`` with the canonical code of ``lengths``.

    Returns:
        ``(payload uint8, n_bits)``.

    Raises:
        DeepShrinkError: a symbol is outside the table or has no codeword.
    """
    symbols = np.ascontiguousarray(symbols)
    lengths = np.ascontiguousarray(lengths, dtype=np.uint8)
    if symbols.size and (int(symbols.max()) >= lengths.size or not lengths[symbols].all()):
        raise DeepShrinkError("a symbol has no codeword in the code table")
    payload, n_bits = kernels.pack_prefix_codes(symbols, canonical_codes(lengths), lengths)
    return payload, int(n_bits)


def decode_prefix(payload: np.ndarray, n: int, lengths: np.ndarray, dtype: type = np.uint16) -> np.ndarray:
    """Decode ``n`` symbols of the canonical code of ``lengths`` (see :func:`decode_with_table`)."""
    return decode_with_table(payload, n, decode_table(lengths) if n else None, dtype)


def decode_with_table(
    payload: np.ndarray, n: int, table: tuple[np.ndarray, np.ndarray, int] | None, dtype: type = np.uint16
) -> np.ndarray:
    """Decode ``n`` symbols with a table from :func:`decode_table` (built once, used for many streams).

    Args:
        payload: the coded bytes.
        n: symbols to decode.
        table: the decode table (unused when ``n == 0``).
        dtype: of the result, wide enough for every symbol of the table.

    Raises:
        FileFormatError: the stream is shorter than ``n`` symbols, holds a bit
            pattern that is no codeword, has bytes left over or padding bits set.
    """
    payload = np.ascontiguousarray(payload, dtype=np.uint8)
    if n == 0:
        if payload.size:
            raise FileFormatError(f"empty stream carries {payload.size} bytes")
        return np.zeros(0, dtype=dtype)
    table_symbol, table_length, top = table
    out = np.empty(n, dtype=dtype)
    status, n_bits = kernels.decode_prefix_codes(payload, out, table_symbol, table_length, np.int64(top))
    if status == kernels.INVALID_CODE:
        raise FileFormatError(f"invalid prefix code at bit {int(n_bits)} of {payload.size * 8}")
    if status == kernels.TRUNCATED:
        raise FileFormatError(f"stream of {payload.size} bytes ends before its {n} symbols")
    if (int(n_bits) + 7) // 8 != payload.size:
        raise FileFormatError(f"stream has {payload.size} bytes but its {n} symbols use {int(n_bits)} bits")
    if payload[-1] & ((1 << (-int(n_bits) % 8)) - 1):
        raise FileFormatError("stream has padding bits set after its last symbol")
    return out


def fixed_lengths(width: int) -> np.ndarray:
    """Code lengths of plain ``width``-bit packing: every one of ``2**width`` symbols gets ``width`` bits."""
    return np.full(1 << width, width, dtype=np.uint8)


def pack_lengths(lengths: np.ndarray) -> np.ndarray:
    """Store code lengths (each <= 15) as nibbles, high nibble first."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    padded = np.zeros(2 * ((lengths.size + 1) // 2), dtype=np.uint8)
    padded[: lengths.size] = lengths
    return (padded[0::2] << 4) | padded[1::2]


def unpack_lengths(data: np.ndarray, k: int) -> np.ndarray:
    """Invert :func:`pack_lengths` for ``k`` symbols (``data`` holds exactly ``ceil(k / 2)`` bytes)."""
    data = np.asarray(data, dtype=np.uint8)
    nibbles = np.empty(2 * data.size, dtype=np.uint8)
    nibbles[0::2] = data >> 4
    nibbles[1::2] = data & 0x0F
    if k % 2 and nibbles[-1]:
        raise FileFormatError("Huffman table has a non-zero padding nibble")
    return nibbles[:k]
