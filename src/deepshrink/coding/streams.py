"""One coded symbol stream: fixed width, canonical Huffman, or ANS, with its table.

A stream is ``table`` bytes followed by ``payload`` bytes. The table is empty for
fixed width, the code lengths as nibbles for Huffman, the frequencies as LEB128
varints for ANS. :func:`encode_stream` keeps the user's coder unless plain
fixed-width packing is smaller (a tiny layer's table can outweigh its gain), as
deflate falls back to stored blocks.

A decoder trusts no count: a stream may hold at most
``MAX_SYMBOLS_PER_BYTE * bytes + SYMBOL_SLACK`` symbols, and every symbol and
decode table is charged to the file's :class:`~deepshrink.coding.budget.DecodeBudget`
before it is allocated, so no count can make it allocate more than the budget.

Examples:
    >>> s = encode_stream(np.array([0, 0, 1, 0, 3, 0, 0, 0]), "huffman", width=2)
    >>> s.coder, s.n, decode_stream(s.coder, s.n, s.k, s.table_size, s.data).tolist()
    ('none', 8, [0, 0, 1, 0, 3, 0, 0, 0])
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deepshrink.coding import kernels
from deepshrink.coding.ans import ans_frequencies, decode_ans, encode_ans
from deepshrink.coding.budget import DecodeBudget
from deepshrink.coding.huffman import (
    MAX_HUFFMAN_LENGTH,
    decode_table,
    decode_with_table,
    encode_prefix,
    fixed_lengths,
    huffman_lengths,
    pack_lengths,
    unpack_lengths,
)
from deepshrink.errors import DeepShrinkError, FileFormatError

CODERS = ("none", "huffman", "ans")
MAX_ALPHABET = 1 << 16
MAX_SYMBOLS_PER_BYTE = 64  # no stream is denser than 1/8 bit a symbol; ANS is never chosen when it would be
SYMBOL_SLACK = 64  # room for streams of a few symbols whose payload rounds to zero bytes


@dataclass(frozen=True)
class EncodedStream:
    """A coded stream ready to be written.

    Attributes:
        coder: one of :data:`CODERS`.
        n: number of symbols.
        k: alphabet size (``2**width`` for fixed width).
        table: the code table bytes.
        payload: the coded symbols.
    """

    coder: str
    n: int
    k: int
    table: bytes
    payload: bytes

    @property
    def table_size(self) -> int:
        return len(self.table)

    @property
    def data(self) -> bytes:
        return self.table + self.payload

    @property
    def nbytes(self) -> int:
        return len(self.table) + len(self.payload)


def check_coder(coder: object) -> str:
    """Validate a coder name.

    Raises:
        DeepShrinkError: naming the allowed values.
    """
    if coder not in CODERS:
        raise DeepShrinkError(f"coder={coder!r} must be one of {', '.join(map(repr, CODERS))}")
    return str(coder)


def symbol_limit(n_bytes: int) -> int:
    """Most symbols a stream of ``n_bytes`` bytes may claim."""
    return MAX_SYMBOLS_PER_BYTE * n_bytes + SYMBOL_SLACK


def encode_with(symbols: np.ndarray, coder: str, width: int) -> EncodedStream | None:
    """Encode with exactly ``coder``, or return None where it does not apply.

    Args:
        symbols: unsigned symbols, each ``< 2**width``.
        coder: one of :data:`CODERS`.
        width: fixed-width bits of a symbol (1..16).

    Returns:
        The stream, or None (Huffman with more than ``2**15`` distinct symbols,
        ANS denser than :data:`MAX_SYMBOLS_PER_BYTE`).
    """
    symbols = np.ascontiguousarray(symbols)
    if coder == "none":
        payload, _ = encode_prefix(symbols, fixed_lengths(width))
        return EncodedStream("none", symbols.size, 1 << width, b"", payload.tobytes())
    if not symbols.size:
        return None  # nothing to model; fixed width stores an empty stream for free
    counts = np.bincount(symbols)
    if coder == "huffman":
        if np.count_nonzero(counts) > 1 << MAX_HUFFMAN_LENGTH:
            return None
        lengths = huffman_lengths(counts)
        payload, _ = encode_prefix(symbols, lengths)
        return EncodedStream("huffman", symbols.size, counts.size, pack_lengths(lengths).tobytes(), payload.tobytes())
    freqs = ans_frequencies(counts)
    stream = EncodedStream(
        "ans", symbols.size, counts.size, kernels.encode_varints(freqs).tobytes(), encode_ans(symbols, freqs).tobytes()
    )
    return stream if stream.payload and stream.n <= symbol_limit(stream.nbytes) else None


def encode_stream(symbols: np.ndarray, coder: str, width: int) -> EncodedStream:
    """Encode with ``coder``, falling back to fixed width when that is no larger.

    Where ANS does not apply (a stream denser than the reader accepts, or one
    whose payload would be empty), Huffman is tried in its place.
    """
    raw = encode_with(symbols, "none", width)
    coded = encode_with(symbols, check_coder(coder), width) if coder != "none" else None
    if coded is None and coder == "ans":
        coded = encode_with(symbols, "huffman", width)
    return coded if coded is not None and coded.nbytes < raw.nbytes else raw


class _TableCache:
    """Prefix-code decode tables by coder and stored table: each built once, however many streams share it.

    A fixed-width 16-bit table has 65,536 entries; 20,000 tensors that each
    carry one would otherwise rebuild it 20,000 times. The most recent
    :data:`TABLE_CACHE_SIZE` tables are kept (at most ~200 KB each).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._tables: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, lengths: Callable[[], np.ndarray], budget: DecodeBudget) -> tuple:
        """The table of ``key``, built from ``lengths()`` (charged to ``budget``) if not kept."""
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                return table
        code_lengths = lengths()
        budget.charge(1 << int(code_lengths.max(initial=0)), "a decode table")
        table = decode_table(code_lengths)
        with self._lock:
            self._tables[key] = table
            while len(self._tables) > self.size:
                self._tables.popitem(last=False)
        return table


TABLE_CACHE_SIZE = 64
_TABLES = _TableCache(TABLE_CACHE_SIZE)


def symbol_dtype(k: int) -> type:
    """The smallest unsigned dtype of the symbols of an alphabet of ``k``."""
    return np.uint8 if k <= 256 else np.uint16


def decode_stream(
    coder: str, n: int, k: int, table_size: int, data: bytes | np.ndarray, budget: DecodeBudget | None = None
) -> np.ndarray:
    """Decode a stream written by :func:`encode_stream` (validating everything).

    Args:
        coder, n, k, table_size: as recorded in the file header.
        data: the stream's bytes (table then payload).
        budget: what the whole file may still allocate; the ``n`` symbols and
            any decode table are charged before they are made. Default: a fresh
            :class:`DecodeBudget`.

    Returns:
        ``(n,)`` symbols, uint8 for an alphabet of at most 256, else uint16.

    Raises:
        FileFormatError: an unknown coder, counts that the bytes cannot hold, a
            table of the wrong size, a damaged payload, or the budget exceeded.
    """
    budget = budget if budget is not None else DecodeBudget()
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if coder not in CODERS:
        raise FileFormatError(f"unknown coder {coder!r}; this version reads {', '.join(CODERS)}")
    if not 1 <= k <= MAX_ALPHABET or not 0 <= table_size <= data.size:
        raise FileFormatError(f"stream alphabet {k} or table size {table_size} is out of range")
    if n > symbol_limit(data.size):
        raise FileFormatError(f"stream claims {n} symbols but holds only {data.size} bytes")
    budget.charge(n, f"a stream of {n:,} symbols")
    table, payload = data[:table_size], data[table_size:]
    dtype = symbol_dtype(k)
    if coder == "none":
        width = k.bit_length() - 1
        if k != 1 << width or width < 1 or table_size:
            raise FileFormatError(f"fixed-width stream has alphabet {k} (not a power of two) or a table")
        return decode_with_table(payload, n, _TABLES.get(("none", width), lambda: fixed_lengths(width), budget), dtype)
    if coder == "huffman":
        if table_size != (k + 1) // 2:
            raise FileFormatError(f"Huffman table of {k} symbols must be {(k + 1) // 2} bytes, not {table_size}")
        key = ("huffman", k, table.tobytes())
        return decode_with_table(payload, n, _TABLES.get(key, lambda: unpack_lengths(table, k), budget), dtype)
    budget.charge(k, "an ANS table")
    freqs, used = kernels.decode_varints(table, np.int64(k), np.int64(1 << 24))
    if used != table_size or payload.size % 4:
        raise FileFormatError("ANS table or payload has the wrong size")
    return decode_ans(np.frombuffer(payload.tobytes(), dtype="<u4"), n, freqs, dtype)
