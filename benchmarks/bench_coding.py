"""Entropy-coder speed: encode and decode 10 M symbols each, target under 1 s per direction.

Two synthetic streams shaped like a pruned layer's (random data: this measures
speed only): the 5-bit relative-index stream of a layer keeping 8% of its
weights, and 5-bit codebook indices of normally distributed weights. Baseline,
measured in the same run: zlib (deflate, level 6) on the same symbols, one byte
each.

Usage:
    python benchmarks/bench_coding.py [--symbols 10000000] [--repeats 3] [--out-dir results]

Writes ``results/bench_coding.json`` and ``.md`` (``docs/results/bench_coding.md`` adds a reading by hand).
"""

from __future__ import annotations

import argparse
import time
import zlib
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from deepshrink.coding.relative import encode_relative
from deepshrink.coding.streams import decode_stream, encode_with

from common import add_output, write_results

TARGET_S = 1.0  # the target per direction for 10 M symbols
WIDTH = 5  # Deep Compression's fully connected setting for both streams


def streams(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` symbols each of an index stream (8% density) and a code stream."""
    rng = np.random.default_rng(seed)
    positions = np.flatnonzero(rng.random(int(n / 0.08 * 1.05)) < 0.08)
    index = encode_relative(positions, WIDTH)[:n]
    weights = rng.standard_normal(n)
    codes = np.clip(np.round(weights * 5 + 16), 0, 31).astype(np.uint8)  # 32 evenly spaced centroids
    return {"index (8% kept)": index, "codes (32 centroids)": codes}


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def entropy_bits(symbols: np.ndarray) -> float:
    p = np.bincount(symbols) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def measure(symbols: np.ndarray, coder: str, repeats: int) -> dict:
    if coder == "zlib":
        raw = symbols.astype(np.uint8).tobytes()
        enc_s, packed = best_time(lambda: zlib.compress(raw, 6), repeats)
        dec_s, back = best_time(lambda: np.frombuffer(zlib.decompress(packed), dtype=np.uint8), repeats)
        n_bytes = len(packed)
    else:
        enc_s, stream = best_time(lambda: encode_with(symbols, coder, WIDTH), repeats)
        dec_s, back = best_time(
            lambda: decode_stream(stream.coder, stream.n, stream.k, stream.table_size, stream.data), repeats
        )
        n_bytes = stream.nbytes
    if not np.array_equal(back, symbols):
        raise RuntimeError(f"{coder} did not round-trip")
    return {"coder": coder, "encode_s": enc_s, "decode_s": dec_s, "bits_per_symbol": 8 * n_bytes / symbols.size}


def page(rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = ["| stream | coder | encode s | decode s | bits/symbol | entropy | encode x zlib | decode x zlib |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['stream']} | {r['coder']} | {r['encode_s']:.3f} | {r['decode_s']:.3f} | {r['bits_per_symbol']:.3f} | "
              f"{r['entropy']:.3f} | {r['encode_vs_zlib']:.1f}x | {r['decode_vs_zlib']:.1f}x |" for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    add_output(parser)
    args = parser.parse_args()

    console = Console()
    encode_with(np.zeros(10, dtype=np.uint8), "huffman", WIDTH)  # compile the numba kernels outside the timing
    rows = []
    for name, symbols in streams(args.symbols).items():
        baseline = measure(symbols, "zlib", args.repeats)
        for coder in ("none", "huffman", "ans"):
            row = measure(symbols, coder, args.repeats)
            row.update(stream=name, entropy=entropy_bits(symbols),
                       encode_vs_zlib=baseline["encode_s"] / row["encode_s"],
                       decode_vs_zlib=baseline["decode_s"] / row["decode_s"])  # fmt: skip
            rows.append(row)
        rows.append({**baseline, "stream": name, "entropy": entropy_bits(symbols), "encode_vs_zlib": 1.0,
                     "decode_vs_zlib": 1.0})  # fmt: skip

    table = Table(
        title=f"{args.symbols:,} symbols per stream, best of {args.repeats} (target < {TARGET_S:.0f} s each way)"
    )
    for col in (
        "stream",
        "coder",
        "encode s",
        "decode s",
        "bits/symbol",
        "entropy",
        "encode x zlib",
        "decode x zlib",
        "target",
    ):
        table.add_column(col, justify="left" if col in ("stream", "coder") else "right")
    for r in rows:
        ok = r["coder"] == "zlib" or max(r["encode_s"], r["decode_s"]) < TARGET_S * args.symbols / 10_000_000
        table.add_row(r["stream"], r["coder"], f"{r['encode_s']:.3f}", f"{r['decode_s']:.3f}", f"{r['bits_per_symbol']:.3f}",
                      f"{r['entropy']:.3f}", f"{r['encode_vs_zlib']:.1f}x", f"{r['decode_vs_zlib']:.1f}x",
                      "-" if r["coder"] == "zlib" else ("met" if ok else "MISSED"))  # fmt: skip
    console.print(table)

    write_results(args, "bench_coding", rows, page)
    console.print(f"wrote {Path(args.out_dir) / 'bench_coding.json'} and .md")


if __name__ == "__main__":
    main()
