"""What the benchmarks share: where the data is, where the results go, and the writer.

One rule for output: every run writes ``<name>.json`` (machine-readable) and, where it
makes one, ``<name>.md`` (the page) to ``results/`` at the repository root (``--out-dir``),
which git ignores, along with anything large it makes (``.dsz`` files). The committed
pages live in ``docs/results/``; the benchmarks whose page is generated whole (LeNet, EIE,
engine) write it there too with ``--publish``. The other pages there add a hand-written
reading to the generated tables, so they are updated by hand from ``results/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deepshrink.atomic import write_atomic
from deepshrink.data.common import ENV_VAR

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"  # raw output of every run; not committed
PUBLISHED = ROOT / "docs" / "results"  # the pages the README links, written with --publish


def default_data_dir() -> str:
    """``$DEEPSHRINK_DATA``, else ``../shared/data`` beside the repository."""
    return os.environ.get(ENV_VAR) or str(ROOT.parent / "shared" / "data")


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """``--data-dir``, defaulting to :func:`default_data_dir`."""
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help=f"data root (default ${ENV_VAR}, else ../shared/data)")  # fmt: skip


def add_output(parser: argparse.ArgumentParser, publish: bool = False) -> None:
    """``--out-dir`` (default ``results/``) and, for a page generated whole, ``--publish [DIR]``."""
    parser.add_argument(
        "--out-dir",
        default=str(RESULTS),
        help="where the JSON, the page and any large files go (default results/, not committed)",
    )
    if publish:
        parser.add_argument(
            "--publish",
            nargs="?",
            const=str(PUBLISHED),
            metavar="DIR",
            help="also write the page and its images here (default docs/results/)",
        )


def write_results(
    args: argparse.Namespace,
    name: str,
    data: object,
    page: Callable[[object], str] | None = None,
    merge: Callable[[Path, object], object] | None = None,
) -> list[Path]:
    """Write ``<name>.json`` and ``<name>.md`` (``page(data)``) to ``--out-dir``, and the page to ``--publish``.

    Args:
        page: makes the markdown page from ``data``; None for a benchmark without one.
        merge: ``(existing JSON path, data) -> data``, applied in each folder before writing,
            for a page that keeps rows of earlier runs (the LeNet page keeps the other net's);
            such a page's JSON is published beside it.

    Returns:
        The folders the page went to, for its images.
    """
    out = Path(args.out_dir)
    publish = getattr(args, "publish", None)
    folders = [out] + ([Path(publish)] if publish else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        rows = merge(folder / f"{name}.json", data) if merge else data
        if folder == out or merge:
            write_atomic(folder / f"{name}.json", json.dumps(rows, indent=2).encode())
        if page is not None:
            write_atomic(folder / f"{name}.md", page(rows).encode())
    return folders


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (default 2, this machine's cores): the same number for every library timed."""
    parser.add_argument("--threads", type=int, default=2, help="threads for every library (torch and numba alike)")


def start_run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Give torch and numba ``--threads`` threads; the page's header fields: command line, date, threads, CPU."""
    import numba
    import torch

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    return {"argv": sys.argv[1:] if argv is None else argv, "date": time.strftime("%Y-%m-%d %H:%M"),
            "threads": args.threads, "cpu": cpu_name()}  # fmt: skip


def cpu_name() -> str:
    """The CPU's model, cores, and the target numba compiles for: the kernels' speed, and MKL's, moves with its SIMD."""
    import llvmlite.binding as llvm

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "CPU")
    simd = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    return f"{model} ({os.cpu_count()} cores, LLVM target {llvm.get_host_cpu_name()}, {simd})"
