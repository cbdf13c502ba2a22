"""Pruning at coarser granularities: vectors, kernels, filters, channels.

Mao et al. (2017) compare four grains of sparsity on a conv weight of shape
``(out, in, kh, kw)``:

- ``"fine"``: single weights (Deep Compression's pruning);
- ``"vector"``: a row of a kernel, ``w[o, i, y, :]``;
- ``"kernel"``: a whole 2-D kernel, ``w[o, i, :, :]``;
- ``"filter"``: a whole output channel, ``w[o, :, :, :]``;

and we add ``"channel"``, a whole input channel ``w[:, i, :, :]``. A fully
connected weight ``(out, in)`` is a conv with 1x1 kernels, so there a vector
and a kernel are single weights, a filter is an output row (a neuron) and a
channel an input column.

A group's score is its mean magnitude (the L1 norm over equal-size groups, as
Mao et al. rank them); the lowest-scoring groups are removed through
:func:`deepshrink.compress.prune.apply_mask_`, so group pruning composes with every
other stage exactly like fine-grained pruning.

Coarse grains need one index per kept group rather than per weight
(:func:`group_index_bits`), and filter/channel pruning can remove whole
channels: :func:`deepshrink.compress.surgery.shrink` then builds the smaller
dense model that plain PyTorch runs faster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from deepshrink.coding.relative import count_escapes
from deepshrink.compress.prune import LayerSparsity, apply_mask_, layer_sparsity, prune_, sparsity_per_target
from deepshrink.compress.targets import FilterFn, Target, find_targets, resolve_per_layer
from deepshrink.errors import DeepShrinkError, UnsupportedLayerError

GRANULARITIES = ("fine", "vector", "kernel", "filter", "channel")


def check_granularity(granularity: object, name: str = "granularity") -> str:
    """Validate a granularity name.

    Raises:
        DeepShrinkError: naming the value and the allowed ones.
    """
    if granularity not in GRANULARITIES:
        raise DeepShrinkError(f"{name}={granularity!r} must be one of {', '.join(GRANULARITIES)}")
    return str(granularity)


def _channel_dims(module: nn.Module) -> tuple[int, int]:
    """``(output dim, input dim)`` of a weight: transposed convs store ``(in, out, ...)``."""
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return 1, 0
    return 0, 1


def group_dims(weight_dim: int, granularity: str, out_dim: int = 0, in_dim: int = 1) -> tuple[int, ...]:
    """The weight dimensions that name a group: one group per combination of their indices.

    Examples:
        >>> group_dims(4, "vector"), group_dims(4, "kernel"), group_dims(2, "kernel"), group_dims(4, "channel")
        ((0, 1, 2), (0, 1), (0, 1), (1,))
    """
    check_granularity(granularity)
    if weight_dim < 2 and granularity in ("filter", "channel"):
        raise DeepShrinkError(f"granularity={granularity!r} needs a weight with 2+ dimensions")
    if granularity == "fine" or weight_dim <= 2 and granularity in ("vector", "kernel"):
        return tuple(range(weight_dim))
    if granularity == "vector":
        return tuple(range(weight_dim - 1))
    if granularity == "kernel":
        return (0, 1)
    return (out_dim,) if granularity == "filter" else (in_dim,)


def _grouped(tensor: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` as ``(groups, group_size)``: the group dims first, flattened."""
    rest = tuple(d for d in range(tensor.dim()) if d not in dims)
    n_groups = math.prod(tensor.shape[d] for d in dims)
    return tensor.permute(*dims, *rest).reshape(n_groups, -1)


def _ungrouped(grouped: torch.Tensor, shape: torch.Size, dims: tuple[int, ...]) -> torch.Tensor:
    """Invert :func:`_grouped`."""
    rest = tuple(d for d in range(len(shape)) if d not in dims)
    order = (*dims, *rest)
    permuted = grouped.reshape([shape[d] for d in order])
    return permuted.permute(*np.argsort(order).tolist())


def group_scores(target: Target, granularity: str) -> torch.Tensor:
    """Mean magnitude of each group of ``target``'s current (masked) weight.

    Returns:
        ``(groups,)`` float scores, groups in row-major order of the group dims.
    """
    out_dim, in_dim = _channel_dims(target.module)
    w = target.weight.detach()
    return _grouped(w.abs().float(), group_dims(w.dim(), granularity, out_dim, in_dim)).mean(1)


def group_mask(target: Target, granularity: str, sparsity: float) -> torch.Tensor:
    """A mask of ``target``'s shape removing its ``sparsity`` lowest-scoring groups.

    Groups already pruned score 0 and count towards ``sparsity``, so a higher
    sparsity later only removes more.
    """
    out_dim, in_dim = _channel_dims(target.module)
    w = target.weight
    dims = group_dims(w.dim(), granularity, out_dim, in_dim)
    scores = group_scores(target, granularity)
    n_keep = scores.numel() - int(math.floor(sparsity * scores.numel()))
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.topk(scores, n_keep, sorted=False).indices] = True
    expanded = keep[:, None].expand(-1, _grouped(w, dims).shape[1])
    return _ungrouped(expanded, w.shape, dims)


def _layer_grain(target: Target, grain: str | None) -> str:
    """``target``'s granularity (``None``: fine), checked against the layer's kind."""
    grain = check_granularity(grain or "fine", f"granularity[{target.name}]")
    if isinstance(target.module, nn.RNNBase) and grain in ("filter", "channel"):
        raise UnsupportedLayerError(
            f"{target.name}: granularity={grain!r} on a recurrent layer would cut its gates apart; "
            f"use 'fine' (allowed here: fine, vector, kernel)"
        )
    return grain


def prune_groups_(
    model: nn.Module,
    sparsity: float | dict[str, float],
    granularity: str | dict[str, str] = "fine",
    *,
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[LayerSparsity]:
    """Prune ``model`` in place at the given granularity.

    Args:
        model: any ``nn.Module``; see :func:`deepshrink.compress.targets.find_targets`.
        sparsity: fraction in [0, 1) of each layer's groups to remove, or
            ``{pattern: sparsity}``; a layer no pattern names is left alone.
        granularity: one of :data:`GRANULARITIES`, or ``{pattern: granularity}``
            (``"*"`` for the rest, else ``"fine"``).
        layers, filter_fn: which weights; see ``find_targets``.

    Returns:
        One :class:`deepshrink.compress.prune.LayerSparsity` per pruned weight.

    Raises:
        DeepShrinkError: an unknown granularity or layer pattern, a sparsity
            outside [0, 1), or a layer already weight-shared.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(2, 4, 3))
        >>> [r.kept for r in prune_groups_(net, 0.5, "filter")]
        [36]
    """
    chosen = sparsity_per_target(model, sparsity, layers, filter_fn)
    grains = resolve_per_layer(
        granularity, find_targets(model, layers, filter_fn, warn_unsupported=False), "granularity"
    )
    # every layer's grain is checked and its group mask made before any layer is pruned:
    # a bad one must not leave the model half pruned
    plan = [(t, s, _layer_grain(t, grains[t.name])) for t, s in chosen]
    masks = {t.name: group_mask(t, grain, s) for t, s, grain in plan if grain != "fine"}
    report = []
    for t, s, _ in plan:
        if t.name in masks:
            apply_mask_(t, masks[t.name])
            report.append(layer_sparsity(t))
        else:
            report += prune_(model, {t.name: s}, layers=[t.name])
    return report


def group_index_bits(mask: torch.Tensor, granularity: str, index_bits: int, out_dim: int = 0, in_dim: int = 1) -> int:
    """Bits of a relative-index stream with one entry per *kept group*.

    What coarse grains save: a kernel-pruned layer stores one index per kept
    kernel, not per weight (Mao et al. 2017). Escapes are counted as the file
    format counts them.

    Args:
        mask: the layer's bool mask (True = kept).
        granularity: the grain the mask was pruned at.
        index_bits: width of one relative index.

    Returns:
        ``(kept groups + escapes) * index_bits``.
    """
    dims = group_dims(mask.dim(), granularity, out_dim, in_dim)
    kept_groups = np.flatnonzero(_grouped(mask, dims).any(1).cpu().numpy())
    return (kept_groups.size + count_escapes(kept_groups, index_bits)) * index_bits
