"""Files built to attack the reader: the crafted cases of issue #17, then a long mutation fuzz.

Part 1, crafted files: each case (a file and what is done with it: ``read``,
``load``, or ``export`` to safetensors) runs in a fresh process, so that its
peak memory can be measured. Reported per case: the outcome (the exception
type and message, or "accepted"), the wall time of the operation, and the peak
resident memory above what the process held before it (``ru_maxrss``, which
sees every allocator: numpy, numba, torch, constriction). The target: a
``FileFormatError`` within 1 s and under 2x the decoded size plus 64 MB.

Part 2, fuzz: mutations of files written by ``deepshrink.save`` (LeNet-5 and
LeNet-300-100, pruned and weight-shared, with each coder and layout):
truncation, bit flips, byte overwrites, and lies in header fields or section
bytes with every checksum recomputed, so that only the reader's own checks
stand between the lie and the loader. Each mutated file is read and, when it
names a factory, loaded as a model. Every outcome must be a ``FileFormatError``
or a file that decodes and loads; anything else is a failure, listed.

Usage:
    python benchmarks/bench_fuzz.py [--seconds 600] [--seed 0] [--out-dir results]

Writes ``results/bench_fuzz.json`` and ``.md``; ``docs/fileformat.md`` quotes the figures.
``tests/test_fileformat_fuzz.py`` runs every crafted case and a few hundred mutations.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepshrink.coding import kernels
from deepshrink.coding.ans import encode_ans
from deepshrink.errors import FileFormatError
from deepshrink.fileformat.codec import decode_file, pack_container, section_table, split_container
from deepshrink.fileformat.export import export_file
from deepshrink.fileformat.model_io import load, model_from_file

from common import add_output, write_results

# -- crafted files -----------------------------------------------------------------------------


def forge(tensors: list[dict], sections: list[bytes], model: dict | None = None, meta: dict | None = None,
          deflate: bool = False, **extra: object) -> bytes:  # fmt: skip
    """A file whose checksums are all right, whatever it claims: only the reader's own checks can stop it."""
    header = {"tensors": tensors, "model": model, "meta": meta or {}, "sections": section_table(sections), **extra}
    return pack_container(json.dumps(header, separators=(",", ":")).encode(), sections, deflate)


def forge_text(header_json: bytes, deflate: bool) -> bytes:
    """A file of one header text and no sections (for header-only attacks)."""
    return pack_container(header_json, [], deflate)


def array(name: str, shape: list[int], s: int = 0, dtype: str = "float32") -> dict:
    return {"name": name, "kind": "array", "dtype": dtype, "shape": shape, "s": s}


def stream(coder: str, n: int, k: int, t: int, s: int, **extra: object) -> dict:
    return {"coder": coder, "n": n, "k": k, "t": t, "s": s, **extra}


def compressed(name: str, shape: list[int], nnz: int, bits: int, index: dict, codes: dict, book: dict) -> dict:
    return {"name": name, "kind": "compressed", "shape": shape, "bits": bits, "nnz": nnz, "index": index,
            "codes": codes, "codebook": book}  # fmt: skip


def ans_stream(symbols: np.ndarray, freqs: list[int]) -> tuple[bytes, int]:
    """An ANS stream (table + payload) with the frequencies an attacker picks, and its table's size."""
    freqs = np.array(freqs, dtype=np.int64)
    table = kernels.encode_varints(freqs).tobytes()
    return table + encode_ans(symbols, freqs).tobytes(), len(table)


@functools.cache
def dense_ans_bitmap(weights: int = 1 << 25) -> bytes:
    """An all-ones bitmap and one code per weight, ANS-coded at the reader's density limit (64 symbols a byte).

    Issue #17's 658 KB file: 2**25 weights decoded from it cost +673 MB.
    """
    skew = [1360, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15024]  # symbol 15 at 2**-0.125: 1/8 bit each
    nibbles, t_nibbles = ans_stream(np.full(weights // 4, 15, dtype=np.uint8), skew)
    codes, t_codes = ans_stream(np.ones(weights, dtype=np.uint8), [1360, 15024])
    entry = compressed(
        "w", [weights], weights, 1, {"layout": "bitmap", "ib": 4, **stream("ans", weights // 4, 16, t_nibbles, 0)},
        stream("ans", weights, 2, t_codes, 1), {"dtype": "float32", "k": 2, "s": 2},
    )  # fmt: skip
    return forge([entry], [nibbles, codes, np.array([0.5, -0.5], "<f4").tobytes()])


def many_tensors(count: int) -> bytes:
    """``count`` one-weight tensors, each with 16-bit fixed-width streams (a 65,536-entry decode table)."""
    entries, sections = [], []
    for i in range(count):
        entries.append(compressed(
            f"layer{i}.weight", [1], 1, 16, {"layout": "relative", "ib": 16, **stream("none", 1, 1 << 16, 0, 3 * i)},
            stream("none", 1, 1 << 16, 0, 3 * i + 1), {"dtype": "float32", "k": 1, "s": 3 * i + 2},
        ))  # fmt: skip
        sections += [b"\x00\x00", b"\x00\x00", struct.pack("<f", 0.5)]
    return forge(entries, sections, deflate=True)


def header_of(pattern: bytes, size: int, where: str, deflate: bool) -> bytes:
    """A header padded to ``size`` bytes with ``pattern`` repeated in ``where`` (``sections`` or ``meta``)."""
    body = pattern * (size // len(pattern))
    if where == "sections":
        text = b'{"tensors":[],"model":null,"meta":{},"sections":[' + body + b"[0,0]]}"
    else:
        text = b'{"tensors":[],"model":null,"sections":[],"meta":{"x":[' + body + b"{}]}}"
    return forge_text(text, deflate)


def factory_file(kwargs: dict) -> bytes:
    """A tiny file naming LeNet-300-100 with ``kwargs`` and holding nothing."""
    return forge([], [], model={"factory": "deepshrink.models:lenet_300_100", "kwargs": kwargs})


def tiny_ans(payload: bytes) -> bytes:
    """Ten kept weights whose codes are an ANS stream of ``payload`` (table: two symbols, 32 and 32)."""
    entry = compressed(
        "w", [10], 10, 1, {"layout": "relative", "ib": 4, **stream("none", 10, 16, 0, 0)},
        stream("ans", 10, 2, 2, 1), {"dtype": "float32", "k": 2, "s": 2},
    )  # fmt: skip
    return forge([entry], [bytes(5), bytes([32, 32]) + payload, np.array([0.5, -0.5], "<f4").tobytes()])


def with_values(codebook: list[float], bias: list[float]) -> bytes:
    entry = compressed(
        "w", [2], 2, 1, {"layout": "relative", "ib": 4, **stream("none", 2, 16, 0, 0)},
        stream("none", 2, 2, 0, 1), {"dtype": "float32", "k": 2, "s": 2},
    )  # fmt: skip
    sections = [bytes([0x00]), bytes([0x40]), np.array(codebook, "<f4").tobytes(), np.array(bias, "<f4").tobytes()]
    return forge([entry, array("b", [2], 3)], sections)


def huge_sparse() -> bytes:
    """A 2**20 x 2**20 weight keeping nothing: 4 TiB dense, a few hundred bytes here."""
    entry = compressed(
        "w", [1 << 20, 1 << 20], 0, 1, {"layout": "relative", "ib": 4, **stream("none", 0, 16, 0, 0)},
        stream("none", 0, 2, 0, 1), {"dtype": "float32", "k": 1, "s": 2},
    )  # fmt: skip
    return forge([entry], [b"", b"", struct.pack("<f", 0.5)])


MiB = 1 << 20


@dataclass(frozen=True)
class Case:
    """A crafted file, what is done with it, what the issue saw before the fix, and whether the file is valid."""

    build: Callable[[], bytes]
    operation: str  # "read", "read, raised budget", "load" or "export"
    before: str = "-"
    valid: bool = False  # a well-formed file: reading it must succeed


CASES: dict[str, Case] = {
    "array shape [2**64, 0]": Case(lambda: forge([array("b", [2**64, 0])], [b""]), "read", "TypeError"),
    "array shape [2**62, 4, 0]": Case(lambda: forge([array("b", [2**62, 4, 0])], [b""]), "read", "RuntimeError"),
    "array shape [0, 10**20]": Case(lambda: forge([array("b", [0, 10**20])], [b""]), "read", "TypeError"),
    "compressed shape [2**64, 0]": Case(
        lambda: forge([compressed("w", [2**64, 0], 0, 1, {"layout": "bitmap", "ib": 4, **stream("none", 0, 16, 0, 0)},
                                  stream("none", 0, 2, 0, 1), {"dtype": "float32", "k": 1, "s": 2})],
                      [b"", b"", bytes(4)]), "read"),
    "2**25 weights, ANS at 64 symbols a byte": Case(dense_ans_bitmap, "read", "+673 MB"),
    "the same, budget raised to 2**28": Case(dense_ans_bitmap, "read, raised budget", "+673 MB", valid=True),
    "16 MiB header of [0,0] sections, deflated": Case(
        lambda: header_of(b"[0,0],", 16 * MiB, "sections", True), "read", "+850 MB, 7.7 s"),
    "8 MiB header of [0,0] sections, deflated": Case(lambda: header_of(b"[0,0],", 8 * MiB - 64, "sections", True), "read"),
    "16 MiB header of {} entries, deflated": Case(
        lambda: header_of(b"{},", 16 * MiB, "meta", True), "read", "accepted, +430 MB"),
    "8 MiB header of {} entries, deflated": Case(lambda: header_of(b"{},", 8 * MiB - 64, "meta", True), "read"),
    "1 M empty sections": Case(lambda: header_of(b"[0,0],", 6 * MiB, "sections", False), "read", "+300 MB"),
    "20,000 tensors of 16-bit fixed width": Case(lambda: many_tensors(20_000), "read", "41 s"),
    "7,000 tensors of 16-bit fixed width": Case(lambda: many_tensors(7_000), "read", "14 s", valid=True),
    "factory kwargs in_features=10**6": Case(lambda: factory_file({"in_features": 10**6}), "load", "+1.2 GB"),
    "factory kwargs in_features=10**9": Case(lambda: factory_file({"in_features": 10**9}), "load", "RuntimeError"),
    "factory kwargs in_features=-5": Case(lambda: factory_file({"in_features": -5}), "load", "RuntimeError"),
    "factory kwargs dropout=5": Case(lambda: factory_file({"dropout": 5}), "load", "ValueError"),
    "factory kwargs unknown name": Case(lambda: factory_file({"in_feature": 64}), "load"),
    "export of a 2**20 x 2**20 weight": Case(huge_sparse, "export", "4 TiB allocation"),
    "ANS payload of 0 bytes, 10 symbols": Case(lambda: tiny_ans(b""), "read", "accepted"),
    "ANS payload 0x80000000, 10 symbols": Case(
        lambda: tiny_ans(struct.pack("<I", 0x80000000)), "read", "accepted", valid=True),  # that stream's encoding
    "NaN in a codebook": Case(lambda: with_values([float("nan"), 1.0], [0.0, 0.0]), "read", "accepted"),
    "infinity in an array": Case(lambda: with_values([0.5, 1.0], [float("inf"), 0.0]), "read", "accepted"),
}  # fmt: skip


RAISED = 1 << 28  # the budget a user who trusts a big file might pass


def attack(data: bytes, operation: str, folder: Path) -> object:
    """Do ``operation`` with the file's bytes, as a user would; return what it gives."""
    path = folder / "crafted.dsz"
    path.write_bytes(data)
    if operation == "read":
        return decode_file(data)
    if operation == "read, raised budget":
        return decode_file(data, max_elements=RAISED)
    if operation == "load":
        return load(path)
    return export_file(path, folder / "out.safetensors")


def warm_up() -> None:
    """Decode small files of every coder and layout: imports and compiled kernels are not part of a case."""
    from deepshrink.fileformat.codec import EncodeOptions, encode_file
    from deepshrink.tensor import CompressedTensor

    weights = torch.tensor([[0.0, 0.5, 0.5, -1.0] * 8] * 8)
    for coder in ("none", "huffman", "ans"):
        for layout in ("relative", "bitmap"):
            options = EncodeOptions(coder, layout=layout)
            decode_file(encode_file({"w": CompressedTensor.from_dense(weights)}, {"b": torch.ones(2)}, options))


def memory_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def run_case(name: str, path: Path) -> dict:
    """Attack with one case's file, measuring time and the peak memory it adds (run in a fresh process)."""
    operation, before = CASES[name].operation, CASES[name].before
    data = path.read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        warm_up()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
        baseline = memory_mb("VmRSS")
        start = time.perf_counter()
        try:
            result = attack(data, operation, Path(folder))
            outcome = "accepted"
        except Exception as err:  # the outcome is what we measure, whatever it is
            result, outcome = None, f"{type(err).__name__}: {err}"
        seconds = time.perf_counter() - start
        peak_mb = memory_mb("VmHWM") - baseline
    tensors = getattr(result, "tensors", {}).values()
    decoded = sum(ct.positions.nbytes + ct.codes.nbytes + ct.codebook.nbytes for ct in tensors)
    return {"case": name, "file_bytes": len(data), "operation": operation, "before": before, "outcome": outcome,
            "seconds": seconds, "peak_mb": peak_mb, "decoded_mb": decoded / 2**20}  # fmt: skip


def crafted_table() -> list[dict]:
    """Every case, each attacked in a fresh process so that the peak memory is its own."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for i, (name, case) in enumerate(CASES.items()):
            path = Path(folder) / f"case{i}.dsz"
            path.write_bytes(case.build())  # built here: the attacking process holds only the file
            proc = subprocess.run([sys.executable, __file__, "--case", name, str(path)], capture_output=True, text=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                        {"case": name, "outcome": f"crashed: {proc.stderr[-500:]}", "seconds": math.nan})  # fmt: skip
            print(f"{name}: {rows[-1]['outcome'][:100]} ({rows[-1]['seconds']:.3f} s)", flush=True)
    return rows


# -- mutation fuzz -----------------------------------------------------------------------------


def seed_files() -> dict[str, bytes]:
    """Real files: LeNet-5 and LeNet-300-100 pruned and weight-shared, with each coder and layout."""
    from deepshrink.compress import prune_, share_weights_
    from deepshrink.fileformat.codec import EncodeOptions, encode_file
    from deepshrink.fileformat.model_io import split_model
    from deepshrink.models import lenet_5, lenet_300_100

    torch.manual_seed(0)
    files = {}
    for name, make, kwargs, sparsity in (
        ("lenet5", lenet_5, {}, 0.9),
        ("lenet300", lenet_300_100, {"in_features": 64}, 0.7),
    ):
        model = make(**kwargs)
        prune_(model, sparsity)
        share_weights_(model, bits=4)
        tensors, arrays = split_model(model)
        spec = {"factory": f"deepshrink.models:{make.__name__}", "kwargs": kwargs}
        for coder, layout in (("huffman", "auto"), ("ans", "auto"), ("none", "bitmap")):
            files[f"{name}-{coder}-{layout}"] = encode_file(tensors, arrays, EncodeOptions(coder, layout=layout), spec)
    return files  # fmt: skip


LIES = [0, 1, -1, 2, 15, 16, 17, 255, 256, 65535, 65536, 2**31, 2**32 - 1, 2**48, 2**63, 2**64, 10**30, True, None,
        "", "x", "ans", "bitmap", "compressed", "float16", [], [0], [2**40, 0], {}, 0.5, float("1e308")]  # fmt: skip


def _leaves(value: object, path: tuple = ()) -> list[tuple]:
    """Paths to every value inside a JSON document (containers included)."""
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _leaves(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _leaves(item, path + (i,))
    return out


def _replace(doc: object, path: tuple, value: object) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def _sections(data: bytes) -> tuple[dict, list[bytes]]:
    header, bounds = split_container(data)
    return header, [data[a:b] for a, b in zip(bounds, bounds[1:])]


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a valid file, and its description.

    Kinds: ``truncate``; ``flip`` (1-3 bits) and ``overwrite`` (1-4 bytes), left for the
    checksums to catch; ``lie`` (a header field set to another value, or a tweak of a
    number) and ``section`` (section bytes overwritten), both with every checksum
    recomputed.
    """
    kind = rng.choice(["truncate", "flip", "overwrite", "lie", "lie", "section"])
    if kind == "truncate":
        cut = rng.randrange(len(data))
        return f"truncate at {cut}", data[:cut]
    if kind in ("flip", "overwrite"):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 3 if kind == "flip" else 4)):
            at = rng.randrange(len(damaged))
            damaged[at] = damaged[at] ^ (1 << rng.randrange(8)) if kind == "flip" else rng.randrange(256)
        return kind, bytes(damaged)
    header, sections = _sections(data)
    if kind == "section":
        i = rng.randrange(len(sections))
        body = bytearray(sections[i])
        for _ in range(rng.randint(1, 4)):
            if body:
                body[rng.randrange(len(body))] = rng.randrange(256)
        sections[i] = bytes(body)
        what = f"section {i} bytes"
    else:
        path = rng.choice(_leaves(header)[1:])
        old = header
        for key in path:
            old = old[key]
        new = old + rng.choice([-1, 1, 7, -(2**20)]) if type(old) is int and rng.random() < 0.5 else rng.choice(LIES)
        _replace(header, path, new)
        what = f"{'/'.join(map(str, path))}: {str(old)[:40]} -> {str(new)[:40]}"
    header["sections"] = section_table(sections) if kind == "section" else header["sections"]
    deflate = bool(struct.unpack_from("<H", data, 10)[0] & 1)
    return f"{kind} {what}", pack_container(json.dumps(header).encode(), sections, deflate)


def victim(data: bytes) -> str:
    """Read the file and, when it names a factory, load it as a model: ``accepted`` or ``rejected``.

    Raises:
        Exception: anything but a FileFormatError is a reader bug.
    """
    try:
        contents = decode_file(data)
        if contents.model is not None:
            model_from_file(contents)
    except FileFormatError:
        return "rejected"
    return "accepted"


def fuzz(files: dict[str, bytes], seconds: float, seed: int) -> dict:
    """Mutate and attack for ``seconds``; count outcomes per kind, time the slowest attack, list failures."""
    rng = random.Random(seed)
    outcomes, failures, slowest = Counter(), [], (0.0, "")
    end = time.perf_counter() + seconds
    names = sorted(files)
    while time.perf_counter() < end:
        name = rng.choice(names)
        what, data = mutate(files[name], rng)
        start = time.perf_counter()
        try:
            result = victim(data)
        except Exception as err:  # noqa: BLE001 (a failure to report, with its traceback)
            result = "failure"
            failures.append({"file": name, "mutation": what, "error": "".join(traceback.format_exception(err))[-1500:]})
        took = time.perf_counter() - start
        slowest = max(slowest, (took, f"{name}: {what}"))
        outcomes[f"{what.split()[0]}: {result}"] += 1
    return {"mutations": sum(outcomes.values()), "outcomes": dict(sorted(outcomes.items())), "failures": failures,
            "slowest_s": slowest[0], "slowest": slowest[1]}  # fmt: skip


def page(result: dict) -> str:
    lines = ["# Reader hardening: crafted files and mutation fuzz", "",
             f"Load average {result['load_average']:.1f} on {os.cpu_count()} cores.", "",
             "| case | file bytes | operation | issue #17 reported | outcome now | s | peak MB | decoded MB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["crafted"]:
        outcome = r["outcome"].replace("|", "/")[:140]
        lines.append(f"| {r['case']} | {r.get('file_bytes', 0):,} | {r.get('operation', '')} | {r.get('before', '')} "
                     f"| {outcome} | {r['seconds']:.3f} | {r.get('peak_mb', math.nan):.0f} | {r.get('decoded_mb', 0):.0f} |")  # fmt: skip
    f = result["fuzz"]
    lines += ["", f"Fuzz: {f['mutations']:,} mutations in {result['fuzz_seconds']:.0f} s, {len(f['failures'])} failures; "
              f"slowest attack {f['slowest_s']:.3f} s ({f['slowest']}).", "", "| mutation: outcome | count |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:,} |" for k, v in f["outcomes"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: NAME FILE, attack, print the JSON row
    add_output(parser)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], Path(args.case[1]))))
        return None
    result = {"crafted": crafted_table(), "fuzz_seconds": args.seconds}
    result["fuzz"] = fuzz(seed_files(), args.seconds, args.seed)
    result["load_average"] = os.getloadavg()[0]
    print(page(result))
    write_results(args, "bench_fuzz", result, page)
    return result


if __name__ == "__main__":
    main()
