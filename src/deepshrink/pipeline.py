"""The Deep Compression pipeline end to end: train, prune, share, fine-tune, save.

A thin orchestration of :mod:`deepshrink.prune`, :mod:`deepshrink.quantize` and
:mod:`deepshrink.train`, used by the CLI and the benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from rich.console import Console
from torch import nn

from deepshrink.errors import DeepShrinkError
from deepshrink.prune import check_sparsity
from deepshrink.quantize import share_weights_
from deepshrink.report import layer_table
from deepshrink.schedules import iterative_levels
from deepshrink.train import TrainConfig, evaluate, fit, iterative_prune

Data = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CompressSettings:
    """What :func:`compress` does; checked on creation."""

    sparsity: float | dict[str, float] = 0.9  # final; a mapping gives per-layer sparsities
    prune_steps: int = 3  # rounds of prune + retrain (iterative pruning)
    bits: int | dict[str, int] | None = None  # None: 8 for conv, 5 for fully connected
    init: str = "linear"  # centroid initialisation, the paper's choice
    pretrain_epochs: float = 0.0
    prune_epochs: float = 1.0  # retraining after each pruning round
    quant_epochs: float = 1.0  # centroid fine-tuning
    lr: float = 0.01  # dense training; retraining uses lr / 10 as in the paper
    batch_size: int = 64
    seed: int = 0
    max_steps: int | None = None
    timings: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, dict):
            check_sparsity(self.sparsity)
        if self.prune_steps < 1:
            raise DeepShrinkError(f"prune_steps={self.prune_steps} must be >= 1")

    def train_config(self, epochs: float, lr: float) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=lr, batch_size=self.batch_size, seed=self.seed,
                           max_steps=self.max_steps)


def compress(
    model: nn.Module, train: Data, test: Data, settings: CompressSettings,
    out: str | None = None, console: Console | None = None, factory: str | None = None,
    factory_kwargs: dict | None = None,
) -> dict:
    """Run the pipeline on ``model`` in place and return accuracies and timings.

    Args:
        out: write the compressed model there (``.dsz``), with ``factory`` and
            ``factory_kwargs`` recorded so :func:`deepshrink.load` rebuilds it.

    Returns:
        ``{"dense_accuracy", "pruned_accuracy", "shared_accuracy", "accuracy",
        "timings"}`` (accuracies on ``test``), plus ``"file_bytes"`` and
        ``"dense_bytes"`` (fp32 size of every parameter) when ``out`` is given.
    """
    console = console or Console()
    torch.manual_seed(settings.seed)
    result: dict = {}

    def stage(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        settings.timings[name] = time.perf_counter() - start

    if settings.pretrain_epochs > 0:
        stage("train", lambda: fit(model, train, settings.train_config(settings.pretrain_epochs, settings.lr),
                                   description="train dense"))
    result["dense_accuracy"] = evaluate(model, test)
    console.print(f"dense accuracy: {result['dense_accuracy']:.4f}")
    retrain = settings.train_config(settings.prune_epochs, settings.lr / 10)
    stage("prune", lambda: iterative_prune(model, iterative_levels(settings.sparsity, settings.prune_steps), train, retrain))
    result["pruned_accuracy"] = evaluate(model, test)
    console.print(f"pruned accuracy: {result['pruned_accuracy']:.4f}")
    stage("share", lambda: share_weights_(model, settings.bits, init=settings.init, seed=settings.seed))
    result["shared_accuracy"] = evaluate(model, test)
    stage("fine-tune", lambda: fit(model, train, settings.train_config(settings.quant_epochs, settings.lr / 10),
                                   description="fine-tune centroids"))
    result["accuracy"] = evaluate(model, test)
    console.print(layer_table(model, "compressed layers"))
    console.print(f"accuracy dense {result['dense_accuracy']:.4f} -> pruned {result['pruned_accuracy']:.4f} -> "
                  f"shared {result['shared_accuracy']:.4f} -> fine-tuned {result['accuracy']:.4f}")
    if out is not None:
        from deepshrink.fileformat import save
        result["file_bytes"] = save(model, out, factory=factory, factory_kwargs=factory_kwargs)
        result["dense_bytes"] = 4 * sum(p.numel() for n, p in model.named_parameters() if "codebook" not in n)
        console.print(f"wrote {out}: {result['file_bytes']:,} bytes; fp32 parameters {result['dense_bytes']:,} bytes "
                      f"({result['dense_bytes'] / result['file_bytes']:.1f}x smaller)")
    result["timings"] = dict(settings.timings)
    return result


def demo(seed: int = 0, console: Console | None = None, out: str | None = None) -> dict:
    """LeNet-300-100 on scikit-learn's bundled 8x8 digits: no download, under a minute.

    Trains, prunes, shares weights, fine-tunes, writes the file (``out``, else a
    temporary one) and prints its per-layer size table.
    """
    import tempfile
    from pathlib import Path

    from deepshrink.data.digits import load_digits
    from deepshrink.fileinfo import print_info
    from deepshrink.models import lenet_300_100

    console = console or Console()
    model = lenet_300_100(in_features=64)
    settings = CompressSettings(sparsity=0.85, prune_steps=3, bits=4, pretrain_epochs=15, prune_epochs=3,
                                quant_epochs=3, lr=0.05, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = out or str(Path(tmp) / "demo.dsz")
        result = compress(model, load_digits("train"), load_digits("test"), settings, out=path, console=console,
                          factory="deepshrink.models:lenet_300_100", factory_kwargs={"in_features": 64})
        print_info(path, console)
    return result
