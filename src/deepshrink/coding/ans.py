"""Asymmetric numeral systems (ANS): the coder that comes closer to the entropy than Huffman.

Huffman spends a whole number of bits per symbol; ANS spends ``-log2 p`` on
average, which matters for the skewed index streams of sparse layers. The coder
is ``constriction``'s stack ``AnsCoder`` (Rust, maintained, about 10 ns a symbol)
with an i.i.d. ``Categorical`` model.

The model must be rebuilt bit for bit when decoding, so the stored table is a
list of small integer frequencies (quantized here, deterministically) and both
sides hand exactly those integers, as floats, to ``Categorical(perfect=False)``.
The stream's words are constriction's compressed ``uint32`` words, little-endian.

Examples:
    >>> symbols = np.array([0, 0, 0, 1, 0, 2, 0, 0])
    >>> freqs = ans_frequencies(np.bincount(symbols))
    >>> int(freqs.sum()), decode_ans(encode_ans(symbols, freqs), 8, freqs).tolist()
    (64, [0, 0, 0, 1, 0, 2, 0, 0])
"""

from __future__ import annotations

import constriction
import numpy as np

from deepshrink.errors import DeepShrinkError, FileFormatError

MIN_PRECISION = 6  # frequencies sum to at least 2**6
MAX_TABLE_PRECISION = 14  # finer tables gain < 0.001 bit a symbol on our streams
CHUNK = 1 << 20  # symbols per call into constriction: no int32 copy of a long stream
MAX_PRECISION = 20  # for alphabets of up to 2**19 used symbols; well inside constriction's 24-bit models


def _quantize(counts: np.ndarray, precision: int) -> np.ndarray:
    """Integer frequencies summing to ``2**precision``; used symbols keep at least 1.

    The rounding remainder goes to the most frequent symbol, where it costs least.
    """
    total = 1 << precision
    spare = total - np.count_nonzero(counts)  # shared out in proportion, on top of each used symbol's 1
    freqs = np.where(counts > 0, 1 + counts * spare // int(counts.sum()), 0)
    freqs[np.argmax(counts)] += total - int(freqs.sum())
    return freqs


def ans_frequencies(counts: np.ndarray) -> np.ndarray:
    """Quantize symbol counts to the integer frequency table that stores the stream smallest.

    A finer table models the stream better but costs more varint bytes; for a
    short stream over a large alphabet (a 256-entry codebook, a few thousand
    weights) the table can outweigh the payload, so the precision (sum of the
    frequencies, a power of two up to ``2**MAX_TABLE_PRECISION``) is picked by
    the estimated total size.

    Args:
        counts: ``(k,)`` non-negative counts with at least one non-zero.

    Returns:
        ``(k,)`` int64 frequencies, 0 exactly where the count is 0.

    Raises:
        DeepShrinkError: all counts are zero or too many symbols are used.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = int(np.count_nonzero(counts))
    if used == 0:
        raise DeepShrinkError("cannot build an ANS model for an empty stream")
    lowest = max(MIN_PRECISION, used.bit_length() + 1)
    if lowest > MAX_PRECISION:
        raise DeepShrinkError(f"{used} distinct symbols exceed the ANS table limit of 2**{MAX_PRECISION - 1}")
    best, best_bits = None, np.inf
    for precision in range(lowest, max(lowest, MAX_TABLE_PRECISION) + 1):
        freqs = _quantize(counts, precision)
        live = counts > 0
        payload_bits = float((counts[live] * (precision - np.log2(freqs[live]))).sum())
        table_bits = 8 * float((1 + np.floor(np.log2(np.maximum(freqs, 1)) / 7)).sum())  # LEB128 bytes
        if payload_bits + table_bits < best_bits:
            best, best_bits = freqs, payload_bits + table_bits
    return best


def _model(frequencies: np.ndarray) -> constriction.stream.model.Categorical:
    probabilities = np.zeros(max(2, len(frequencies)))  # constriction rejects a one-symbol alphabet
    probabilities[: len(frequencies)] = frequencies
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def encode_ans(symbols: np.ndarray, frequencies: np.ndarray) -> np.ndarray:
    """Encode ``symbols`` (each with a non-zero frequency) into uint32 words.

    A stream made only of the first used symbol encodes to no words at all
    (constriction's coder starts from state 0, which that symbol leaves at 0);
    :func:`deepshrink.coding.streams.encode_with` stores such a stream another way.

    Raises:
        DeepShrinkError: a symbol has frequency 0 or lies outside the table.
    """
    symbols = np.asarray(symbols)
    frequencies = np.asarray(frequencies)
    if symbols.size and (int(symbols.max()) >= frequencies.size or not frequencies[symbols].all()):
        raise DeepShrinkError("a symbol has no probability in the ANS table")
    model, coder = _model(frequencies), constriction.stream.stack.AnsCoder()
    for start in reversed(range(0, symbols.size, CHUNK)):  # reversed, so decoding runs forward
        coder.encode_reverse(np.ascontiguousarray(symbols[start : start + CHUNK], dtype=np.int32), model)
    return coder.get_compressed().astype("<u4")


def decode_ans(words: np.ndarray, n: int, frequencies: np.ndarray, dtype: type = np.int32) -> np.ndarray:
    """Decode ``n`` symbols from uint32 ``words``, which must hold exactly those symbols.

    constriction's decoder runs on from an empty state, emitting the first used
    symbol for ever, so the end state alone does not show that the words were
    consumed by exactly ``n`` symbols: an empty payload would decode to any
    number of them. The writer never stores an empty payload, and the reader
    refuses one.

    Args:
        words: the payload.
        n: symbols to decode.
        frequencies: the stream's table.
        dtype: of the result, wide enough for ``len(frequencies) - 1``.

    Raises:
        FileFormatError: the table is unusable, the payload is empty, or the
            words are not exactly ``n`` symbols' worth (the coder must end empty).
    """
    if n == 0:
        if len(words):
            raise FileFormatError(f"empty ANS stream carries {len(words)} words")
        return np.zeros(0, dtype=dtype)
    if not len(words):
        raise FileFormatError(f"ANS stream of {n} symbols has no payload (the writer never stores an empty one)")
    frequencies = np.asarray(frequencies, dtype=np.int64)
    if not frequencies.any():
        raise FileFormatError("ANS table has no symbol")
    model = _model(frequencies)
    out = np.empty(n, dtype=dtype)
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        for start in range(0, n, CHUNK):  # a chunk at a time: no int32 copy of the whole stream
            out[start : start + CHUNK] = coder.decode(model, min(CHUNK, n - start))
    except (ValueError, RuntimeError, AssertionError) as err:  # constriction reports bad data this way
        raise FileFormatError(f"ANS stream is damaged: {err}") from err
    if not coder.is_empty():
        raise FileFormatError(f"ANS stream of {len(words)} words does not hold exactly {n} symbols")
    return out
