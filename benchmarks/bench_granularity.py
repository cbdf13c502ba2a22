"""Granularity of sparsity on LeNet-5 / real MNIST, and trained ternary quantization beside it.

One dense LeNet-5 is trained; each granularity then prunes a copy to the same
per-layer sparsities (conv1 50%, conv2 75%, fc1 90% at that grain; fc2, whose
filters are the classes, fine-grained at 50%) with gradual pruning, shares
weights (8-bit conv, 5-bit fc) and fine-tunes briefly. A fully connected weight
is a conv with 1x1 kernels, so "vector" and "kernel" prune the fc layers
fine-grained; "filter" removes whole output channels and neurons, "channel"
whole input channels of conv2 (so whole conv1 filters) and input columns of
fc1. :func:`deepshrink.compress.surgery.shrink` turns each model into plain dense
modules without the channels pruning emptied.

Columns: test accuracy; weights kept; bytes of the .dsz file (Huffman, 8-bit
conv / 5-bit fc relative indices, one index per kept weight as the file stores
them); index bits per kept weight vs. per kept group (one index per kept
vector / kernel / filter, what a grain-aware format would store); and dense
PyTorch time per batch of those shrunk models (a masked model is as slow as
the dense one), with the speed-up over the dense model timed round-robin in
the same run.

The ternary rows ternarize conv2 and fc1 (the paper keeps the first and last
layers in full precision) or all four layers, at t = 0.05, and train scales
and latent weights with Adam.

Timings on a shared 2-core machine; training uses one intra-op thread (two
threads spinning against other processes were ~30x slower on small models).

Usage:
    python benchmarks/bench_granularity.py [--data-dir ../shared/data] [--epochs 1] [--out-dir results]

Writes ``results/granularity.json`` and ``.md`` (``docs/results/granularity.md`` adds a reading by hand).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from deepshrink.compress.groups import group_index_bits
from deepshrink.compress.quantize import compressed_tensors, share_weights_
from deepshrink.compress.schedules import gradual_prune
from deepshrink.compress.surgery import shrink
from deepshrink.compress.targets import find_targets, resolve_per_layer
from deepshrink.compress.ternary import ternarize_
from deepshrink.compress.train import TrainConfig, evaluate, fit
from deepshrink.data.mnist import load_mnist
from deepshrink.fileformat.model_io import save
from deepshrink.models import lenet_5

from common import add_data_dir, add_output, write_results

SPARSITY = {"conv1": 0.5, "conv2": 0.75, "fc1": 0.9, "fc2": 0.5}
SCHEMES = {  # granularity per layer; fc2's filters are the 10 classes, so it is always fine-grained
    "fine": {"*": "fine"},
    "vector": {"conv*": "vector", "fc*": "fine"},
    "kernel": {"conv*": "kernel", "fc*": "fine"},
    "filter": {"conv*": "filter", "fc1": "filter", "fc2": "fine"},
    # conv1 has one input channel (the image); fc1's "channels" are its 800 single input columns
    "channel": {"conv1": "fine", "conv2": "channel", "fc1": "channel", "fc2": "fine"},
}
INDEX_BITS = {"conv": 8, "fc": 5}  # Deep Compression's relative-index widths
BITS = {"conv": 8, "fc": 5}  # Deep Compression's weight-sharing widths


def time_forward(
    models: dict[str, torch.nn.Module], batch: torch.Tensor, rounds: int = 5, repeats: int = 10
) -> dict[str, float]:
    """Best milliseconds of one forward pass of each model, timed round-robin.

    Interleaving the models spreads the load of a shared machine evenly over
    them, so their ratios mean something even when absolute times drift.
    """
    best = {name: float("inf") for name in models}
    with torch.no_grad():
        for model in models.values():
            model.eval()(batch)
        for _ in range(rounds):
            for name, model in models.items():
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(batch)
                    best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1e3 * t for name, t in best.items()}


def index_bits(model: torch.nn.Module, scheme: dict[str, str]) -> tuple[int, int]:
    """Relative-index bits with one index per kept weight, and per kept group of the scheme's grain."""
    per_weight = per_group = 0
    targets = find_targets(model)
    grains = resolve_per_layer(scheme, targets, "granularity")
    tensors = compressed_tensors(model)
    for t in targets:
        width = INDEX_BITS[t.kind]
        per_weight += tensors[t.name].fixed_width_bits(width)["index"]
        per_group += group_index_bits(t.weight.detach() != 0, grains[t.name] or "fine", width)
    return per_weight, per_group


def run_scheme(name: str, dense: torch.nn.Module, train, test, args, tmp: Path) -> tuple[dict, torch.nn.Module]:
    model = copy.deepcopy(dense)
    cfg = TrainConfig(epochs=args.epochs / 2, lr=0.01, batch_size=128, schedule="cosine", progress=False)
    gradual_prune(model, SPARSITY, train, cfg, every=20, ramp=0.5, granularity=SCHEMES[name])
    pruned_acc = evaluate(model, test)
    share_weights_(model, BITS)
    fit(model, train, TrainConfig(epochs=args.epochs / 10, lr=0.001, batch_size=128, progress=False))
    per_weight, per_group = index_bits(model, SCHEMES[name])
    path = tmp / f"lenet5-{name}.dsz"
    size = save(model, path, coder="huffman", index_bits={t.name: INDEX_BITS[t.kind] for t in find_targets(model)})
    kept = sum(int((t.weight != 0).sum()) for t in find_targets(model))
    runnable = shrink(model, test[0][:256])  # plain dense modules, without the channels pruning emptied
    row = {
        "granularity": name,
        "pruned acc": pruned_acc,
        "accuracy": evaluate(model, test),
        "kept": kept,
        "file bytes": size,
        "index bits/weight": per_weight,
        "index bits/group": per_group,
        "dense params": sum(p.numel() for p in runnable.parameters()),
    }
    return row, runnable


def ternary_row(label: str, dense: torch.nn.Module, layers, train, test, args, tmp: Path) -> dict:
    model = copy.deepcopy(dense)
    ternarize_(model, 0.05, layers=layers)
    start_acc = evaluate(model, test)
    fit(
        model,
        train,
        TrainConfig(
            epochs=args.epochs / 2, lr=0.001, optimizer="adam", batch_size=128, schedule="cosine", progress=False
        ),
    )
    size = save(model, tmp / f"ternary-{label}.dsz", coder="huffman")
    nonzero = sum(int((t.weight != 0).sum()) for t in find_targets(model))
    return {
        "ternary layers": label,
        "accuracy after ternarize": start_acc,
        "accuracy": evaluate(model, test),
        "non-zero weights": nonzero,
        "file bytes": size,
    }


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1 else f"{value:.3f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for key in rows[0]:
        t.add_column(key, justify="left" if isinstance(rows[0][key], str) else "right")
    for r in rows:
        t.add_row(*(fmt(v) for v in r.values()))
    return t


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    return head + "".join("| " + " | ".join(fmt(v) for v in r.values()) + " |\n" for r in rows)


def page(result: dict) -> str:
    base = result["dense_ms"]
    return (
        f"Dense LeNet-5: accuracy {result['dense_accuracy']:.4f}, {result['fp32_bytes']:,} fp32 bytes; "
        f"{base['b1']:.3f} ms at batch 1, {base['b256']:.2f} ms at batch 256; {result['seconds']:.0f} s in all.\n\n"
        + markdown(result["granularity"])
        + "\n"
        + markdown(result["ternary"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--epochs", type=float, default=1.0, help="dense training; pruning runs half of it")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    add_output(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    console = Console(width=180)  # the tables are wide; logs should hold them whole
    train, test = load_mnist(args.data_dir, "train"), load_mnist(args.data_dir, "test")
    out = Path(args.out_dir)  # the .dsz files too
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    dense = lenet_5()
    fit(dense, train, TrainConfig(epochs=args.epochs, lr=0.05, batch_size=128, schedule="cosine", progress=False))
    dense_acc = evaluate(dense, test)
    console.print(f"dense LeNet-5: accuracy {dense_acc:.4f}")

    rows, runnables = [], {"dense": dense}
    for name in SCHEMES:
        row, runnables[name] = run_scheme(name, dense, train, test, args, out)
        rows.append(row)
        console.print(table(rows[-1:], name))
    b1 = time_forward(runnables, test[0][:1])
    b256 = time_forward(runnables, test[0][:256])
    base = {"b1": b1["dense"], "b256": b256["dense"]}
    for row in rows:
        name = row["granularity"]
        row.update({"ms b1": b1[name], "ms b256": b256[name], "speed-up b256": base["b256"] / b256[name]})
    ternary = [
        ternary_row("conv2+fc1", dense, ["conv2", "fc1"], train, test, args, out),
        ternary_row("all", dense, None, train, test, args, out),
    ]
    elapsed = time.perf_counter() - start

    fp32_bytes = 4 * sum(p.numel() for p in dense.parameters())
    console.print(table(rows, f"LeNet-5 granularity (dense accuracy {dense_acc:.4f}, {fp32_bytes:,} fp32 bytes)"))
    console.print(table(ternary, "LeNet-5 trained ternary quantization (t = 0.05)"))
    console.print(f"total {elapsed:.0f} s on a shared 2-core machine")
    result = {
        "dense_accuracy": dense_acc,
        "dense_ms": base,
        "fp32_bytes": fp32_bytes,
        "sparsity": SPARSITY,
        "epochs": args.epochs,
        "granularity": rows,
        "ternary": ternary,
        "seconds": elapsed,
    }
    write_results(args, "granularity", result, page)
    console.print(f"wrote {out / 'granularity.json'} and .md")


if __name__ == "__main__":
    main()
