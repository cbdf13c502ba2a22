"""Character LSTM on tinyshakespeare: perplexity against sparsity, and text before and after pruning.

Trains a dense character model (embedding 64, LSTM 256, linear read-out; cached in
``--cache``), then prunes it step by step to each sparsity of ``--sparsities`` (the LSTM
gates and the read-out; the embedding too), retraining briefly after each step, and
reports validation perplexity and a sample of generated text, as the seed's caption
examples do. Writes ``results/charlm.json`` and ``results/charlm.md`` (``docs/results/charlm.md`` is that
page with a reading added by hand). Run from the repository root: ``python benchmarks/bench_charlm.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from deepshrink.compress.prune import prune_, sparsity_report
from deepshrink.compress.train import TrainConfig, fit
from deepshrink.data.text import char_windows, load_corpus
from deepshrink.models import char_lstm

from common import ROOT, add_data_dir, add_output, write_results

console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(p)
    add_output(p)
    p.add_argument("--cache", default=str(ROOT / "runs" / "charlm"))
    p.add_argument("--dense-epochs", type=float, default=4.0)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    p.add_argument("--retrain-epochs", type=float, default=0.5, help="after each pruning step")
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def config(epochs: float, lr: float, seed: int) -> TrainConfig:
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


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """exp(mean next-character cross-entropy) over every window of ``data``."""
    model.eval()
    x, y = data
    total = sum(
        float(torch.nn.functional.cross_entropy(model(xb), yb, reduction="sum"))
        for xb, yb in zip(x.split(256), y.split(256))
    )
    model.train()
    return math.exp(total / y.numel())


def sample(model: torch.nn.Module, corpus, prompt: str, seed: int) -> str:
    model.eval()
    text = prompt + corpus.decode(model.generate(torch.from_numpy(corpus.encode(prompt)), 200, seed=seed))
    model.train()
    return text


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)  # the shared two-core machine: two threads spin-wait
    corpus = load_corpus(args.data_dir)
    train, val = char_windows(corpus, "train"), char_windows(corpus, "val")
    torch.manual_seed(args.seed)
    model = char_lstm(vocab=len(corpus.vocab))
    path = Path(args.cache) / f"dense-e{args.dense_epochs}-s{args.seed}.pt"
    start = time.perf_counter()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        fit(model, train, config(args.dense_epochs, 3e-3, args.seed), description="train dense")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    rows = [
        {
            "sparsity": 0.0,
            "kept": 1.0,
            "perplexity": perplexity(model, val),
            "text": sample(model, corpus, args.prompt, args.seed),
            "seconds": time.perf_counter() - start,
        }
    ]
    for i, s in enumerate(args.sparsities):
        start = time.perf_counter()
        prune_(model, s)
        before = perplexity(model, val)
        fit(model, train, config(args.retrain_epochs, 1e-3, args.seed + i + 1), description=f"prune {s:.0%}")
        report = sparsity_report(model)
        rows.append(
            {
                "sparsity": s,
                "kept": sum(r.kept for r in report) / sum(r.weights for r in report),
                "perplexity_before_retraining": before,
                "perplexity": perplexity(model, val),
                "text": sample(model, corpus, args.prompt, args.seed),
                "seconds": time.perf_counter() - start,
            }
        )
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("data_dir", "cache", "out_dir", "publish")},
        "rows": rows,
    }


def markdown(results: dict) -> str:
    lines = [
        "# Character LSTM on tinyshakespeare: perplexity against sparsity",
        "",
        "`python benchmarks/bench_charlm.py`: embedding 64, LSTM 256, linear read-out; the first 90% of the "
        "text trains, the last 10% is the validation set (perplexity = exp of the mean next-character "
        "cross-entropy). Each row prunes the previous one further (magnitude, per layer) and retrains "
        f"briefly. Settings: `{json.dumps(results['settings'])}`. Shared two-core machine.",
        "",
        "| weights pruned | kept | val perplexity (before retraining) | val perplexity |",
        "|---|---|---|---|",
    ]
    for r in results["rows"]:
        before = f"{r['perplexity_before_retraining']:.2f}" if "perplexity_before_retraining" in r else ""
        lines.append(f"| {r['sparsity']:.0%} | {r['kept']:.1%} | {before} | {r['perplexity']:.2f} |")
    lines += ["", "Generated text (temperature 0.8, same seed):", ""]
    for r in results["rows"]:
        lines += [f"**{r['sparsity']:.0%} pruned**", "", "```", r["text"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    table = Table(title="character LSTM on tinyshakespeare")
    for col in ("pruned", "kept", "val perplexity"):
        table.add_column(col, justify="right")
    for r in results["rows"]:
        table.add_row(f"{r['sparsity']:.0%}", f"{r['kept']:.1%}", f"{r['perplexity']:.2f}")
    console.print(table)
    for folder in write_results(args, "charlm", results, markdown):
        console.print(f"wrote {folder / 'charlm.md'} and charlm.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
