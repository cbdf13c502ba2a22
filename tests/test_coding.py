"""Coders against plain references: Huffman, canonical codes, bit packing, varints, ANS, streams."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepshrink.coding import kernels
from deepshrink.coding.ans import ans_frequencies, decode_ans, encode_ans
from deepshrink.coding.budget import DecodeBudget
from deepshrink.coding.huffman import (
    MAX_HUFFMAN_LENGTH,
    canonical_codes,
    decode_prefix,
    decode_table,
    encode_prefix,
    fixed_lengths,
    huffman_lengths,
    pack_lengths,
    unpack_lengths,
)
from deepshrink.coding.streams import CODERS, decode_stream, encode_stream, encode_with, symbol_limit
from deepshrink.errors import DeepShrinkError, FileFormatError


def reference_huffman_cost(counts: np.ndarray) -> int:
    """Total bits of an optimal prefix code, by the textbook heap construction."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged  # every merge adds one bit to each symbol below it
        heapq.heappush(heap, merged)
    return cost


def reference_canonical(lengths: list[int]) -> dict[int, str]:
    """RFC 1951 section 3.2.2, written out."""
    max_len = max(lengths)
    bl_count = [0] * (max_len + 1)
    for length in lengths:
        if length:
            bl_count[length] += 1
    code, next_code = 0, [0] * (max_len + 1)
    for bits in range(1, max_len + 1):
        code = (code + bl_count[bits - 1]) << 1 if bits > 1 else 0
        next_code[bits] = code
    out = {}
    for symbol, length in enumerate(lengths):
        if length:
            out[symbol] = format(next_code[length], f"0{length}b")
            next_code[length] += 1
    return out


def reference_pack(symbols: np.ndarray, words: dict[int, str]) -> bytes:
    bits = "".join(words[int(s)] for s in symbols)
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


def kraft(lengths: np.ndarray) -> float:
    used = lengths[lengths > 0].astype(float)
    return float((2.0**-used).sum())


@pytest.mark.parametrize("k", [2, 3, 7, 32, 300])
@pytest.mark.parametrize("seed", [0, 1])
def test_huffman_lengths_are_optimal(k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 1000, size=k) * (rng.random(k) < 0.8)
    counts[0] = max(counts[0], 1)
    counts[-1] = max(counts[-1], 1)
    lengths = huffman_lengths(counts)
    assert int((counts * lengths).sum()) == reference_huffman_cost(counts)
    assert ((lengths > 0) == (counts > 0)).all()
    assert kraft(lengths) == pytest.approx(1.0)


def test_huffman_single_symbol_and_empty() -> None:
    assert huffman_lengths(np.array([0, 9, 0])).tolist() == [0, 1, 0]
    assert huffman_lengths(np.zeros(4, dtype=int)).tolist() == [0, 0, 0, 0]


def test_huffman_length_limit_holds_on_fibonacci_counts() -> None:
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)  # the optimal tree is 39 deep
    lengths = huffman_lengths(counts)
    assert lengths.max() <= MAX_HUFFMAN_LENGTH and kraft(lengths) <= 1.0
    symbols = np.repeat(np.arange(40), 3).astype(np.uint16)
    payload, _ = encode_prefix(symbols, lengths)
    assert (decode_prefix(payload, symbols.size, lengths) == symbols).all()


def test_too_many_symbols_for_huffman() -> None:
    with pytest.raises(DeepShrinkError, match="do not fit"):
        huffman_lengths(np.ones(5), max_length=2)


@pytest.mark.parametrize("seed", range(4))
def test_canonical_codes_match_rfc1951(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=rng.integers(2, 40))
    counts[:2] += 1
    lengths = huffman_lengths(counts)
    expected = reference_canonical(lengths.tolist())
    codes = canonical_codes(lengths)
    got = {s: format(int(codes[s]), f"0{int(lengths[s])}b") for s in expected}
    assert got == expected


@pytest.mark.parametrize("n", [0, 1, 7, 8, 1000])
def test_pack_matches_reference_and_roundtrips(n: int) -> None:
    rng = np.random.default_rng(n)
    counts = np.array([50, 20, 10, 5, 1, 1])
    lengths = huffman_lengths(counts)
    symbols = rng.choice(6, size=n, p=counts / counts.sum()).astype(np.uint8)
    payload, n_bits = encode_prefix(symbols, lengths)
    assert payload.tobytes() == reference_pack(symbols, reference_canonical(lengths.tolist()))
    assert n_bits == int(lengths[symbols].sum())
    assert (decode_prefix(payload, n, lengths) == symbols).all()


@pytest.mark.parametrize("width", [1, 3, 8, 16])
def test_fixed_width_is_plain_binary(width: int) -> None:
    rng = np.random.default_rng(width)
    symbols = rng.integers(0, 1 << width, size=101).astype(np.uint16)
    payload, n_bits = encode_prefix(symbols, fixed_lengths(width))
    assert n_bits == 101 * width
    assert payload.tobytes() == reference_pack(symbols, {int(s): format(int(s), f"0{width}b") for s in symbols})
    assert (decode_prefix(payload, 101, fixed_lengths(width)) == symbols).all()


def test_decode_prefix_rejects_damage() -> None:
    lengths = np.array([1, 2, 2], dtype=np.uint8)
    payload, _ = encode_prefix(np.array([0, 1, 2, 0, 0, 1], dtype=np.uint8), lengths)
    with pytest.raises(FileFormatError, match="ends before"):
        decode_prefix(payload, 50, lengths)
    with pytest.raises(FileFormatError, match="left over|bits"):
        decode_prefix(np.concatenate([payload, [0]]), 6, lengths)
    incomplete = np.array([2, 2, 0], dtype=np.uint8)  # codewords 00, 01; 1x is no codeword
    with pytest.raises(FileFormatError, match="invalid prefix code"):
        decode_prefix(np.array([0xFF], dtype=np.uint8), 2, incomplete)
    with pytest.raises(FileFormatError, match="over-subscribed"):
        decode_prefix(payload, 6, np.array([1, 1, 1], dtype=np.uint8))


def test_nibble_tables_roundtrip() -> None:
    lengths = np.array([0, 15, 3, 7, 1], dtype=np.uint8)
    packed = pack_lengths(lengths)
    assert packed.tolist() == [0x0F, 0x37, 0x10]
    assert unpack_lengths(packed, 5).tolist() == lengths.tolist()
    with pytest.raises(FileFormatError, match="padding"):
        unpack_lengths(np.array([0x0F, 0x37, 0x11], dtype=np.uint8), 5)


def reference_leb128(values: list[int]) -> bytes:
    out = bytearray()
    for v in values:
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


@pytest.mark.parametrize("values", [[], [0], [127, 128, 16383, 16384, 2**24]])
def test_varints_match_leb128(values: list[int]) -> None:
    encoded = kernels.encode_varints(np.array(values, dtype=np.int64))
    assert encoded.tobytes() == reference_leb128(values)
    decoded, used = kernels.decode_varints(encoded, np.int64(len(values)), np.int64(1 << 24))
    assert decoded.tolist() == values and used == len(encoded)
    if values:
        assert kernels.decode_varints(encoded[:-1], np.int64(len(values)), np.int64(1 << 24))[1] == -1
        assert kernels.decode_varints(encoded, np.int64(len(values)), np.int64(max(values) - 1))[1] == -1


def test_huffman_depths_against_reference() -> None:
    weights = np.array([1, 1, 2, 3, 5, 8], dtype=np.int64)
    depths = kernels.huffman_depths(weights)
    assert int((weights * depths).sum()) == reference_huffman_cost(weights)


def entropy_bits(symbols: np.ndarray) -> float:
    p = np.bincount(symbols) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * symbols.size)


def test_ans_comes_closer_to_entropy_than_huffman() -> None:
    rng = np.random.default_rng(0)
    symbols = rng.choice(4, size=200_000, p=[0.9, 0.06, 0.03, 0.01]).astype(np.uint8)
    freqs = ans_frequencies(np.bincount(symbols))
    words = encode_ans(symbols, freqs)
    assert (decode_ans(words, symbols.size, freqs) == symbols).all()
    ans_bits = words.size * 32
    huffman_bits = encode_prefix(symbols, huffman_lengths(np.bincount(symbols)))[1]
    assert ans_bits < 1.01 * entropy_bits(symbols) + 64
    assert ans_bits < 0.9 * huffman_bits  # Huffman spends at least a bit on the 90% symbol


def test_ans_rejects_damage() -> None:
    symbols = np.array([0, 1, 1, 2, 0, 0], dtype=np.uint8)
    freqs = ans_frequencies(np.bincount(symbols))
    words = encode_ans(symbols, freqs)
    with pytest.raises(FileFormatError):
        decode_ans(np.concatenate([words, words]), 6, freqs)
    with pytest.raises(FileFormatError, match="no symbol"):
        decode_ans(words, 6, np.zeros(3, dtype=np.int64))
    with pytest.raises(DeepShrinkError, match="no probability"):
        encode_ans(np.array([3]), freqs)
    assert ans_frequencies(np.array([5, 0, 1])).tolist()[1] == 0


def test_stream_falls_back_to_fixed_width_when_smaller() -> None:
    tiny = np.array([1, 0, 2], dtype=np.uint8)
    assert encode_stream(tiny, "huffman", 2).coder == "none"
    skewed = np.zeros(5000, dtype=np.uint8)
    skewed[::50] = 3
    assert encode_stream(skewed, "huffman", 5).coder == "huffman"
    assert encode_stream(skewed, "ans", 5).coder == "ans"


def test_ans_never_denser_than_the_reader_allows() -> None:
    constant = np.zeros(100_000, dtype=np.uint8)  # ANS would code this in a few bytes
    assert encode_with(constant, "ans", 4) is None
    stream = encode_stream(constant, "ans", 4)
    assert stream.n <= symbol_limit(stream.nbytes)


def test_stream_decoder_checks_counts_before_allocating() -> None:
    with pytest.raises(FileFormatError, match="claims 1000000000000 symbols"):
        decode_stream("none", 10**12, 16, 0, b"\x00" * 10)
    with pytest.raises(FileFormatError, match="unknown coder"):
        decode_stream("zip", 1, 16, 0, b"\x00")
    with pytest.raises(FileFormatError, match="Huffman table"):
        decode_stream("huffman", 1, 16, 3, b"\x00" * 9)
    with pytest.raises(DeepShrinkError, match="coder='zip' must be one of"):
        encode_stream(np.zeros(3, dtype=np.uint8), "zip", 2)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=0, max_size=400),
    st.sampled_from(CODERS),
)
def test_streams_roundtrip(symbols: list[int], coder: str) -> None:
    data = np.array(symbols, dtype=np.uint8)
    stream = encode_stream(data, coder, 6)
    decoded = decode_stream(stream.coder, stream.n, stream.k, stream.table_size, stream.data)
    assert decoded.tolist() == symbols


def test_ans_payload_must_hold_exactly_its_symbols() -> None:
    freqs = np.array([32, 32])
    assert encode_ans(np.zeros(40, dtype=np.uint8), freqs).size == 0  # constriction's coder starts at state 0
    with pytest.raises(FileFormatError, match="no payload"):
        decode_ans(np.zeros(0, dtype=np.uint32), 40, freqs)  # would decode 40 zeros and end empty
    one_word = np.array([0x80000000], dtype=np.uint32)  # the word: under this table, not 40 zeros
    assert decode_ans(one_word, 40, freqs).tolist() == [0] * 8 + [1] + [0] * 31
    assert encode_ans(decode_ans(one_word, 40, freqs), freqs).tolist() == one_word.tolist()
    with pytest.raises(FileFormatError, match="does not hold exactly 5 symbols"):
        decode_ans(one_word, 5, freqs)


def test_writer_never_stores_an_empty_ans_payload() -> None:
    constant = np.zeros(50, dtype=np.uint8)  # ANS would store no word at all
    assert encode_with(constant, "ans", 4) is None
    stream = encode_stream(constant, "ans", 4)
    assert stream.coder == "huffman" and stream.payload
    assert decode_stream(stream.coder, stream.n, stream.k, stream.table_size, stream.data).tolist() == [0] * 50


def test_prefix_padding_bits_must_be_zero() -> None:
    payload, n_bits = encode_prefix(np.array([1, 0, 1]), fixed_lengths(2))
    assert n_bits == 6
    damaged = payload.copy()
    damaged[-1] |= 0b01  # a padding bit
    with pytest.raises(FileFormatError, match="padding bits"):
        decode_prefix(damaged, 3, fixed_lengths(2))


def test_streams_are_charged_to_the_budget_before_decoding() -> None:
    stream = encode_stream(np.arange(100, dtype=np.uint8) % 7, "huffman", 3)
    budget = DecodeBudget(150)
    decode_stream(stream.coder, stream.n, stream.k, stream.table_size, stream.data, budget)
    assert budget.used >= 100
    with pytest.raises(FileFormatError, match="max_elements=150"):
        decode_stream(stream.coder, stream.n, stream.k, stream.table_size, stream.data, budget)


def test_decode_tables_are_built_once_per_alphabet(monkeypatch) -> None:
    from deepshrink.coding import streams

    built = []
    monkeypatch.setattr(streams, "_TABLES", streams._TableCache(streams.TABLE_CACHE_SIZE))
    monkeypatch.setattr(streams, "decode_table", lambda lengths: built.append(1) or decode_table(lengths))
    fixed16 = encode_with(np.array([7, 65535], dtype=np.uint16), "none", 16)
    for _ in range(500):  # 500 tensors, each with a 65,536-symbol fixed-width stream: one table
        decode_stream(fixed16.coder, fixed16.n, fixed16.k, fixed16.table_size, fixed16.data)
    assert len(built) == 1
