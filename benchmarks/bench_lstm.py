"""ESE on spoken digits: compress an LSTM with plain vs load-balance-aware pruning, run and simulate it.

Steps (all on the real Free Spoken Digit Dataset, official split):

1. Train (or load from ``--cache``) a dense LSTM digit classifier on log-mel sequences.
2. Twice, from the same dense weights: iterative magnitude pruning to ``--sparsity``
   (plain per-layer, or load-balance-aware over ``--n-pe`` PEs), fine-tuning after each
   round; 4-bit weight sharing of the gates; centroid fine-tuning.
3. Sizes in our file format (``.dsz``, Huffman-coded) against the dense model's file.
4. The sparse LSTM engine (batch 1, step by step) against the decoded model (same
   logits) and its latency per utterance against dense ``torch.nn.LSTM``.
5. Cycles per utterance on the EIE/ESE simulator with and without load balancing.

Run from the repository root: ``python benchmarks/bench_lstm.py``. On our shared two-core
machine: dense training ~9 min (then cached in ``--cache``), compression ~7 min (the two
modes in parallel, one thread each), evaluation, simulation and timing ~3 min;
``--reuse`` skips compression when ``plain.dsz`` and ``balanced.dsz`` are in the cache.
Writes ``results/lstm.json`` and ``results/lstm.md`` (``docs/results/lstm.md`` is that page
with a reading added by hand).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numba
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from deepshrink.compress.balance import load_balance, prune_balanced_
from deepshrink.compress.prune import prune_, sparsity_schedule
from deepshrink.compress.quantize import compressed_tensors, share_weights_
from deepshrink.compress.train import TrainConfig, evaluate, fit
from deepshrink.data.fsdd import load_fsdd
from deepshrink.engine.lstm import SparseLSTM
from deepshrink.engine.matrix import SparseMatrix
from deepshrink.fileformat.model_io import load, read, save
from deepshrink.hardware import EIEConfig, simulate_network
from deepshrink.models import lstm_classifier

from common import ROOT, add_data_dir, add_output, write_results

ESE_CLOCK_HZ = 200e6  # ESE on the XCKU060 FPGA runs at 200 MHz (Han et al., FPGA 2017; docs/references.md)
MODEL_KWARGS = {"n_features": 40, "hidden": 256, "layers": 1, "dropout": 0.2}
console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(p)
    add_output(p)
    p.add_argument("--cache", default=str(ROOT / "runs" / "lstm"), help="dense model and .dsz files (git-ignored)")
    p.add_argument("--sparsity", type=float, default=0.935, help="final sparsity of W_hh (the recurrent gates)")
    p.add_argument("--ih-sparsity", type=float, default=0.7, help="final sparsity of W_ih (the input gates)")
    p.add_argument("--fc-sparsity", type=float, default=0.8, help="final sparsity of the 256x10 head")
    p.add_argument("--bits", type=int, default=4, help="bits per gate code (EIE: 4)")
    p.add_argument("--n-pe", type=int, default=32, help="PEs the rows are interleaved over (pruning and simulator)")
    p.add_argument("--dense-epochs", type=int, default=15)
    p.add_argument("--prune-steps", type=int, default=5)
    p.add_argument("--retrain-epochs", type=float, default=2.0, help="after each pruning round but the last")
    p.add_argument("--final-epochs", type=float, default=8.0, help="after the last pruning round")
    p.add_argument("--share-epochs", type=float, default=2.0, help="centroid fine-tuning after weight sharing")
    p.add_argument("--sim-utterances", type=int, default=30, help="test utterances run through the simulator")
    p.add_argument("--latency-utterances", type=int, default=100)
    p.add_argument(
        "--latency-runs",
        type=int,
        default=5,
        help="latency measured this many times in a row (the machine's load drifts): median and range",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="load the compressed models of an earlier run from --cache instead of compressing again",
    )
    return p.parse_args(argv)


def train_config(epochs: float, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        lr=lr,
        optimizer="adam",
        weight_decay=0.0,
        batch_size=64,
        schedule="cosine",
        seed=seed,
        progress=sys.stdout.isatty(),
    )


def dense_model(args: argparse.Namespace, train: tuple) -> tuple[torch.nn.Module, float]:
    """The trained dense classifier, from the cache when it holds one for these settings."""
    path = Path(args.cache) / f"dense-h{MODEL_KWARGS['hidden']}-e{args.dense_epochs}-s{args.seed}.pt"
    torch.manual_seed(args.seed)
    model = lstm_classifier(**MODEL_KWARGS)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, 0.0
    start = time.perf_counter()
    fit(model, train, train_config(args.dense_epochs, 3e-3, args.seed), description="train dense")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, time.perf_counter() - start


def compress(args: argparse.Namespace, mode: str) -> None:
    """Iterative pruning (plain or balanced), weight sharing, centroid fine-tuning; saves ``{mode}.dsz``.

    Runs in its own process (one per mode, in parallel), so it reloads the data and the dense
    model; the stage accuracies go into the file's metadata.
    """
    torch.set_num_threads(1)
    start = time.perf_counter()
    train, test = load_fsdd(args.data_dir, "train"), load_fsdd(args.data_dir, "test")
    model, _ = dense_model(args, train)
    finals = (args.sparsity, args.ih_sparsity, args.fc_sparsity)
    schedules = zip(*(sparsity_schedule(s, args.prune_steps) for s in finals))
    for i, (s_hh, s_ih, s_fc) in enumerate(schedules):
        per_layer = {"lstm.weight_hh_*": s_hh, "lstm.weight_ih_*": s_ih, "fc.weight": s_fc}
        if mode == "balanced":
            prune_balanced_(model, per_layer, args.n_pe)
        else:
            prune_(model, per_layer)
        epochs = args.final_epochs if i == args.prune_steps - 1 else args.retrain_epochs
        fit(
            model,
            train,
            train_config(epochs, 1e-3, args.seed + i),
            description=f"{mode} prune {i + 1}/{args.prune_steps}",
        )
    pruned_accuracy = evaluate(model, test)
    share_weights_(model, bits={"lstm": args.bits, "fc.weight": 5})
    shared_accuracy = evaluate(model, test)
    fit(model, train, train_config(args.share_epochs, 3e-4, args.seed), description="fine-tune centroids")
    stages = {
        "pruned_accuracy": pruned_accuracy,
        "shared_accuracy": shared_accuracy,
        "compress_seconds": time.perf_counter() - start,
    }
    # The stage figures travel in the file's metadata, so --reuse reports them too.
    save(
        model,
        Path(args.cache) / f"{mode}.dsz",
        factory="deepshrink.models:lstm_classifier",
        factory_kwargs=MODEL_KWARGS,
        metadata=stages,
    )


def engine_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Classify every utterance at batch 1 on the sparse LSTM engine and a sparse head."""
    lstm = SparseLSTM.from_module(model.lstm)
    head = SparseMatrix(compressed_tensors(model)["fc.weight"], workers=1)
    bias = model.fc.bias.detach().numpy()
    return np.stack([head.matvec(lstm.forward(u)[1][-1]) + bias for u in x.numpy()])


def timed(fn, arg) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.thread_time()
    fn(arg)
    return time.perf_counter() - w0, time.thread_time() - c0


def latency(dense: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, n: int, back_to_back: bool,
            repeats: int = 5) -> dict:  # fmt: skip
    """Per-utterance LSTM latency at batch 1: dense torch.nn.LSTM vs the sparse engine, one thread each.

    Each utterance runs ``repeats`` times per library, either each library's runs
    back to back (its data stays in the caches, as when utterances stream through one
    model: steady state, as ``timeit`` and benchmarks/bench_engine.py measure) or
    alternating call by call (each run starts after the other library's has evicted
    the caches). Both libraries see the same machine load either way; each gets the
    fastest of its runs, then the median over utterances. Wall clock is latency; the
    thread's CPU time of the same runs shows how much was waiting.
    """
    engine = SparseLSTM.from_module(model.lstm)
    utterances = list(x[:n])
    engine.forward(utterances[0].numpy())  # compile / load the numba cache outside the timing
    best = {"torch_dense": [], "engine": []}
    with torch.inference_mode():
        dense.lstm(utterances[0])
        for u in utterances:
            array = u.numpy()
            calls = {"torch_dense": lambda: timed(dense.lstm, u), "engine": lambda: timed(engine.forward, array)}  # noqa: B023 (called in this iteration)
            if back_to_back:
                runs = {name: [call() for _ in range(repeats)] for name, call in calls.items()}
            else:
                runs = {name: [] for name in calls}
                for _ in range(repeats):
                    for name, call in calls.items():
                        runs[name].append(call())
            for name, times in runs.items():
                best[name].append(min(times))
    out = {}
    for i, clock in enumerate(("wall", "cpu")):
        dense_us, engine_us = (statistics.median(t[i] for t in best[k]) * 1e6 for k in ("torch_dense", "engine"))
        out[clock] = {"torch_dense_us": dense_us, "engine_us": engine_us, "speedup": dense_us / engine_us}
    return out


#: Latency orders (see latency): the first is the headline figure.
LATENCY_ORDERS = {"back to back": True, "alternating": False}


def latency_runs(dense: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace) -> dict:
    """:func:`latency` ``args.latency_runs`` times per order: the median run and every run's speed-up."""
    result = {}
    for order, back_to_back in LATENCY_ORDERS.items():
        runs = [latency(dense, model, x, args.latency_utterances, back_to_back) for _ in range(args.latency_runs)]
        runs.sort(key=lambda r: r["wall"]["speedup"])
        result[order] = {"median_run": runs[len(runs) // 2], "speedups": [r["wall"]["speedup"] for r in runs]}
    return result


def simulate(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """ESE-style cycles per utterance for the LSTM gate matrices (real activations)."""
    tensors = {k: v for k, v in compressed_tensors(model).items() if k.startswith("lstm.")}
    engine = SparseLSTM.from_module(model.lstm)
    config = EIEConfig(n_pe=args.n_pe, clock_hz=ESE_CLOCK_HZ)
    cycles, ideal, efficiency = [], [], []
    for u in x[: args.sim_utterances].numpy():
        result = simulate_network(tensors, engine.activations(u, prefix="lstm."), config=config)
        cycles.append(result.cycles)
        ideal.append(sum(layer.ideal_cycles for layer in result.layers))
        busy = sum(int(layer.pe_busy_cycles.sum()) for layer in result.layers)
        efficiency.append(busy / (args.n_pe * result.cycles))
    return {
        "cycles_per_utterance": float(np.mean(cycles)),
        "ideal_cycles_per_utterance": float(np.mean(ideal)),
        "load_efficiency": float(np.mean(efficiency)),
        "us_per_utterance": float(np.mean(cycles)) / ESE_CLOCK_HZ * 1e6,
        "pe_balance": min(load_balance(t, args.n_pe) for t in tensors.values()),
    }


def weight_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(weights, kept) over the compressed weight matrices (biases excluded, as in the papers)."""
    tensors = compressed_tensors(model)
    return sum(t.numel for t in tensors.values()), sum(t.nnz for t in tensors.values())


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)  # two threads on a shared two-core machine spin-wait: 5-15x slower
    numba.set_num_threads(1)
    torch.manual_seed(args.seed)
    train = load_fsdd(args.data_dir, "train")
    test = load_fsdd(args.data_dir, "test")
    cache = Path(args.cache)
    dense, train_s = dense_model(args, train)
    dense.eval()
    dense_bytes = save(dense, cache / "dense.dsz")
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("data_dir", "cache", "out_dir")},
        "model": MODEL_KWARGS,
        "dense": {"accuracy": evaluate(dense, test), "bytes": dense_bytes, "train_seconds": train_s},
    }
    modes = ("plain", "balanced")
    if not (args.reuse and all((cache / f"{m}.dsz").is_file() for m in modes)):
        # One process per mode: each trains on one thread, so the two run side by side.
        with ProcessPoolExecutor(len(modes), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(compress, [args] * len(modes), modes))
    for mode in modes:
        path = cache / f"{mode}.dsz"
        stages = read(path).metadata or {}
        model = load(path).eval()
        weights, kept = weight_counts(model)
        logits = engine_logits(model, test[0])
        with torch.inference_mode():
            torch_logits = model(test[0]).numpy()
        results[mode] = {
            "accuracy": evaluate(model, test),
            "weights": weights,
            "kept": kept,
            "bytes": path.stat().st_size,
            "engine_accuracy": float((logits.argmax(1) == test[1].numpy()).mean()),
            "engine_max_abs_diff": float(np.abs(logits - torch_logits).max()),
            **stages,
            **simulate(model, test[0], args),
        }
        if mode == "balanced":
            results["latency"] = latency_runs(dense, model, test[0], args)
    return results


COLUMNS = (
    "model",
    "test acc",
    "pruned / shared acc",
    "weights kept",
    ".dsz bytes",
    "vs dense file",
    "PE balance",
    "sim cycles/utt",
    "sim load eff.",
    "sim us/utt",
)


def rows(results: dict) -> list[list[str]]:
    """The comparison table's cells, shared by the terminal and the markdown output."""
    d = results["dense"]
    out = [["dense", f"{d['accuracy']:.2%}", "", "100%", f"{d['bytes']:,}", "1.0x", "", "", "", ""]]
    for mode in ("plain", "balanced"):
        r = results[mode]
        stages = f"{r['pruned_accuracy']:.2%} / {r['shared_accuracy']:.2%}" if "pruned_accuracy" in r else "(reused)"
        out.append(
            [
                f"{mode} pruning",
                f"{r['accuracy']:.2%}",
                stages,
                f"{r['kept'] / r['weights']:.1%} ({r['weights'] / r['kept']:.1f}x fewer)",
                f"{r['bytes']:,}",
                f"{d['bytes'] / r['bytes']:.1f}x",
                f"{r['pe_balance']:.3f}",
                f"{r['cycles_per_utterance']:,.0f}",
                f"{r['load_efficiency']:.1%}",
                f"{r['us_per_utterance']:.1f}",
            ]
        )
    return out


def table(results: dict) -> Table:
    t = Table(title=f"LSTM on FSDD: dense vs compressed (sim: {results['settings']['n_pe']} PEs at 200 MHz)")
    for col in COLUMNS:
        t.add_column(col, justify="left" if col == "model" else "right")
    for row in rows(results):
        t.add_row(*row)
    return t


def latency_line(lat: dict) -> str:
    """Each order's median run and the range of the speed-ups over the runs."""
    lines = []
    for order, result in lat.items():
        clocks = "; ".join(
            f"{clock} time: dense torch.nn.LSTM {v['torch_dense_us']:.0f} us, sparse engine "
            f"{v['engine_us']:.0f} us, {v['speedup']:.2f}x"
            for clock, v in result["median_run"].items()
        )
        speedups = result["speedups"]
        lines.append(
            f"{order}: {clocks} (median of {len(speedups)} runs; wall-clock speed-up "
            f"{min(speedups):.2f}-{max(speedups):.2f}x over the runs)"
        )
    return "; ".join(lines)


def markdown(results: dict) -> str:
    b = results["balanced"]
    lines = [
        "# LSTM on spoken digits (ESE)",
        "",
        "`python benchmarks/bench_lstm.py` on the Free Spoken Digit Dataset (official split: 2,700 train, "
        "300 test), 41 frames x 40 log-mel per utterance, LSTM 40->256 (1 layer) + linear head on the last step. "
        f"Settings: `{json.dumps(results['settings'])}`.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in rows(results)),
        "",
        f"Sparse LSTM engine (balanced model, batch 1, step by step): test accuracy "
        f"{b['engine_accuracy']:.2%}, largest logit difference to the decoded PyTorch model "
        f"{b['engine_max_abs_diff']:.2e}.",
        "",
        f"Latency per utterance (LSTM only, balanced model, one thread each; median over "
        f"{results['settings']['latency_utterances']} test utterances of the fastest of 5 runs each; each "
        "library's runs back to back, warm caches as when utterances stream through, or alternating call by "
        "call, each run after the other library's; the whole measured several times one after another): "
        f"{latency_line(results['latency'])}.",
        "",
        "Simulator: EIE cycle model (`deepshrink.hardware`) at ESE's 200 MHz, rows interleaved over the PEs, "
        "4-bit relative indices, FIFO depth 8, real activations (x_t for W_ih, h_t-1 for W_hh) of "
        f"{results['settings']['sim_utterances']} test utterances; PE balance is the worst gate matrix's "
        "mean/max weights per PE. Timings were taken on a shared two-core machine with other jobs running; "
        "they vary from run to run.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    console.print(table(results))
    console.print("latency per utterance: " + latency_line(results["latency"]))
    write_results(args, "lstm", results, markdown)
    console.print(f"wrote {Path(args.out_dir) / 'lstm.json'} and lstm.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
