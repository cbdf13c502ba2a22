"""Gradual pruning: tighten the masks every few steps of one training run.

Zhu and Gupta's automated gradual pruning (AGP) raises the sparsity from
``initial`` to ``final`` along a cubic ramp, pruning every ``every`` steps of a
single fit; the steps after the ramp fine-tune at the final sparsity. It is
the alternative to Deep Compression's iterative pruning (prune to a level,
retrain, prune harder), which :func:`deepshrink.compress.train.iterative_prune` runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from deepshrink.compress.checkpoint import NO_CHECKPOINT, Checkpointer
from deepshrink.compress.groups import prune_groups_
from deepshrink.compress.prune import (
    LayerSparsity,
    check_sparsity,
    layer_sparsity,
    reports_from_json,
    reports_to_json,
    sparsity_schedule,
)
from deepshrink.compress.targets import find_targets, resolve_per_layer
from deepshrink.compress.train import TrainConfig, fit, scale_dropout_
from deepshrink.errors import DeepShrinkError


def agp_sparsity(step: int, total: int, final: float, initial: float = 0.0, ramp: float = 0.75) -> float:
    """AGP's cubic sparsity at ``step`` of ``total``: ``s_f + (s_i - s_f)(1 - t)^3``.

    ``t`` runs from 0 to 1 over the first ``ramp`` fraction of the steps and
    stays at 1 after it.

    Examples:
        >>> [round(agp_sparsity(s, 4, 0.9, ramp=1.0), 4) for s in range(5)]
        [0.0, 0.5203, 0.7875, 0.8859, 0.9]
    """
    t = min(1.0, step / max(ramp * total, 1e-12))
    return final + (initial - final) * (1 - t) ** 3


def check_ramp(ramp: object) -> float:
    """Validate the fraction of a gradual run spent raising the sparsity.

    Raises:
        DeepShrinkError: naming the value unless it is in (0, 1].
    """
    if isinstance(ramp, bool) or not isinstance(ramp, (int, float)) or not 0 < ramp <= 1:
        raise DeepShrinkError(f"ramp={ramp!r} must be a number in (0, 1]")
    return float(ramp)


class GradualPruner:
    """An ``on_step`` callback for :func:`deepshrink.compress.train.fit` that prunes along AGP's ramp.

    Args:
        model: the model being trained.
        sparsity: final sparsity, or ``{pattern: sparsity}``.
        every: prune every this many optimizer steps.
        granularity: see :func:`deepshrink.compress.groups.prune_groups_`.
        ramp: fraction of the run over which the sparsity rises.
        layers: which weights; see ``find_targets``.
        install: install the masks now (else call :meth:`install` before training).

    Raises:
        DeepShrinkError: ``every < 1``, a bad ramp, sparsity or granularity.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | dict[str, float],
        every: int = 50,
        granularity: str | dict[str, str] = "fine",
        ramp: float = 0.75,
        layers: Iterable[str] | None = None,
        install: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise DeepShrinkError(f"every={every!r} must be an integer >= 1 (optimizer steps between prunings)")
        self.model, self.every, self.granularity, self.ramp = model, every, granularity, check_ramp(ramp)
        self.layers = list(layers) if layers is not None else None
        targets = find_targets(model, self.layers)
        self.final = {name: s for name, s in resolve_per_layer(sparsity, targets, "sparsity").items() if s is not None}
        for name, s in self.final.items():
            check_sparsity(s, f"sparsity[{name}]")
        self.reports: list[list[LayerSparsity]] = []
        if install:
            self.install()

    def install(self) -> None:
        """Install (all-true) masks, so that the optimizer ``fit`` builds holds the final parameters."""
        prune_groups_(self.model, {name: 0.0 for name in self.final}, self.granularity, layers=self.layers)

    def final_report(self) -> list[LayerSparsity]:
        """The kept weights of each layer this pruner prunes, as they are now."""
        return [layer_sparsity(t) for t in find_targets(self.model, self.layers) if t.name in self.final]

    def __call__(self, step: int, total: int) -> None:
        if step % self.every and step != total:
            return
        levels = {name: agp_sparsity(step, total, s, ramp=self.ramp) for name, s in self.final.items()}
        with torch.no_grad():
            self.reports.append(prune_groups_(self.model, levels, self.granularity, layers=self.layers))
        scale_dropout_(self.model)


def gradual_prune(
    model: nn.Module,
    sparsity: float | dict[str, float],
    train_data: Dataset | tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig | None = None,
    *,
    every: int = 50,
    granularity: str | dict[str, str] = "fine",
    ramp: float = 0.75,
    layers: Iterable[str] | None = None,
    checkpoint: Checkpointer | None = None,
) -> list[LayerSparsity]:
    """Train ``model`` once while its sparsity follows AGP's cubic ramp.

    Args:
        model: any ``nn.Module``.
        sparsity: final sparsity, or ``{pattern: sparsity}``.
        train_data: ``(inputs, labels)`` or a ``Dataset``.
        config: the training run (its length sets the ramp's length).
        every, granularity, ramp, layers: see :class:`GradualPruner`.
        checkpoint: make the masks' installation, the training and the report
            units of that run (:mod:`deepshrink.compress.checkpoint`).

    Returns:
        The pruning report at the final sparsity.

    Examples:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> cfg = TrainConfig(epochs=2, batch_size=16, progress=False)
        >>> [r.kept for r in gradual_prune(net, 0.5, data, cfg, every=2)]
        [6]
    """
    ckpt = checkpoint or NO_CHECKPOINT
    pruner = GradualPruner(model, sparsity, every, granularity, ramp, layers, install=False)
    ckpt.unit("install masks", pruner.install)
    fit(model, train_data, config, description="gradual pruning", on_step=pruner, checkpoint=checkpoint)
    return ckpt.unit("pruning report", pruner.final_report, encode=reports_to_json, decode=reports_from_json)


def iterative_levels(sparsity: float | dict[str, float], steps: int) -> list[float | dict[str, float]]:
    """Deep Compression's iterative levels: each round removes the same share of what is left.

    Examples:
        >>> iterative_levels({"fc1": 0.75, "fc2": 0.0}, 2)
        [{'fc1': 0.5, 'fc2': 0.0}, {'fc1': 0.75, 'fc2': 0.0}]
    """
    if isinstance(sparsity, dict):
        per_layer = {k: sparsity_schedule(v, steps) for k, v in sparsity.items()}
        return [{k: s[i] for k, s in per_layer.items()} for i in range(steps)]
    return sparsity_schedule(sparsity, steps)
