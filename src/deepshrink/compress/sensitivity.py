"""Sensitivity analysis: how much accuracy each layer loses when pruned alone.

Each compressible layer is pruned by itself to each sparsity of a grid (no
retraining), and the model's accuracy measured; the curves show which layers
tolerate pruning, and :meth:`Sensitivity.propose` turns them into per-layer
sparsities for a given accuracy drop, which a recipe's ``prune`` stage can use
directly (``sensitivity: {max_drop: 0.01}``). Deep Compression chose its
per-layer rates this way (its figure 5 of the 2015 paper).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from deepshrink.atomic import write_atomic
from deepshrink.compress.groups import prune_groups_
from deepshrink.compress.prune import check_sparsity
from deepshrink.compress.targets import find_targets
from deepshrink.compress.train import evaluate
from deepshrink.errors import DeepShrinkError
from deepshrink.progress import progress_bar
from deepshrink.tables import NameTable

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


@dataclass(frozen=True)
class Sensitivity:
    """Accuracy of a model with each layer pruned alone.

    Attributes:
        baseline: accuracy of the model as given.
        sparsities: the grid, increasing.
        accuracy: ``{layer: [accuracy at each sparsity]}``.
    """

    baseline: float
    sparsities: tuple[float, ...]
    accuracy: dict[str, list[float]]

    def propose(self, max_drop: float) -> dict[str, float]:
        """Per layer, the largest sparsity of the grid whose accuracy drop is at most ``max_drop``.

        Every smaller sparsity must be within the drop too (a noisy curve does
        not jump over a bad point). A layer that cannot be pruned within the
        drop gets 0.

        Raises:
            DeepShrinkError: ``max_drop`` is not a number in [0, 1].

        Examples:
            >>> s = Sensitivity(0.98, (0.5, 0.9), {"fc1": [0.979, 0.97], "fc2": [0.95, 0.9]})
            >>> s.propose(0.005)
            {'fc1': 0.5, 'fc2': 0.0}
        """
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop <= 1:
            raise DeepShrinkError(f"max_drop={max_drop!r} must be a number in [0, 1] (accuracy, not percent)")
        proposal = {}
        for name, accs in self.accuracy.items():
            chosen = 0.0
            for s, acc in zip(self.sparsities, accs):
                if self.baseline - acc > max_drop:
                    break
                chosen = s
            proposal[name] = chosen
        return proposal

    def table(self, title: str = "accuracy with one layer pruned") -> NameTable:
        """A table (rich renderable): one row per layer, one column per sparsity; layer names never cut."""
        table = NameTable([f"{100 * s:g}%" for s in self.sparsities], f"{title} (baseline {self.baseline:.4f})")
        for name, accs in self.accuracy.items():
            table.add_row(name, *(f"{a:.4f}" for a in accs))
        return table

    def plot(self, path: str, max_drop: float | None = None) -> None:
        """Write a PNG of accuracy against sparsity, one line per layer (atomically).

        Args:
            path: the PNG to write.
            max_drop: if given, draw the accuracy floor ``baseline - max_drop``.
        """
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, accs in self.accuracy.items():
            ax.plot([100 * s for s in self.sparsities], accs, marker="o", label=name)
        ax.axhline(self.baseline, color="grey", linestyle=":", label="baseline")
        if max_drop is not None:
            ax.axhline(self.baseline - max_drop, color="red", linestyle="--", label=f"baseline - {max_drop:g}")
        ax.set_xlabel("sparsity of the layer (%)")
        ax.set_ylabel("accuracy")
        ax.set_title("pruning sensitivity, one layer at a time")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        write_atomic(path, buffer.getvalue())


def check_sparsities(sparsities: Iterable[object]) -> tuple[float, ...]:
    """Validate a sparsity grid: a non-empty, strictly increasing list in [0, 1).

    Raises:
        DeepShrinkError: naming the bad value.
    """
    grid = tuple(check_sparsity(s, f"sparsities[{i}]") for i, s in enumerate(sparsities))
    if not grid or any(b <= a for a, b in zip(grid, grid[1:])):
        raise DeepShrinkError(f"sparsities={list(grid)} must be a non-empty, strictly increasing list in [0, 1)")
    return grid


def sensitivity_scan(
    model: nn.Module,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    granularity: str = "fine",
    layers: Iterable[str] | None = None,
    progress: bool = True,
) -> Sensitivity:
    """Prune each layer alone to each sparsity and measure accuracy on ``data``.

    ``model`` is not changed (each trial prunes a copy). Layers already pruned
    count their zeros towards a sparsity, as :func:`deepshrink.compress.prune.prune_` does.

    Args:
        model: a trained model.
        data: ``(inputs, labels)`` to measure on (a validation split, ideally).
        sparsities: the grid, strictly increasing in [0, 1).
        granularity: see :func:`deepshrink.compress.groups.prune_groups_`.
        layers: which weights; see ``find_targets``.
        progress: show a rich progress bar.

    Returns:
        A :class:`Sensitivity`.

    Raises:
        DeepShrinkError: a bad grid, granularity or layer pattern.

    Examples:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> data = (torch.randn(32, 4), torch.randint(0, 2, (32,)))
        >>> scan = sensitivity_scan(net, data, [0.5, 0.9], progress=False)
        >>> list(scan.accuracy), len(scan.accuracy["1.weight"])
        (['1.weight'], 2)
    """
    grid = check_sparsities(sparsities)
    names = [t.name for t in find_targets(model, layers)]
    if not names:
        raise DeepShrinkError(f"{type(model).__name__} has no compressible weight")
    accuracy: dict[str, list[float]] = {name: [] for name in names}
    with progress_bar(show=progress) as bar:
        task = bar.add_task("sensitivity scan", total=len(names) * len(grid))
        for name in names:
            for s in grid:
                trial = copy.deepcopy(model)
                prune_groups_(trial, {name: s}, granularity, layers=[name])
                accuracy[name].append(evaluate(trial, data))
                bar.advance(task)
    return Sensitivity(evaluate(model, data, progress=progress), grid, accuracy)
