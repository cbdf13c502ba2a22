"""Damaged and malicious files: every one gets a FileFormatError, never a crash, hang or huge allocation."""

from __future__ import annotations

import json
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import share_weights_
from deepshrink.errors import FileFormatError
from deepshrink.fileformat.codec import MAGIC, MAX_HEADER_BYTES, PRELUDE, EncodeOptions, decode_file, encode_file
from deepshrink.fileformat.model_io import load
from deepshrink.models import lenet_5
from deepshrink.tensor import CompressedTensor


@pytest.fixture(scope="module")
def real_file() -> bytes:
    """A LeNet-5 pruned to the paper's densities and weight-shared, saved with Huffman coding (~20 KB)."""
    torch.manual_seed(0)
    model = lenet_5()
    prune_(model, sparsity={"conv1.*": 0.34, "conv2.*": 0.88, "fc1.*": 0.92, "fc2.*": 0.81})
    share_weights_(model, bits={"conv*": 6, "fc*": 4})
    from deepshrink.fileformat.model_io import split_model

    tensors, arrays = split_model(model)
    data = encode_file(
        tensors, arrays, EncodeOptions(coder="huffman"), {"factory": "deepshrink.models:lenet_5", "kwargs": {}}
    )
    decode_file(data)  # sanity: the intact file reads
    return data


def tiny_file() -> bytes:
    t = CompressedTensor((2, 3), np.array([1, 2, 5]), np.array([0, 1, 1]), np.array([-0.5, 0.25], np.float32), 1)
    options = EncodeOptions(coder="none", layout="relative", index_bits=2)
    return encode_file({"w": t}, {"b": torch.tensor([1.0, -2.0])}, options, deflate_header=False)


def test_tiny_file_bytes_are_pinned() -> None:
    header = (
        b'{"tensors":[{"name":"w","kind":"compressed","shape":[2,3],"bits":1,"nnz":3,'
        b'"index":{"layout":"relative","ib":2,"coder":"none","n":3,"k":4,"t":0,"s":0},'
        b'"codes":{"coder":"none","n":3,"k":2,"t":0,"s":1},"codebook":{"dtype":"float32","k":2,"s":2}},'
        b'{"name":"b","kind":"array","dtype":"float32","shape":[2],"s":3}],"model":null,"meta":{},'
        b'"sections":[[1,2852464175],[1,2679148245],[8,223855948],[8,3280414294]]}'
    )
    expected = (
        b"DSHRINK\x00" + bytes.fromhex("0100" "0000") + struct.pack("<I", len(header)) + struct.pack("<I", zlib.crc32(header))
        + header
        + bytes([0b01_00_10_00])  # gaps 1, 0, 2 at 2 bits each
        + bytes([0b011_00000])  # codes 0, 1, 1 at 1 bit each
        + bytes.fromhex("000000bf" "0000803e")  # codebook -0.5, 0.25 (fp32 little-endian)
        + bytes.fromhex("0000803f" "000000c0")  # bias 1.0, -2.0
    )  # fmt: skip
    assert tiny_file() == expected
    assert decode_file(expected).tensors["w"].to_dense().tolist() == [[0.0, -0.5, 0.25], [0.0, 0.0, 0.25]]
    deflated = PRELUDE.pack(MAGIC, 1, 1, len(zlib.compress(header)), zlib.crc32(zlib.compress(header)))
    deflated += zlib.compress(header) + expected[PRELUDE.size + len(header) :]
    assert decode_file(deflated).header == decode_file(expected).header


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_at_any_offset(real_file: bytes, cut: float) -> None:
    with pytest.raises(FileFormatError):
        decode_file(real_file[: int(cut * len(real_file))])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=3), bit=st.integers(0, 7))
def test_flipped_bits_are_caught(real_file: bytes, where: list[float], bit: int) -> None:
    damaged = bytearray(real_file)
    for w in sorted({int(w * len(damaged)) for w in where}):
        damaged[w] ^= 1 << bit
    with pytest.raises(FileFormatError):
        decode_file(bytes(damaged))


def test_every_single_bit_flip_of_the_header_region_is_caught(real_file: bytes) -> None:
    for offset in range(0, PRELUDE.size + 64):
        damaged = bytearray(real_file)
        damaged[offset] ^= 0x10
        with pytest.raises(FileFormatError):
            decode_file(bytes(damaged))


def forge(header: dict, sections: list[bytes], version: int = 1, magic: bytes = MAGIC, flags: int = 0) -> bytes:
    """A file whose checksums are all right: only the reader's own checks can stop it."""
    header = {"model": None, "meta": {}, **header}
    header.setdefault("sections", [[len(s), zlib.crc32(s)] for s in sections])
    text = json.dumps(header).encode()
    return PRELUDE.pack(magic, version, flags, len(text), zlib.crc32(text)) + text + b"".join(sections)


def deflated(text: bytes) -> bytes:
    stored = zlib.compress(text)
    return PRELUDE.pack(MAGIC, 1, 1, len(stored), zlib.crc32(stored)) + stored


def array_entry(shape: list[int], s: int = 0, dtype: str = "float32", name: str = "x") -> dict:
    return {"name": name, "kind": "array", "dtype": dtype, "shape": shape, "s": s}


def compressed_entry(nnz: int, n: int, shape: list[int] | None = None, coder: str = "none") -> dict:
    return {
        "name": "w", "kind": "compressed", "shape": shape or [10, 10], "bits": 2, "nnz": nnz,
        "index": {"layout": "relative", "ib": 4, "coder": coder, "n": n, "k": 16, "t": 0, "s": 0},
        "codes": {"coder": "none", "n": nnz, "k": 4, "t": 0, "s": 1},
        "codebook": {"dtype": "float32", "k": 4, "s": 2},
    }  # fmt: skip


def rejects_within(data: bytes, match: str, max_bytes: int = 50 << 20) -> None:
    """Decoding fails with ``match`` and never holds more than ``max_bytes`` of new memory."""
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError, match=match):
            decode_file(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < max_bytes


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (forge({"tensors": [array_entry([10**6, 10**6])]}, [b"\x00" * 400]), "the file's tensors needs 1,000,000,000,000 elements, but the reader's budget"),
        (forge({"tensors": [array_entry([1000, 1000])]}, [b"\x00" * 400]), "needs 4000000 bytes but the section holds 400"),
        (forge({"tensors": [compressed_entry(10**12, 10**12)]}, [b"\x00" * 8, b"\x00" * 8, b"\x00" * 16]), "needs 3,000,000,000,004 elements"),
        (forge({"tensors": [compressed_entry(10**6, 10**6)]}, [b"\x00" * 8, b"\x00" * 8, b"\x00" * 16]), "claims 1000000 symbols"),
        (forge({"tensors": [array_entry([4])], "sections": [[10**12, 0]]}, [b"\x00" * 16]), "claims 1000000000000 bytes"),
        (forge({"tensors": [array_entry([2**40, 2**40])]}, [b""]), "claims .* elements"),
        (forge({"tensors": []}, [], version=2), "format version 2 .* not supported"),
        (forge({"tensors": []}, [], magic=b"PK\x03\x04\x00\x00\x00\x00"), "not a deepshrink file"),
        (MAGIC + struct.pack("<HHII", 1, 0, 2**32 - 1, 0) + b"{}", "header claims 4294967295 bytes"),
        (forge({"tensors": [array_entry([4]), array_entry([4], name="y")]}, [b"\x00" * 16]), "section 0 is missing or used twice"),
        (forge({"tensors": [array_entry([4]), array_entry([4], s=1)]}, [b"\x00" * 16] * 2), "'x' appears twice"),
        (forge({"tensors": [array_entry([4])]}, [b"\x00" * 16, b"\x00"]), "belong to no tensor"),
        (forge({"tensors": [array_entry([True])]}, [b"\x00" * 4]), "shape"),
        (forge({"tensors": [array_entry([1], dtype="object")]}, [b"\x00" * 8]), "dtype 'object' is not one of"),
        (forge({"tensors": [{**array_entry([4]), "kind": "pickle"}]}, [b"\x00" * 16]), "unknown kind 'pickle'"),
        (forge({"tensors": [{**array_entry([4]), "cast": "float64"}]}, [b"\x00" * 16]), "cast 'float64' of a float32 array"),
        (forge({"tensors": [{**array_entry([4], dtype="float16"), "cast": "int8"}]}, [b"\x00" * 8]), "cast 'int8' of a float16"),
        (forge({"tensors": [{**array_entry([4], dtype="float16"), "cast": 4}]}, [b"\x00" * 8]), "'cast' is missing or not str"),
        (forge({"tensors": "no"}, []), "'tensors' is missing or not list"),
        (forge({"tensors": [compressed_entry(3, 3, coder="huffman")]}, [b"\x00" * 8, b"\x00", b"\x00" * 16]), "Huffman table"),
        (forge({"tensors": [compressed_entry(3, 3)]}, [b"\xf0\x10", b"\x00", b"\x00" * 16]), "nnz=3 but the index stream holds 2 positions"),
        (forge({"tensors": [compressed_entry(2, 2, shape=[1, 1])]}, [b"\x00", b"\x00", b"\x00" * 16]), "positions must be strictly increasing and inside"),
        (PRELUDE.pack(MAGIC, 1, 0, 2000, zlib.crc32(b"[" * 1000 + b"]" * 1000)) + b"[" * 1000 + b"]" * 1000, "not valid JSON|missing"),
        (b"DSHR", "shorter than the 20-byte prelude"),
        (forge({"tensors": []}, [], flags=2), "flags 2"),
        (forge({"tensors": []}, [], flags=1), "does not inflate"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)  # fmt: skip
def test_malicious_files(data: bytes, match: str) -> None:
    rejects_within(data, match)


def holes_file(nnz: int, stream: bytes, n: int) -> bytes:
    """A 10 x 10 tensor whose positions are given as ``n`` 4-bit holes."""
    entry = compressed_entry(nnz, n)
    entry["index"]["layout"] = "holes"
    return forge({"tensors": [entry]}, [stream, b"\x00" * -(-2 * nnz // 8), b"\x00" * 16])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (holes_file(98, b"\x00\x00", 3), "nnz=98 but the index stream holds 97 positions"),
        (holes_file(99, b"\xff\xff\xff\xf0", 8), "a hole at 105 is past the tensor's end"),
        (holes_file(99, b"\x00\x00", 3), "nnz=99 but the index stream holds 97"),
    ],
)
def test_holes_that_lie_are_refused(data: bytes, match: str) -> None:
    rejects_within(data, match)


def test_holes_decode_to_the_other_positions() -> None:
    ct = decode_file(holes_file(97, b"\x03\x10", 3)).tensors["w"]  # gaps 0, 3, 1: holes 0, 4, 6
    assert ct.nnz == 97 and not set(ct.positions.tolist()) & {0, 4, 6}
    assert ct.positions.tolist() == sorted(set(range(100)) - {0, 4, 6})


def test_deflate_bomb_stops_at_the_header_cap() -> None:
    bomb = deflated(b" " * (MAX_HEADER_BYTES + 1))  # 16 KB that would inflate past the cap
    # zlib grows its output by copying, so the peak is up to twice the cap: bounded, whatever the file says.
    rejects_within(bomb, "inflates past the cap", max_bytes=2 * MAX_HEADER_BYTES + (4 << 20))


def test_load_of_a_file_naming_foreign_code_imports_nothing(tmp_path: Path) -> None:
    path = tmp_path / "evil.dsz"
    path.write_bytes(forge({"tensors": [], "model": {"factory": "this:s", "kwargs": {}}}, []))
    with pytest.raises(Exception, match="trust_factory=True"):
        load(path)
    assert "this" not in sys.modules


def test_missing_file_is_a_deepshrink_error(tmp_path: Path) -> None:
    from deepshrink.errors import DeepShrinkError

    with pytest.raises(DeepShrinkError, match="cannot read"):
        load(tmp_path / "nope.dsz")


# -- the crafted files of issue #17, and mutations of real files with every checksum recomputed --------------


@pytest.fixture(scope="module")
def bench_fuzz(load_benchmark):
    return load_benchmark("bench_fuzz")


def peak_growth_mb(bench_fuzz, fn) -> float:
    """Peak resident memory ``fn()`` adds to this process (every allocator: numpy, numba, torch)."""
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from the current size
    before = bench_fuzz.memory_mb("VmRSS")
    fn()
    return bench_fuzz.memory_mb("VmHWM") - before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc")
def test_crafted_file_is_refused_within_memory(crafted_case: str, bench_fuzz, tmp_path: Path) -> None:
    """Every crafted file of benchmarks/bench_fuzz.py (its page: times and peaks): FileFormatError, little memory."""
    case = bench_fuzz.CASES[crafted_case]
    data = case.build()
    bench_fuzz.warm_up()
    outcome = {}

    def attack() -> None:
        try:
            outcome["result"] = bench_fuzz.attack(data, case.operation, tmp_path)
        except Exception as err:  # the type is the point of the test
            outcome["error"] = err

    peak = peak_growth_mb(bench_fuzz, attack)
    if case.valid:
        assert "error" not in outcome, outcome
        tensors = outcome["result"].tensors.values()
        # positions counted at 8 bytes: the decoder builds them in int64 and the tensor narrows them to int32
        decoded_mb = sum(8 * ct.positions.size + ct.codes.nbytes + ct.codebook.nbytes for ct in tensors) / 2**20
        assert peak < 2 * decoded_mb + 64, (peak, decoded_mb)
    else:
        assert isinstance(outcome.get("error"), FileFormatError), outcome
        assert peak < 64, peak


def test_the_dense_ans_file_decodes_to_what_it_says_under_a_raised_budget(bench_fuzz) -> None:
    contents = decode_file(bench_fuzz.dense_ans_bitmap(), max_elements=1 << 28)
    ct = contents.tensors["w"]
    assert ct.nnz == ct.numel == 1 << 25 and int(ct.positions[-1]) == ct.numel - 1 and (ct.codes == 1).all()


@pytest.fixture(scope="module")
def seed_files(bench_fuzz) -> dict[str, bytes]:
    return bench_fuzz.seed_files()


CHECKSUMMED = ("truncate", "flip", "overwrite")  # mutations that leave the checksums as they were


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_real_files_are_refused_or_load(bench_fuzz, seed_files: dict[str, bytes], data) -> None:
    """Truncations, flips, overwrites, and header or section lies with every checksum recomputed.

    ``python benchmarks/bench_fuzz.py`` runs the same for ten minutes (figures in docs/fileformat.md).
    """
    name = data.draw(st.sampled_from(sorted(seed_files)))
    what, mutated = bench_fuzz.mutate(seed_files[name], data.draw(st.randoms(use_true_random=False)))
    note(f"{name}: {what}")
    outcome = bench_fuzz.victim(mutated)  # raises anything that is not a FileFormatError
    if what.split()[0] in CHECKSUMMED and mutated != seed_files[name]:
        assert outcome == "rejected"
