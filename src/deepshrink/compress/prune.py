"""Magnitude pruning with masks that hold through fine-tuning.

A pruned weight is re-parametrised as ``weight = original * mask`` through
``torch.nn.utils.parametrize``, so the model computes with exact zeros after any
optimizer step (momentum, weight decay, Adam), in any training loop, and the mask
is a buffer in ``state_dict``.

Thresholds follow Deep Compression: either a target sparsity (the smallest
``sparsity`` fraction of magnitudes is removed) or the paper's rule,
``|w| <= quality * std(w)``. Pruning an already pruned layer only removes more
weights: a pruned weight never comes back.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepshrink.compress.parametrization import (
    Compression,
    compression_of,
    current_mask,
    register_compression,
    reparametrize_,
)
from deepshrink.compress.targets import FilterFn, Target, find_targets, resolve_per_layer
from deepshrink.errors import DeepShrinkError
from deepshrink.progress import track
from deepshrink.tensor import CompressedTensor

# The least global pruning leaves in a layer. The sparsest layers Deep Compression reports keep
# 4% (VGG-16's fc6 and fc7, docs/references.md); at 1% a layer still passes signal, while below
# it a global threshold is most often emptying a layer whose weights are merely on another
# scale (a small projection, an embedding), which cuts the network in two.
DEFAULT_MIN_DENSITY = 0.01


@register_compression
class Mask(Compression):
    """Parametrization ``w -> w * mask`` (``mask`` a bool buffer of ``w``'s shape)."""

    state_keys = ("mask",)

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Mask:
        return cls(state["mask"])

    def to_compressed(self, weight: torch.Tensor) -> CompressedTensor:
        """A pruned but not weight-shared layer, stored losslessly.

        Raises:
            DeepShrinkError: when its survivors take more than 2**16 distinct values.
        """
        return CompressedTensor.from_dense(weight)


@dataclass(frozen=True)
class LayerSparsity:
    """One row of the pruning report."""

    name: str
    shape: tuple[int, ...]
    weights: int
    kept: int

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.weights if self.weights else 0.0


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Validate a sparsity in [0, 1).

    Raises:
        DeepShrinkError: naming the value, if outside [0, 1) or not a number.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise DeepShrinkError(f"{name}={sparsity!r} must be a number in [0, 1)")
    return float(sparsity)


def magnitude_threshold(magnitudes: torch.Tensor, sparsity: float) -> float:
    """Largest magnitude that is pruned so that ``sparsity`` of ``magnitudes`` go.

    Returns ``-inf`` when nothing is to be pruned.
    """
    n_prune = int(math.floor(sparsity * magnitudes.numel()))
    if n_prune == 0:
        return -math.inf
    return torch.kthvalue(magnitudes.reshape(-1).float().cpu(), n_prune).values.item()


def _masks_by_sparsity(targets: list[Target], sparsity: dict[str, object], scope: str) -> dict[str, torch.Tensor]:
    weights = {t.name: t.weight.detach().abs() for t in targets}
    if scope == "global":
        s = check_sparsity(next(iter(sparsity.values())))
        threshold = magnitude_threshold(torch.cat([w.reshape(-1) for w in weights.values()]), s)
        return {n: w > threshold for n, w in weights.items()}
    masks = {}
    for name, w in weights.items():
        s = sparsity[name]
        if s is None:
            continue
        # Rank exactly: ties at the threshold would otherwise keep too many.
        n_keep = w.numel() - int(math.floor(check_sparsity(s, f"sparsity[{name}]") * w.numel()))
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        mask[torch.topk(w.reshape(-1), n_keep, sorted=False).indices] = True
        masks[name] = mask.reshape(w.shape)
    return masks


def _masks_by_quality(targets: list[Target], quality: dict[str, object], scope: str) -> dict[str, torch.Tensor]:
    # The paper's rule: threshold = quality * std of the layer's (surviving) weights.
    masks = {}
    if scope == "global":
        q = next(iter(quality.values()))
        alive = torch.cat([t.weight.detach()[current_mask(t)].reshape(-1) for t in targets])
        threshold = float(q) * alive.std().item()
    for t in targets:
        q = quality[t.name]
        if q is None:
            continue
        if isinstance(q, bool) or not isinstance(q, (int, float)) or q < 0:
            raise DeepShrinkError(f"quality[{t.name}]={q!r} must be a number >= 0")
        w = t.weight.detach()
        if scope != "global":
            survivors = w[current_mask(t)]
            threshold = float(q) * (survivors.std().item() if survivors.numel() > 1 else 0.0)
        masks[t.name] = w.abs() > threshold
    return masks


def _floor(targets: list[Target], masks: dict[str, torch.Tensor], min_density: float) -> None:
    """Give each layer that ``masks`` takes below ``min_density`` (at least one weight) its largest weights back.

    Changes ``masks`` in place; warns, naming the layers.
    """
    raised = []
    for t in targets:
        if t.name not in masks or t.weight.numel() == 0:
            continue
        magnitudes = t.weight.detach().abs().reshape(-1)
        floor = max(1, math.ceil(min_density * magnitudes.numel()))
        left = int((masks[t.name] & current_mask(t)).sum())
        if left >= floor:
            continue
        top = torch.zeros_like(magnitudes, dtype=torch.bool)
        top[torch.topk(magnitudes, floor, sorted=False).indices] = True
        masks[t.name] = masks[t.name] | top.reshape(masks[t.name].shape)
        raised.append(f"{t.name} (the threshold left {left}; kept its {floor} largest of {magnitudes.numel()} weights)")
    if raised:
        warnings.warn(f"global pruning would take these layers below min_density={min_density:g}: "
                      f"{'; '.join(raised)}. Pass a smaller min_density, or prune them by layer", stacklevel=3)  # fmt: skip


def prune_(
    model: nn.Module,
    sparsity: float | dict[str, float] | None = None,
    *,
    quality: float | dict[str, float] | None = None,
    scope: str = "layer",
    min_density: float = DEFAULT_MIN_DENSITY,
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> list[LayerSparsity]:
    """Prune ``model`` in place by weight magnitude.

    Args:
        model: any ``nn.Module``; see :func:`deepshrink.compress.targets.find_targets`.
        sparsity: fraction in [0, 1) of each layer's weights to remove, or
            ``{pattern: sparsity}`` (``"*"`` for the rest). Counts weights already
            pruned, so ``0.9`` after ``0.5`` prunes to 90% in all.
        quality: instead of ``sparsity``, the paper's rule: remove weights with
            ``|w| <= quality * std(w)``.
        scope: ``"layer"`` (a threshold per layer) or ``"global"`` (one threshold
            over all selected layers; needs a single scalar).
        min_density: with ``scope="global"``, the fraction of each layer's
            weights that is always kept (at least one weight): a layer the
            threshold would take below it keeps its largest weights up to it,
            and a warning names it. Default 1%; the whole model's sparsity
            then falls short of ``sparsity`` by what the floor keeps.
        layers, filter_fn: which weights; see ``find_targets``.
        progress: show a progress bar over the layers (see :mod:`deepshrink.progress`).

    Returns:
        One :class:`LayerSparsity` per pruned weight.

    Raises:
        DeepShrinkError: both or neither of ``sparsity`` and ``quality`` given, an
            out-of-range value (``min_density`` included), an unknown ``scope``
            or layer pattern.

    Examples:
        >>> net = nn.Sequential(nn.Linear(10, 10))
        >>> [round(r.kept_fraction, 2) for r in prune_(net, 0.7)]
        [0.3]
    """
    if (sparsity is None) == (quality is None):
        raise DeepShrinkError("give exactly one of sparsity= or quality=")
    if scope not in ("layer", "global"):
        raise DeepShrinkError(f"scope={scope!r} must be 'layer' or 'global'")
    if isinstance(min_density, bool) or not isinstance(min_density, (int, float)) or not 0 <= min_density <= 1:
        raise DeepShrinkError(f"min_density={min_density!r} must be a number in [0, 1]")
    if sparsity is not None and not isinstance(sparsity, dict):
        check_sparsity(sparsity)
    setting = sparsity if sparsity is not None else quality
    if scope == "global" and isinstance(setting, dict):
        raise DeepShrinkError("scope='global' takes one scalar sparsity or quality, not a mapping")
    targets = find_targets(model, layers, filter_fn)
    if not targets:
        raise DeepShrinkError(f"{type(model).__name__} has no compressible weight")
    per_layer = resolve_per_layer(setting, targets, "sparsity" if sparsity is not None else "quality")
    compute = _masks_by_sparsity if sparsity is not None else _masks_by_quality
    new_masks = compute(targets, per_layer, scope)
    if scope == "global":
        _floor(targets, new_masks, min_density)
    report = []
    for t in track(targets, "pruning", show=progress):
        if t.name not in new_masks:
            continue
        apply_mask_(t, new_masks[t.name])
        report.append(layer_sparsity(t))
    return report


def sparsity_per_target(
    model: nn.Module,
    sparsity: float | dict[str, float],
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[tuple[Target, float]]:
    """The targets a pruning call touches, each with its checked sparsity.

    A target that a ``{pattern: sparsity}`` mapping leaves out is not listed.

    Raises:
        DeepShrinkError: no compressible weight, an unknown pattern, or a
            sparsity outside [0, 1) (named with its layer).
    """
    targets = find_targets(model, layers, filter_fn)
    if not targets:
        raise DeepShrinkError(f"{type(model).__name__} has no compressible weight")
    per_layer = resolve_per_layer(sparsity, targets, "sparsity")
    return [
        (t, check_sparsity(per_layer[t.name], f"sparsity[{t.name}]")) for t in targets if per_layer[t.name] is not None
    ]


def apply_mask_(target: Target, mask: torch.Tensor) -> None:
    """AND ``mask`` into the target's mask, installing a :class:`Mask` if needed.

    Raises:
        DeepShrinkError: the mask's shape differs from the weight's, or the
            layer is already weight-shared (prune before sharing).
    """
    if tuple(mask.shape) != tuple(target.weight.shape):
        raise DeepShrinkError(
            f"mask for {target.name} has shape {tuple(mask.shape)}, weight has {tuple(target.weight.shape)}"
        )
    comp = compression_of(target.module, target.param)
    if isinstance(comp, Mask):
        comp.mask &= mask.to(comp.mask.device, torch.bool)  # in place: optimizers keep their references
        return
    if comp is not None:
        raise DeepShrinkError(f"{target.name} is already {type(comp).__name__}; prune before weight sharing")
    reparametrize_(target.module, target.param, Mask(mask & current_mask(target)))


def layer_sparsity(target: Target) -> LayerSparsity:
    mask = current_mask(target)
    w = target.weight
    kept = int((mask & (w != 0)).sum()) if w.dtype.is_floating_point else int(mask.sum())
    return LayerSparsity(target.name, tuple(w.shape), w.numel(), kept)


def sparsity_report(model: nn.Module, layers: Iterable[str] | None = None) -> list[LayerSparsity]:
    """Shape, weights and kept count of every compressible weight."""
    return [layer_sparsity(t) for t in find_targets(model, layers, warn_unsupported=False)]


def reports_to_json(reports: list[LayerSparsity]) -> list[dict]:
    """Pruning reports as JSON data (a checkpoint records them)."""
    return [dataclasses.asdict(r) for r in reports]


def reports_from_json(data: list[dict]) -> list[LayerSparsity]:
    """Invert :func:`reports_to_json`."""
    return [LayerSparsity(**{**d, "shape": tuple(d["shape"])}) for d in data]


def sparsity_schedule(final: float, steps: int, initial: float = 0.0, power: float = 1.0) -> list[float]:
    """Sparsity after each of ``steps`` pruning rounds, from ``initial`` to ``final``.

    ``power=1`` spaces the *kept* fractions geometrically (each round removes the
    same share of what is left, as iterative pruning does); ``power=3`` is
    automated gradual pruning's cubic ramp.

    Examples:
        >>> [round(s, 3) for s in sparsity_schedule(0.9, 2)]
        [0.684, 0.9]
    """
    check_sparsity(final, "final")
    check_sparsity(initial, "initial")
    if steps < 1:
        raise DeepShrinkError(f"steps={steps} must be >= 1")
    t = np.arange(1, steps + 1) / steps
    if power == 1.0:
        kept = (1 - initial) * ((1 - final) / (1 - initial)) ** t
        return [float(1 - k) for k in kept]
    return [float(final + (initial - final) * (1 - x) ** power) for x in t]
