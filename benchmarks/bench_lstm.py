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

Run from the repository root: ``python benchmarks/bench_lstm.py`` (about 10-15 minutes on
two free cores; the dense model is cached, so later runs skip step 1). Writes
``results/lstm.json`` and ``results/lstm.md``; the committed copy is ``docs/results/lstm.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from deepshrink.balance import load_balance, prune_balanced_
from deepshrink.data.fsdd import load_fsdd
from deepshrink.engine.lstm import SparseLSTM
from deepshrink.engine.matrix import SparseMatrix
from deepshrink.fileformat import load, save
from deepshrink.hardware import EIEConfig, simulate_network
from deepshrink.models import lstm_classifier
from deepshrink.prune import prune_, sparsity_schedule
from deepshrink.quantize import compressed_tensors, share_weights_
from deepshrink.train import TrainConfig, evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
ESE_CLOCK_HZ = 200e6  # ESE on the XCKU060 FPGA runs at 200 MHz (Han et al., FPGA 2017; docs/reference.md)
MODEL_KWARGS = {"n_features": 40, "hidden": 256, "layers": 1, "dropout": 0.2}
console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("DEEPSHRINK_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--cache", default=str(ROOT / "runs" / "lstm"), help="dense model and .dsz files (git-ignored)")
    p.add_argument("--sparsity", type=float, default=0.91, help="final sparsity of the LSTM gate matrices")
    p.add_argument("--fc-sparsity", type=float, default=0.8, help="final sparsity of the 256x10 head")
    p.add_argument("--bits", type=int, default=4, help="bits per gate code (EIE: 4)")
    p.add_argument("--n-pe", type=int, default=32, help="PEs the rows are interleaved over (pruning and simulator)")
    p.add_argument("--dense-epochs", type=int, default=15)
    p.add_argument("--prune-steps", type=int, default=3)
    p.add_argument("--retrain-epochs", type=float, default=1.0, help="after each pruning round and after sharing")
    p.add_argument("--sim-utterances", type=int, default=30, help="test utterances run through the simulator")
    p.add_argument("--latency-utterances", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true",
                   help="load the compressed models of an earlier run from --cache instead of compressing again")
    return p.parse_args(argv)


def train_config(epochs: float, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, optimizer="adam", weight_decay=0.0, batch_size=64,
                       schedule="cosine", seed=seed, progress=sys.stdout.isatty())


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


def compress(dense: torch.nn.Module, train: tuple, args: argparse.Namespace, balanced: bool) -> torch.nn.Module:
    """Iterative pruning (plain or balanced), weight sharing, centroid fine-tuning, on a copy."""
    model = copy.deepcopy(dense)
    for i, (s, s_fc) in enumerate(zip(sparsity_schedule(args.sparsity, args.prune_steps),
                                      sparsity_schedule(args.fc_sparsity, args.prune_steps))):
        per_layer = {"lstm": s, "fc.weight": s_fc}
        if balanced:
            prune_balanced_(model, per_layer, args.n_pe)
        else:
            prune_(model, per_layer)
        fit(model, train, train_config(args.retrain_epochs, 1e-3, args.seed + i),
            description=f"{'balanced' if balanced else 'plain'} prune {i + 1}/{args.prune_steps}")
    share_weights_(model, bits={"lstm": args.bits, "fc.weight": 5})
    fit(model, train, train_config(args.retrain_epochs, 3e-4, args.seed), description="fine-tune centroids")
    return model


def engine_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Classify every utterance at batch 1 on the sparse LSTM engine and a sparse head."""
    lstm = SparseLSTM.from_module(model.lstm)
    head = SparseMatrix(compressed_tensors(model)["fc.weight"], workers=1)
    bias = model.fc.bias.detach().numpy()
    return np.stack([head.matvec(lstm.forward(u)[1][-1]) + bias for u in x.numpy()])


def median_latency_us(fn, inputs: list, repeats: int = 3) -> float:
    """Median over utterances of the best of ``repeats`` runs (the machine is shared)."""
    times = []
    for u in inputs:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(u)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return statistics.median(times) * 1e6


def latency(dense: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, n: int) -> dict[str, float]:
    """Per-utterance LSTM latency at batch 1: dense torch.nn.LSTM vs the sparse engine, one thread each."""
    engine = SparseLSTM.from_module(model.lstm)
    utterances = list(x[:n])
    arrays = [u.numpy() for u in utterances]
    engine.forward(arrays[0])  # compile / load the numba cache outside the timing
    with torch.inference_mode():
        dense_us = median_latency_us(lambda u: dense.lstm(u), utterances)
    engine_us = median_latency_us(engine.forward, arrays)
    return {"torch_dense_us": dense_us, "engine_us": engine_us, "speedup": dense_us / engine_us}


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
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("data_dir", "cache")},
               "model": MODEL_KWARGS, "dense": {"accuracy": evaluate(dense, test), "bytes": dense_bytes,
                                                "train_seconds": train_s}}
    for mode in ("plain", "balanced"):
        start = time.perf_counter()
        path = cache / f"{mode}.dsz"
        if args.reuse and path.is_file():
            model = load(path).eval()
        else:
            model = compress(dense, train, args, balanced=mode == "balanced").eval()
        weights, kept = weight_counts(model)
        nbytes = save(model, path, factory="deepshrink.models:lstm_classifier", factory_kwargs=MODEL_KWARGS)
        logits = engine_logits(model, test[0])
        with torch.inference_mode():
            torch_logits = model(test[0]).numpy()
        results[mode] = {
            "accuracy": evaluate(model, test), "weights": weights, "kept": kept, "bytes": nbytes,
            "engine_accuracy": float((logits.argmax(1) == test[1].numpy()).mean()),
            "engine_max_abs_diff": float(np.abs(logits - torch_logits).max()),
            "compress_seconds": time.perf_counter() - start,
            **simulate(model, test[0], args),
        }
        if mode == "balanced":
            results["latency"] = latency(dense, model, test[0], args.latency_utterances)
    return results


def table(results: dict) -> Table:
    d = results["dense"]
    t = Table(title=f"LSTM on FSDD: dense vs compressed (sim: {results['settings']['n_pe']} PEs at 200 MHz)")
    for col in ("model", "test acc", "weights kept", "file bytes", "vs dense file", "PE balance",
                "sim cycles/utt", "sim load eff.", "sim us/utt"):
        t.add_column(col, justify="right" if col != "model" else "left")
    t.add_row("dense", f"{d['accuracy']:.2%}", "100%", f"{d['bytes']:,}", "1.0x", "", "", "", "")
    for mode in ("plain", "balanced"):
        r = results[mode]
        t.add_row(f"{mode} pruning", f"{r['accuracy']:.2%}", f"{r['kept'] / r['weights']:.1%} "
                  f"({r['weights'] / r['kept']:.1f}x)", f"{r['bytes']:,}", f"{d['bytes'] / r['bytes']:.1f}x",
                  f"{r['pe_balance']:.3f}", f"{r['cycles_per_utterance']:,.0f}", f"{r['load_efficiency']:.1%}",
                  f"{r['us_per_utterance']:.1f}")
    return t


def markdown(results: dict) -> str:
    d, lat = results["dense"], results["latency"]
    lines = [
        "# LSTM on spoken digits (ESE)", "",
        "`python benchmarks/bench_lstm.py` on the Free Spoken Digit Dataset (official split: 2,700 train, "
        "300 test), 41 frames x 40 log-mel per utterance, LSTM 40->256 (1 layer) + linear head. "
        f"Settings: `{json.dumps(results['settings'])}`.", "",
        "| model | test accuracy | weights kept | .dsz bytes | vs dense file | PE balance (mean/max) | "
        "sim cycles / utterance | sim load efficiency | sim us / utterance |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | {d['accuracy']:.2%} | 100% | {d['bytes']:,} | 1.0x | | | | |",
    ]
    for mode in ("plain", "balanced"):
        r = results[mode]
        lines.append(
            f"| {mode} pruning | {r['accuracy']:.2%} | {r['kept'] / r['weights']:.1%} "
            f"({r['weights'] / r['kept']:.1f}x fewer) | {r['bytes']:,} | {d['bytes'] / r['bytes']:.1f}x | "
            f"{r['pe_balance']:.3f} | {r['cycles_per_utterance']:,.0f} | {r['load_efficiency']:.1%} | "
            f"{r['us_per_utterance']:.1f} |")
    b = results["balanced"]
    lines += [
        "", f"Sparse LSTM engine (balanced model, batch 1, step by step): test accuracy "
        f"{b['engine_accuracy']:.2%}, largest logit difference to the decoded PyTorch model "
        f"{b['engine_max_abs_diff']:.2e}.", "",
        f"Latency per utterance (LSTM only, median of {results['settings']['latency_utterances']} test "
        f"utterances, one thread each): dense `torch.nn.LSTM` {lat['torch_dense_us']:.0f} us, sparse engine "
        f"{lat['engine_us']:.0f} us, **{lat['speedup']:.1f}x**.", "",
        "Simulator: EIE cycle model (`deepshrink.hardware`) with ESE's clock, rows interleaved over the PEs, "
        "4-bit relative indices, FIFO depth 8, real activations (x_t for W_ih, h_t-1 for W_hh) of "
        f"{results['settings']['sim_utterances']} test utterances. Timings were taken on a shared two-core "
        "machine with other jobs running; they vary from run to run.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    console.print(table(results))
    lat = results["latency"]
    console.print(f"latency per utterance: torch.nn.LSTM dense {lat['torch_dense_us']:.0f} us, "
                  f"sparse engine {lat['engine_us']:.0f} us ({lat['speedup']:.1f}x)")
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "lstm.json").write_text(json.dumps(results, indent=2))
    (out / "lstm.md").write_text(markdown(results))
    console.print(f"wrote {out / 'lstm.json'} and {out / 'lstm.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
