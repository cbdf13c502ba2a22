"""Weight-sharing speed: k-means of a 4096x4096 layer at 10% kept, target under 2 s.

The layer's weights are those of a trained-looking layer (normal, then the 90%
smallest magnitudes pruned); random data is fine here since this measures speed.
Each initialisation is timed at 5 bits (32 clusters, fully connected) and 8 bits
(256, conv). Baseline in the same run: scikit-learn's ``KMeans`` (Lloyd, one
initialisation, the same linear start) on the same values.

Usage:
    python benchmarks/bench_kmeans.py [--rows 4096] [--cols 4096] [--kept 0.1] [--out-dir results]

Writes ``results/kmeans.json`` (``docs/results/kmeans.md`` is its table with a reading, by hand).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.cluster import KMeans

from deepshrink.compress.quantize import INITS, kmeans_1d

from common import add_output, write_results

TARGET_S = 2.0  # the target for a 4096x4096 layer at 10% kept


def survivors(rows: int, cols: int, kept: float, seed: int = 0) -> np.ndarray:
    """The weights magnitude pruning keeps of a normal ``rows x cols`` layer."""
    w = np.random.default_rng(seed).standard_normal(rows * cols).astype(np.float32)
    threshold = np.quantile(np.abs(w), 1 - kept)
    return w[np.abs(w) > threshold]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--kept", type=float, default=0.1)
    add_output(parser)
    args = parser.parse_args()
    values = survivors(args.rows, args.cols, args.kept)
    rows = []
    for bits in (5, 8):
        k = 1 << bits
        start = np.linspace(values.min(), values.max(), k).reshape(-1, 1)
        base_s, base = timed(lambda: KMeans(k, init=start, n_init=1, max_iter=300).fit(values.reshape(-1, 1)))  # noqa: B023 (called in this iteration)
        base_mse = float(base.inertia_ / values.size)
        for init in INITS:
            seconds, (centroids, codes) = timed(lambda: kmeans_1d(values, k, init))  # noqa: B023 (called in this iteration)
            rows.append(
                {
                    "bits": bits,
                    "init": init,
                    "weights": int(values.size),
                    "seconds": seconds,
                    "sklearn_seconds": base_s,
                    "speedup": base_s / seconds,
                    "mse": float(np.mean((values - centroids[codes]) ** 2)),
                    "sklearn_mse": base_mse,
                    "met": seconds < TARGET_S,
                }
            )
    table = Table(title=f"k-means of a {args.rows}x{args.cols} layer at {args.kept:.0%} kept ({values.size:,} weights)")
    for col in ("bits", "init", "seconds", "sklearn KMeans s", "x", "MSE", "sklearn MSE", f"< {TARGET_S:g} s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["bits"]),
            r["init"],
            f"{r['seconds']:.3f}",
            f"{r['sklearn_seconds']:.2f}",
            f"{r['speedup']:.0f}",
            f"{r['mse']:.3g}",
            f"{r['sklearn_mse']:.3g}",
            "yes" if r["met"] else "NO",
        )
    Console().print(table)
    write_results(args, "kmeans", rows)


if __name__ == "__main__":
    main()
