"""numba kernels of the coding domain: bit packing, prefix-code decoding, Huffman depths, varints,
and relative indices, bitmaps or holes to positions.

Each kernel assumes validated input (the public wrappers in ``huffman.py`` and
``ans.py`` check it) *except* for the bytes it decodes: those may come from a
damaged file, so every read is bounds-checked and a problem is returned as a
status code, never a crash or an out-of-bounds read. Indices are ``int64``.

Bit order everywhere is most-significant bit first, as canonical prefix codes are
written.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Status codes returned by the decoders (the wrappers turn them into FileFormatError).
OK = 0
INVALID_CODE = 1  # a bit pattern that is no codeword of the table
TRUNCATED = 2  # the stream ends before the promised number of symbols


@njit(cache=True)
def pack_prefix_codes(symbols: np.ndarray, codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.int64]:
    """Concatenate ``codes[s]`` (``lengths[s]`` bits, MSB first) for every symbol.

    Args:
        symbols: ``(n,)`` unsigned symbols, each ``< len(codes)`` with a non-zero length.
        codes: ``(k,)`` int64 codewords.
        lengths: ``(k,)`` uint8 codeword lengths, at most 16.

    Returns:
        ``(payload, n_bits)``: bytes, the last one zero-padded, and the exact bit count.
    """
    n = symbols.shape[0]
    total = np.int64(0)
    for i in range(n):
        total += np.int64(lengths[symbols[i]])
    out = np.zeros((total + 7) // 8, dtype=np.uint8)
    acc = np.int64(0)  # at most 7 pending bits plus one 16-bit code: fits easily
    pending = np.int64(0)
    j = np.int64(0)
    for i in range(n):
        s = symbols[i]
        length = np.int64(lengths[s])
        acc = ((acc << length) | codes[s]) & 0xFFFFFF
        pending += length
        while pending >= 8:
            pending -= 8
            out[j] = (acc >> pending) & 0xFF
            j += 1
    if pending > 0:
        out[j] = (acc << (8 - pending)) & 0xFF
    return out, total


@njit(cache=True)
def decode_prefix_codes(
    payload: np.ndarray, out: np.ndarray, table_symbol: np.ndarray, table_length: np.ndarray, max_length: np.int64
) -> tuple[np.int64, np.int64]:
    """Decode ``len(out)`` symbols into ``out`` with a lookup table indexed by the next ``max_length`` bits.

    Args:
        payload: uint8 bit stream (possibly damaged).
        out: ``(n,)`` array receiving the symbols (uint8 or uint16, wide enough for the table's).
        table_symbol: ``(2**max_length,)`` uint16 symbol of each bit pattern.
        table_length: ``(2**max_length,)`` uint8 codeword length; 0 marks no codeword.
        max_length: longest codeword, 1..16.

    Returns:
        ``(status, bits_used)`` with ``status`` one of OK, INVALID_CODE,
        TRUNCATED (then ``out`` is partly filled).
    """
    size = np.int64(payload.shape[0])
    n_bits = size * 8
    mask = (np.int64(1) << max_length) - 1
    pos = np.int64(0)
    for i in range(out.shape[0]):
        byte = pos >> 3
        window = np.int64(0)  # 24 bits cover 7 bits of offset plus a 16-bit codeword
        for b in range(3):
            window <<= 8
            if byte + b < size:
                window |= np.int64(payload[byte + b])
        pattern = (window >> (24 - (pos & 7) - max_length)) & mask
        length = np.int64(table_length[pattern])
        if length == 0:
            return np.int64(INVALID_CODE), pos
        pos += length
        if pos > n_bits:
            return np.int64(TRUNCATED), pos
        out[i] = table_symbol[pattern]
    return np.int64(OK), pos


@njit(cache=True)
def huffman_depths(weights: np.ndarray) -> np.ndarray:
    """Depth of each leaf in a Huffman tree over ascending ``weights`` (two-queue method).

    Args:
        weights: ``(m,)`` int64, sorted ascending, ``m >= 2``.

    Returns:
        ``(m,)`` int64 depths (code lengths), unlimited.
    """
    m = weights.shape[0]
    parent = np.empty(2 * m - 1, dtype=np.int64)
    merged = np.empty(m - 1, dtype=np.int64)  # weights of the internal nodes, created in order
    leaf = np.int64(0)
    head = np.int64(0)
    for k in range(m - 1):
        total = np.int64(0)
        for _ in range(2):
            # Prefer the leaf on ties: it keeps the tree shallower.
            if leaf < m and (head >= k or weights[leaf] <= merged[head]):
                parent[leaf] = m + k
                total += weights[leaf]
                leaf += 1
            else:
                parent[m + head] = m + k
                total += merged[head]
                head += 1
        merged[k] = total
    depth = np.zeros(2 * m - 1, dtype=np.int64)
    for node in range(2 * m - 3, -1, -1):  # the root (2m-2) is last; parents come after children
        depth[node] = depth[parent[node]] + 1
    return depth[:m]


@njit(cache=True)
def encode_varints(values: np.ndarray) -> np.ndarray:
    """LEB128: 7 bits per byte, low group first, high bit set on all but the last byte.

    Args:
        values: ``(k,)`` non-negative int64.
    """
    out = np.empty(values.shape[0] * 10, dtype=np.uint8)
    j = np.int64(0)
    for i in range(values.shape[0]):
        v = values[i]
        while v >= 0x80:
            out[j] = (v & 0x7F) | 0x80
            v >>= 7
            j += 1
        out[j] = v
        j += 1
    return out[:j]


@njit(cache=True)
def decode_varints(data: np.ndarray, k: np.int64, max_value: np.int64) -> tuple[np.ndarray, np.int64]:
    """Read ``k`` LEB128 values from the start of ``data``.

    Returns:
        ``(values, bytes_used)``; ``bytes_used`` is -1 when ``data`` ends early or a
        value exceeds ``max_value``.
    """
    out = np.zeros(k, dtype=np.int64)
    size = np.int64(data.shape[0])
    j = np.int64(0)
    for i in range(k):
        v = np.int64(0)
        shift = np.int64(0)
        while True:
            if j >= size or shift > 56:
                return out, np.int64(-1)
            b = np.int64(data[j])
            j += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if v > max_value:
            return out, np.int64(-1)
        out[i] = v
    return out, j


@njit(cache=True)
def relative_count(stream: np.ndarray, escape: np.int64) -> np.int64:
    """Positions a relative-index stream holds: its symbols other than ``escape``."""
    kept = np.int64(0)
    for i in range(stream.shape[0]):
        kept += np.int64(stream[i]) != escape
    return kept


@njit(cache=True)
def relative_positions(stream: np.ndarray, escape: np.int64) -> np.ndarray:
    """Flat positions of a relative-index stream (see ``relative.py``), with no temporary arrays.

    Args:
        stream: ``(n,)`` unsigned gaps, each ``<= escape``; ``escape`` means "skip ``escape``, no weight".

    Returns:
        ``(kept,)`` int64 positions, strictly increasing.
    """
    out = np.empty(relative_count(stream, escape), dtype=np.int64)
    position = np.int64(-1)
    j = np.int64(0)
    for i in range(stream.shape[0]):
        gap = np.int64(stream[i])
        if gap == escape:
            position += escape
        else:
            position += gap + 1
            out[j] = position
            j += 1
    return out


@njit(cache=True)
def complement_positions(holes: np.ndarray, numel: np.int64) -> np.ndarray:
    """The positions ``0..numel-1`` not in ``holes`` (strictly increasing, each ``< numel``), in one pass."""
    out = np.empty(numel - holes.shape[0], dtype=np.int64)
    h = np.int64(0)
    j = np.int64(0)
    for position in range(numel):
        if h < holes.shape[0] and holes[h] == position:
            h += 1
        else:
            out[j] = position
            j += 1
    return out


@njit(cache=True)
def bitmap_count(nibbles: np.ndarray) -> np.int64:
    """Set bits in a bitmap cut into 4-bit symbols."""
    kept = np.int64(0)
    for i in range(nibbles.shape[0]):
        v = np.int64(nibbles[i])
        kept += (v & 1) + ((v >> 1) & 1) + ((v >> 2) & 1) + ((v >> 3) & 1)
    return kept


@njit(cache=True)
def bitmap_positions(nibbles: np.ndarray, numel: np.int64, kept: np.int64) -> tuple[np.ndarray, np.int64]:
    """Flat positions of a bitmap cut into MSB-first 4-bit symbols, with no unpacked bit array.

    Args:
        nibbles: ``(ceil(numel / 4),)`` unsigned symbols, each ``< 16``.
        numel: the bitmap's length; bits past it must be 0.
        kept: :func:`bitmap_count` of ``nibbles`` (counted first, so the caller can check it).

    Returns:
        ``(positions, status)``: int64 positions and OK, or INVALID_CODE when a bit past ``numel`` is set.
    """
    out = np.empty(kept, dtype=np.int64)
    j = np.int64(0)
    for i in range(nibbles.shape[0]):
        v = np.int64(nibbles[i])
        for b in range(4):
            if (v >> (3 - b)) & 1:
                position = 4 * i + b
                if position >= numel:
                    return out[:j], np.int64(INVALID_CODE)
                out[j] = position
                j += 1
    return out, np.int64(OK)
