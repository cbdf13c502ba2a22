"""Gradual (cubic AGP) against iterative pruning on LeNet-300-100 / real MNIST, at equal training budgets.

One dense LeNet-300-100 is trained. For each target sparsity, a copy is pruned
(fine-grained, the same sparsity in every layer) two ways with the same number
of retraining epochs ``E``:

- iterative (Deep Compression): ``steps`` rounds, each pruning to the next
  level (each round removes the same share of what is left) then retraining
  ``E / steps`` epochs at lr 0.01;
- gradual (Zhu and Gupta's AGP): one ``E``-epoch run at lr 0.01 whose sparsity
  follows the cubic ramp over its first half, pruning every 50 steps, then
  fine-tunes at the final sparsity.

Columns: test accuracy after pruning and retraining, and the wall time of each
(shared 2-core machine, one intra-op thread).

Usage:
    python benchmarks/bench_schedules.py [--data-dir ../shared/data] [--epochs 2] [--sparsities 0.9 0.95 0.98]

Writes ``results/schedules.json`` and ``.md`` (``docs/results/schedules.md`` adds a reading by hand).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from deepshrink.compress.schedules import gradual_prune, iterative_levels
from deepshrink.compress.train import TrainConfig, evaluate, fit, iterative_prune
from deepshrink.data.mnist import load_mnist
from deepshrink.models import lenet_300_100

from common import add_data_dir, add_output, write_results

LR = 0.01  # 1/10 of the dense rate, as Deep Compression retrains LeNets


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(dense: torch.nn.Module, sparsity: float, train, test, epochs: float, steps: int) -> dict:
    """Accuracy and time of iterative and gradual pruning of a copy of ``dense`` to ``sparsity``."""
    iterative = copy.deepcopy(dense)
    round_cfg = TrainConfig(epochs=epochs / steps, lr=LR, batch_size=128, progress=False)
    t_iter = timed(lambda: iterative_prune(iterative, iterative_levels(sparsity, steps), train, round_cfg))
    gradual = copy.deepcopy(dense)
    run_cfg = TrainConfig(epochs=epochs, lr=LR, batch_size=128, progress=False)
    t_grad = timed(lambda: gradual_prune(gradual, sparsity, train, run_cfg, every=50, ramp=0.5))
    acc_iter, acc_grad = evaluate(iterative, test), evaluate(gradual, test)
    return {
        "sparsity": sparsity,
        "iterative acc": acc_iter,
        "gradual acc": acc_grad,
        "gradual - iterative (points)": 100 * (acc_grad - acc_iter),
        "iterative s": t_iter,
        "gradual s": t_grad,
    }


def fmt(key: str, value: float) -> str:
    if key.endswith("acc") or key == "sparsity":
        return f"{value:.4f}"
    return f"{value:+.2f}" if "points" in key else f"{value:.1f}"


def render(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key, justify="right")
    for r in rows:
        table.add_row(*(fmt(k, v) for k, v in r.items()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--dense-epochs", type=float, default=2.0)
    parser.add_argument("--epochs", type=float, default=2.0, help="retraining budget E of each schedule")
    parser.add_argument("--steps", type=int, default=3, help="iterative rounds")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    add_output(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    console = Console()
    train, test = load_mnist(args.data_dir, "train"), load_mnist(args.data_dir, "test")
    start = time.perf_counter()
    dense = lenet_300_100()
    fit(dense, train, TrainConfig(epochs=args.dense_epochs, lr=0.1, batch_size=128, schedule="cosine", progress=False))
    dense_acc = evaluate(dense, test)
    console.print(f"dense LeNet-300-100: accuracy {dense_acc:.4f}")
    rows = []
    for s in args.sparsities:
        rows.append(compare(dense, s, train, test, args.epochs, args.steps))
        console.print(render(rows[-1:], f"sparsity {s}"))
    elapsed = time.perf_counter() - start
    title = f"LeNet-300-100 pruning schedules, {args.epochs:g} retraining epochs each (dense accuracy {dense_acc:.4f})"
    console.print(render(rows, title))
    console.print(f"total {elapsed:.0f} s on a shared 2-core machine")
    result = {"dense_accuracy": dense_acc, "epochs": args.epochs, "steps": args.steps, "rows": rows, "seconds": elapsed}
    write_results(args, "schedules", result, lambda r: page(r, title))
    console.print(f"wrote {Path(args.out_dir) / 'schedules.json'} and .md")


def page(result: dict, title: str) -> str:
    rows = result["rows"]
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    body = "".join("| " + " | ".join(fmt(k, v) for k, v in r.items()) + " |\n" for r in rows)
    return f"{title}; {result['seconds']:.0f} s in all.\n\n{head}{body}"


if __name__ == "__main__":
    main()
