"""Inference-engine benchmark: EIE's nine layers and the two LeNets, against dense and sparse baselines.

For each EIE benchmark layer (random weights and activations at the published
densities; speed is all that is measured) at batch 1, 4 and 16 it times, in the same
run and interleaved round-robin, our engine against dense torch fp32, torch.sparse
CSR and scipy.sparse CSR, prints the ratios beside the published CPU figures, and
the fraction of this machine's memory bandwidth and arithmetic rate (both
measured here with torch) the engine reaches. It reports the kernels' first-call
compile time (fresh numba cache, in a subprocess) apart from the steady state.
End to end, it runs LeNet-300-100 and LeNet-5 from their ``.dsz`` files through
the engine: test accuracy against the decoded model, fp32 and 16-bit fixed point,
and images per second at batch 1 against dense torch.

Every library gets the same number of threads (``--threads``, default 2 = this
machine's cores): ``torch.set_num_threads`` and ``numba.set_num_threads``. On a
shared machine the ratios drift with the neighbours' load, so the layer suite is
measured ``--runs`` times one after another; the page gives medians, the spread,
and in how many runs each target was met.

    python benchmarks/bench_engine.py                     # writes results/engine.{json,md}
    python benchmarks/bench_engine.py --publish           # also docs/results/engine.md
    python benchmarks/bench_engine.py --runs 1 --repeats 5 --layers Alex-7 VGG-7 --no-lenet   # quick look

The LeNet files default to ``results/<net>.dsz`` as ``benchmarks/bench_lenet.py``
writes them; a missing one is made here by the net's built-in recipe, capped at
``--recipe-max-steps`` training steps per stage. Outputs: results/engine.json and
results/engine.md (not committed); with --publish the page in docs/results/ too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import scipy.sparse
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from deepshrink.engine import SparseMatrix, from_file
from deepshrink.engine.runner import decoded_model, median_seconds, predict
from deepshrink.hardware import EIE_BENCHMARK_LAYERS, synthetic_layer
from deepshrink.hardware.layers import synthetic_activations
from deepshrink.models.registry import MODELS

from bench_eie import PUBLISHED_US, geomean  # published figures kept in one place
from common import ROOT, add_data_dir, add_output, add_threads, start_run, write_results

TARGET_VS_DENSE = {"Alex-6": 10.0, "Alex-7": 10.0, "VGG-6": 10.0, "VGG-7": 10.0}  # the batch-1 targets
TARGET_VS_TORCH_CSR = 3.0


def machine_rates(repeats: int) -> dict[str, float]:
    """Memory bandwidth (torch add over 128 MB arrays) and fp32 GEMM rate, with the set threads."""
    n = 32 << 20  # 32 Mi floats = 128 MB per array, far beyond the caches
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    m = torch.rand(2048, 2048)
    t = median_seconds({"add": lambda: torch.add(a, b, out=c), "mm": lambda: m @ m}, repeats)
    return {"bandwidth_gbs": 3 * 4 * n / t["add"] / 1e9, "gflops": 2 * 2048**3 / t["mm"] / 1e9}


def touched(m: SparseMatrix, x: np.ndarray) -> tuple[int, int]:
    """Bytes the batch-1 kernel that ``m`` picks for ``x`` reads and writes, and the multiply-accumulates it does."""
    kernel, active = m.kernel_for(x), np.flatnonzero(x)
    io = 4 * (len(x) + 2 * m.shape[0])  # activations read, outputs (and their bias) written and read
    if kernel == "sliced":  # every weight, the product table or x per weight
        ptr, packed, slice_rows, _ = m.sliced()
        values = len(m.centroids) * (len(x) + 1) if m.use_table else len(x) + 1
        return packed.nbytes + ptr.nbytes + slice_rows.nbytes + 4 * (values + 2 * len(slice_rows)) + io, m.tensor.nnz
    if kernel == "tiled":  # every weight, padding entries too
        tiles = m._tiles()
        return tiles.nbytes + io, m.tensor.nnz
    rows, cols = m.tensor.rows_cols()
    macs = int(np.isin(cols, active).sum())  # the kept weights of the active columns
    if kernel == "panels":  # the dense layout reads a 64-byte line per active column and 4 panels; blocks: all
        codes, blk_ptr, block_cols = m._panels()
        blocks = codes.nbytes if blk_ptr is not None else len(active) * codes.shape[0] // m.shape[1] * 64
        return blocks + (block_cols.nbytes if block_cols is not None else 0) + io, macs
    starts, ends = m.col_ptr[:, active], m.col_ptr[:, active + 1]
    symbols = int((ends - starts).sum())
    entry_bytes = m.col_gaps.itemsize + m.col_codes.itemsize
    pointer_bytes = 2 * m.col_ptr.itemsize * m.workers * len(active)
    return symbols * entry_bytes + pointer_bytes + io + 8 * m.workers * m.local_rows, macs


def bench_layer(layer, batch: int, repeats: int, rates: dict[str, float]) -> dict:
    """One EIE layer at one batch size: all four implementations, same inputs."""
    tensor = synthetic_layer(layer.outputs, layer.inputs, layer.weight_density, seed=1)
    engine = SparseMatrix(tensor)
    dense = tensor.to_dense()
    torch_csr = dense.to_sparse_csr()
    scipy_csr = scipy.sparse.csr_matrix(dense.numpy())
    x = np.stack([synthetic_activations(layer.inputs, layer.act_density, seed=s) for s in range(batch)])
    xt = torch.from_numpy(x)
    if batch == 1:
        fns = {"engine": lambda: engine.matvec(x[0]), "dense": lambda: torch.mv(dense, xt[0]),
               "torch_csr": lambda: torch.mv(torch_csr, xt[0]), "scipy_csr": lambda: scipy_csr @ x[0]}  # fmt: skip
    else:
        xtt = xt.T.contiguous()
        fns = {"engine": lambda: engine.matmul(x), "dense": lambda: xt @ dense.T,
               "torch_csr": lambda: torch_csr @ xtt, "scipy_csr": lambda: scipy_csr @ x.T}  # fmt: skip
    error = float(np.abs(engine.matmul(x) - (xt @ dense.T).numpy()).max())
    times = median_seconds(fns, repeats)
    row = {"layer": layer.name, "batch": batch, "nnz": tensor.nnz, "max_abs_error": error,
           **{f"{k}_us": v * 1e6 for k, v in times.items()}}  # fmt: skip
    for base in ("dense", "torch_csr", "scipy_csr"):
        row[f"vs_{base}"] = times[base] / times["engine"]
    if batch == 1:
        nbytes, macs = touched(engine, x[0])
        row["bandwidth_fraction"] = nbytes / times["engine"] / 1e9 / rates["bandwidth_gbs"]
        row["arith_fraction"] = 2 * macs / times["engine"] / 1e9 / rates["gflops"]
        row["published_cpu_dense_us"], row["published_cpu_sparse_us"] = PUBLISHED_US[layer.name][:2]
    return row


_COMPILE_PROBE = """
import json, time
import numpy as np
t0 = time.perf_counter()
from deepshrink.engine import SparseMatrix
from deepshrink.hardware import synthetic_layer
m = SparseMatrix(synthetic_layer(256, 256, 0.1))
x = np.ones((16, 256), dtype=np.float32)
out = {"import_s": time.perf_counter() - t0}
for name, fn in (("batch1", lambda: m.matvec(x[0])), ("batch16", lambda: m.matmul(x))):
    t = time.perf_counter(); fn(); first = time.perf_counter() - t
    t = time.perf_counter(); fn(); out[name] = (first, time.perf_counter() - t)
print(json.dumps(out))
"""


def compile_times() -> dict:
    """First call vs second call of each kernel, with an empty numba cache and then a warm one."""
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold cache (compiles)", "warm cache (loads)"):
            done = subprocess.run([sys.executable, "-c", _COMPILE_PROBE], env=env, capture_output=True, text=True,
                                  check=True)  # fmt: skip
            result[label] = json.loads(done.stdout)
    return result


def lenet_file(net: str, path: Path, data_dir: str | None, max_steps: int, console: Console) -> tuple[Path, str]:
    """``path`` if it exists, else the net compressed by its built-in recipe (capped) and saved there.

    Returns the path and where the file came from, for the page.
    """
    if path.is_file():
        return path, f"`{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}` as found"
    from deepshrink.fileformat.model_io import save
    from deepshrink.recipes import load_recipe, run_recipe

    console.print(f"{path} missing: running the {net} recipe with max_steps={max_steps}")
    recipe = load_recipe(net)
    recipe.max_steps = max_steps
    torch.set_num_threads(1)  # small-model training is faster on one thread of a busy machine
    result = run_recipe(recipe, data_dir=data_dir, console=console)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(result["model"], path, factory=MODELS[net])
    return path, f"made here by the built-in recipe capped at {max_steps} training steps per stage"


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    return float((predict(model, images, batch).argmax(1) == labels).float().mean())


def bench_lenet(net: str, path: Path, test: tuple[torch.Tensor, torch.Tensor], images: int, repeats: int) -> dict:
    """Accuracy on all test images (engine fp32 / fixed16 vs decoded) and batch-1 images/s."""
    dense, engine, fixed = decoded_model(path), from_file(path), from_file(path, arithmetic="fixed16")
    x, y = test
    row = {"net": net, "file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
           "file_bytes": path.stat().st_size}  # fmt: skip
    for name, model in (("decoded", dense), ("engine", engine), ("engine_fixed16", fixed)):
        row[f"accuracy_{name}"] = accuracy(model, x, y)
    row["accuracy_engine_batch1_first"] = accuracy(engine, x[:images], y[:images], batch=1)
    row["accuracy_decoded_first"] = accuracy(dense, x[:images], y[:images])
    samples = [x[i : i + 1] for i in range(images)]

    def run_all(model: torch.nn.Module) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                for s in samples:
                    model(s)

        return go

    times = median_seconds({"engine": run_all(engine), "dense": run_all(dense)}, repeats)
    row["engine_images_per_s"] = images / times["engine"]
    row["dense_images_per_s"] = images / times["dense"]
    row["speedup"] = times["dense"] / times["engine"]
    return row


def layer_table(rows: list[dict], batch: int) -> Table:
    table = Table(title=f"EIE layers, batch {batch}: median us per call over runs (ratios = baseline / engine)")
    for col in ("layer", "engine", "dense torch", "x", "torch CSR", "x", "scipy CSR", "x"):
        table.add_column(col, justify="right")
    if batch == 1:
        for col in ("pub. CPU dense", "pub. CPU sparse", "BW frac", "FLOP frac"):
            table.add_column(col, justify="right")
    for r in rows:
        cells = [r["layer"], f"{r['engine_us']:.1f}", f"{r['dense_us']:.1f}", f"{r['vs_dense']:.1f}",
                 f"{r['torch_csr_us']:.1f}", f"{r['vs_torch_csr']:.1f}", f"{r['scipy_csr_us']:.1f}",
                 f"{r['vs_scipy_csr']:.1f}"]  # fmt: skip
        if batch == 1:
            cells += [f"{r['published_cpu_dense_us']:.1f}", f"{r['published_cpu_sparse_us']:.1f}",
                      f"{r['bandwidth_fraction']:.1%}", f"{r['arith_fraction']:.1%}"]  # fmt: skip
        table.add_row(*cells)
    return table


def targets(rows: list[dict], runs: list[list[dict]]) -> list[str]:
    """One line per batch-1 target: the median figure over runs, met or missed, and in how many runs met."""

    def line(layer: str, key: str, label: str, goal: float, median: float) -> str:
        met = sum(r[key] >= goal for run in runs for r in run if r["layer"] == layer and r["batch"] == 1)
        verdict = "met" if median >= goal else "MISSED"
        return f"{layer}: {median:.1f}x vs {label} (target {goal:.0f}x) {verdict}; met in {met} of {len(runs)} runs"

    lines = []
    for r in (r for r in rows if r["batch"] == 1):
        if r["layer"] in TARGET_VS_DENSE:
            lines.append(line(r["layer"], "vs_dense", "dense torch", TARGET_VS_DENSE[r["layer"]], r["vs_dense"]))
        lines.append(line(r["layer"], "vs_torch_csr", "torch.sparse CSR", TARGET_VS_TORCH_CSR, r["vs_torch_csr"]))
    return lines


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """Per (layer, batch), every numeric field's median over the runs (ratios included, each on its own)."""
    out = []
    for rows in zip(*runs):
        row = dict(rows[0])
        for key, value in row.items():
            if isinstance(value, float):
                row[key] = statistics.median(r[key] for r in rows)
        out.append(row)
    return out


def spread(runs: list[list[dict]]) -> list[str]:
    """Markdown rows: each batch-1 layer's lowest and highest ratios over the runs."""
    lines = []
    for rows in zip(*runs):
        if rows[0]["batch"] == 1:
            cells = [f"{min(r[k] for r in rows):.1f} - {max(r[k] for r in rows):.1f}"
                     for k in ("vs_dense", "vs_torch_csr", "vs_scipy_csr")]  # fmt: skip
            lines.append(f"| {rows[0]['layer']} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    """The committed result page."""
    rates, layers = result["machine"], result["layers"]
    out = [
        "# Inference engine benchmark",
        "",
        f"`python benchmarks/bench_engine.py {' '.join(result['argv'])}`, {result['date']}. Machine: "
        f"{result['cpu']}, {result['threads']} threads for every library (torch and numba alike; numba's "
        f"{result['threading_layer']} threading layer); "
        f"measured {rates['bandwidth_gbs']:.1f} GB/s memory bandwidth (torch add, 128 MB arrays) and "
        f"{rates['gflops']:.1f} GFLOP/s fp32 GEMM. Each time is the median over repeats of a block of "
        "back-to-back calls (steady state, as timeit measures: each library's data stays in cache where it "
        "fits), blocks of the libraries interleaved. The machine is shared with other jobs whose load moves "
        f"the ratios from minute to minute, so the layers were measured in {len(result['runs'])} runs one "
        "after another: the tables give each figure's median over the runs, and the spread table the "
        "lowest and highest ratios.",
        "",
        "Weights and activations are random at EIE's published densities (4-bit codes, 16-entry codebook); "
        "published figures are Core i7-5930K + MKL, batch 1 (docs/references.md). Ratios are baseline time / "
        "engine time. BW frac and FLOP frac: bytes the engine's batch-1 kernel touches (gaps, codes, column "
        "pointers, activations) per second, and 2 x multiply-accumulates per second, as fractions of the "
        "measured bandwidth and GEMM rate.",
    ]
    for batch in sorted({r["batch"] for r in layers}):
        rows = [r for r in layers if r["batch"] == batch]
        head = "| layer | engine us | dense torch us | x | torch CSR us | x | scipy CSR us | x |"
        if batch == 1:
            head += " pub. CPU dense us | pub. CPU sparse us | BW frac | FLOP frac |"
        out += ["", f"## EIE layers, batch {batch}", "", head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            line = (f"| {r['layer']} | {r['engine_us']:.1f} | {r['dense_us']:.1f} | {r['vs_dense']:.1f} | "
                    f"{r['torch_csr_us']:.1f} | {r['vs_torch_csr']:.1f} | {r['scipy_csr_us']:.1f} | "
                    f"{r['vs_scipy_csr']:.1f} |")  # fmt: skip
            if batch == 1:
                line += (f" {r['published_cpu_dense_us']:.1f} | {r['published_cpu_sparse_us']:.1f} | "
                         f"{r['bandwidth_fraction']:.1%} | {r['arith_fraction']:.1%} |")  # fmt: skip
            out.append(line)
        out += ["", f"Geometric mean speed-up: {geomean([r['vs_dense'] for r in rows]):.1f}x vs dense torch, "
                f"{geomean([r['vs_torch_csr'] for r in rows]):.1f}x vs torch.sparse CSR, "
                f"{geomean([r['vs_scipy_csr'] for r in rows]):.1f}x vs scipy CSR."]  # fmt: skip
    out += ["", "## Run-to-run spread, batch 1", "", "| layer | x dense torch | x torch CSR | x scipy CSR |",
            "|---|---|---|---|"] + spread(result["runs"])  # fmt: skip
    out += ["", "## Batch-1 targets", ""] + [f"- {line}" for line in targets(layers, result["runs"])]
    out += ["", "## First call (numba compilation) vs steady state", "",
            "| numba cache | import s | batch 1 first / second call s | batch 16 first / second call s |",
            "|---|---|---|---|"]  # fmt: skip
    for label, c in result["compile"].items():
        out.append(f"| {label} | {c['import_s']:.2f} | {c['batch1'][0]:.3f} / {c['batch1'][1]:.5f} | "
                   f"{c['batch16'][0]:.3f} / {c['batch16'][1]:.5f} |")  # fmt: skip
    if result.get("lenet"):
        out += ["", "## End to end: LeNets from their compressed files", "",
                "Accuracy on the 10,000 MNIST test images (batch 1000); images/s at batch 1 over the first "
                f"{result['lenet_images']} test images. Dense torch runs the decoded weights as plain parameters. "
                "Files: " + "; ".join(f"{r['net']} {r['origin']}" for r in result["lenet"]) + ".",
                "", "| net | file bytes | decoded acc | engine acc | engine fixed16 acc | engine img/s | "
                "dense torch img/s | speed-up |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["lenet"]:
            out.append(f"| {r['net']} | {r['file_bytes']:,} | {r['accuracy_decoded']:.2%} | {r['accuracy_engine']:.2%} | "
                       f"{r['accuracy_engine_fixed16']:.2%} | {r['engine_images_per_s']:,.0f} | "
                       f"{r['dense_images_per_s']:,.0f} | {r['speedup']:.2f}x |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_threads(parser)
    parser.add_argument("--repeats", type=int, default=20, help="timed blocks per implementation and run")
    parser.add_argument("--runs", type=int, default=5, help="times the layer suite is measured, one after another")
    parser.add_argument("--layers", nargs="*", help="EIE layer names (default: all nine)")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--no-lenet", action="store_true", help="skip the end-to-end LeNet part")
    parser.add_argument("--lenet-images", type=int, default=500, help="test images timed at batch 1")
    parser.add_argument("--recipe-max-steps", type=int, default=400, help="cap when a LeNet file must be made")
    add_data_dir(parser)
    add_output(parser, publish=True)
    args = parser.parse_args(argv)
    console = Console()
    result = start_run(args, argv)
    result["compile"] = compile_times()
    result["machine"] = machine_rates(args.repeats)
    SparseMatrix(synthetic_layer(512, 512, 0.5)).matvec(np.ones(512, np.float32))  # starts numba's thread pool
    result["threading_layer"] = numba.threading_layer()
    console.print(
        f"bandwidth {result['machine']['bandwidth_gbs']:.1f} GB/s, GEMM {result['machine']['gflops']:.1f} GFLOP/s"
    )
    wanted = [layer for layer in EIE_BENCHMARK_LAYERS if not args.layers or layer.name in args.layers]
    result["runs"] = []
    for _ in track(range(args.runs), description="layer suite runs", console=console):
        result["runs"].append([bench_layer(layer, batch, args.repeats, result["machine"])
                               for batch in args.batches for layer in wanted])  # fmt: skip
    result["layers"] = median_rows(result["runs"])
    for batch in args.batches:
        console.print(layer_table([r for r in result["layers"] if r["batch"] == batch], batch))
    for line in targets(result["layers"], result["runs"]):
        console.print(line)
    if not args.no_lenet:
        from deepshrink.data.mnist import load_mnist

        test = load_mnist(args.data_dir, "test")
        result["lenet_images"] = args.lenet_images
        result["lenet"] = []
        for net in MODELS:
            path, origin = lenet_file(net, Path(args.out_dir) / f"{net}.dsz", args.data_dir, args.recipe_max_steps,
                                      console)  # fmt: skip
            torch.set_num_threads(args.threads)
            result["lenet"].append(bench_lenet(net, path, test, args.lenet_images, max(3, args.repeats // 10)))
            result["lenet"][-1]["origin"] = origin
            console.print(result["lenet"][-1])
    for folder in write_results(args, "engine", result, markdown):
        console.print(f"wrote {folder / 'engine.md'}")


if __name__ == "__main__":
    main()
