"""One-shot compression from calibration statistics: pruning and weight sharing without labels.

Deep Compression retrains after every step, which needs the labelled data a
pretrained model's user rarely has. These stages instead use what each layer sees
(:mod:`deepshrink.compress.calibrate`) to choose what to remove and how to round,
so the layer's *output* changes as little as possible:

- :func:`prune_calibrated_` with ``method="wanda"`` ranks weights by ``|W_ij| * ||x_j||``
  within each output row (Sun et al. 2023); ``method="sparsegpt"`` removes weights by
  their optimal-brain-surgeon saliency and updates the rest to compensate
  (Frantar and Alistarh 2023).
- :func:`share_calibrated_` clusters each layer's weights by k-means weighted by
  their sensitivity (the diagonal of the input Gram matrix; lookup counts for
  embeddings; SqueezeLLM's idea), then assigns codes column by column, folding the
  rounding error of each column into the columns not yet assigned (GPTQ's
  update, with the codebook in place of a uniform grid).

Both end in the same parametrizations as their magnitude counterparts (``Mask``,
``SharedWeight``), so fine-tuning, files, the engine and the simulator take the
result as they are. Layers without statistics (types the calibration does not
cover, or never reached) fall back to magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from deepshrink.compress.calibrate import Calibration
from deepshrink.compress.parametrization import compression_of, current_mask, reparametrize_
from deepshrink.compress.prune import LayerSparsity, Mask, apply_mask_, check_sparsity, layer_sparsity
from deepshrink.compress.quantize import LayerCodebook, SharedWeight, bits_per_target, kmeans_1d, nearest_code
from deepshrink.compress.targets import FilterFn, Target, find_targets, resolve_per_layer
from deepshrink.errors import DeepShrinkError
from deepshrink.progress import track

METHODS = ("wanda", "sparsegpt")
BLOCK = 128  # columns updated together: SparseGPT's and GPTQ's lazy-batch size
DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the inverse stable


def _matrix(target: Target) -> torch.Tensor:
    """The weight as the 2-D matrix the layer multiplies by: ``[outputs, inputs]`` (embeddings: ``[rows, dim]``)."""
    w = target.weight.detach()
    return w.reshape(w.shape[0], -1)


def _write_latent(target: Target, matrix: torch.Tensor) -> None:
    """Store ``matrix`` as the weight under whatever mask is installed (the mask still applies)."""
    comp = compression_of(target.module, target.param)
    dest = getattr(target.module.parametrizations, target.param).original if comp is not None else target.weight
    with torch.no_grad():
        dest.copy_(matrix.reshape(dest.shape).to(dest.dtype))


def _inverse_hessian(calibration: Calibration, target: Target, matrix: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of ``H^-1`` (GPTQ's form), ``H`` damped; ``None`` without statistics.

    Inputs never seen (zero diagonal) get a unit diagonal: their weights then move
    freely, which is right, since nothing the layer computes depends on them.
    """
    stats = calibration.layers.get(target.name)
    if stats is None or stats.gram is None or stats.gram.shape[0] != matrix.shape[1]:
        return None
    h = stats.gram.double() / max(stats.vectors, 1)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += DAMP * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True).to(matrix.dtype)
    except torch.linalg.LinAlgError as err:
        raise DeepShrinkError(f"{target.name}: the calibration Hessian is not positive definite ({err})") from err


def _obs_sweep(
    matrix: torch.Tensor,
    hinv: torch.Tensor,
    column: Callable[[torch.Tensor, int], torch.Tensor],
    block_start: Callable[[torch.Tensor, torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """Replace the columns of ``matrix`` one by one by ``column(w, j)``, compensating the rest.

    Each column's error, scaled by ``H^-1``'s Cholesky factor, is subtracted from the
    columns to its right (the optimal-brain-surgeon update), lazily per block of
    :data:`BLOCK` columns. ``block_start(weights, hinv_block, first)`` may look at a block
    before its columns are replaced (SparseGPT chooses its mask there).

    Returns:
        The new matrix (``column``'s values).
    """
    w = matrix.clone()
    out = torch.empty_like(w)
    n = w.shape[1]
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        errors = torch.empty_like(w1)
        if block_start is not None:
            block_start(w1, h1, i1)
        for i in range(i2 - i1):
            q = column(w1[:, i], i1 + i)
            out[:, i1 + i] = q
            err = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return out


def _keep_topk(score: torch.Tensor, keep: int, dim: int | None) -> torch.Tensor:
    """Bool mask of the ``keep`` largest scores per row (``dim=1``) or overall (``dim=None``)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if dim is None:
        mask.view(-1)[torch.topk(score.reshape(-1), keep, sorted=False).indices] = True
    else:
        mask.scatter_(1, torch.topk(score, keep, dim=1, sorted=False).indices, True)
    return mask


def _wanda_mask(target: Target, matrix: torch.Tensor, calibration: Calibration, sparsity: float) -> torch.Tensor:
    importance = calibration.importance(target)
    if importance is None:  # no statistics: magnitude over the whole layer
        return _keep_topk(matrix.abs(), matrix.numel() - math.floor(sparsity * matrix.numel()), None)
    score = matrix.abs() * importance.to(matrix.device).sqrt()
    if importance.shape[0] == 1:  # per input feature: Wanda compares within each output row
        return _keep_topk(score, matrix.shape[1] - math.floor(sparsity * matrix.shape[1]), 1)
    return _keep_topk(score, matrix.numel() - math.floor(sparsity * matrix.numel()), None)


def _sparsegpt(matrix: torch.Tensor, hinv: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's sweep: per block, drop the weights of least saliency ``w^2 / [H^-1]_jj^2``, update the rest."""
    keep = torch.ones_like(matrix, dtype=torch.bool)

    def choose(w1: torch.Tensor, h1: torch.Tensor, first: int) -> None:
        saliency = w1**2 / torch.diagonal(h1).unsqueeze(0) ** 2
        n_keep = w1.numel() - math.floor(sparsity * w1.numel())
        keep[:, first : first + w1.shape[1]] = _keep_topk(saliency, n_keep, None)

    new = _obs_sweep(matrix, hinv, lambda w, j: w * keep[:, j], choose)
    return new, keep


def prune_calibrated_(
    model: nn.Module,
    calibration: Calibration,
    sparsity: float | dict[str, float],
    *,
    method: str = "wanda",
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> list[LayerSparsity]:
    """Prune ``model`` in place by what each weight contributes to its layer's output on calibration data.

    Args:
        model: any ``nn.Module``, calibrated by :func:`~deepshrink.compress.calibrate.calibrate`.
        calibration: its statistics.
        sparsity: fraction in [0, 1) of each layer's weights to remove (already pruned
            ones included), or ``{pattern: sparsity}``.
        method: ``"wanda"`` (|W| x ||x||, no weight update, fast) or ``"sparsegpt"``
            (optimal-brain-surgeon removal with the remaining weights updated; an
            embedding has no input features, so Wanda's row-frequency ranking is used there).
        layers, filter_fn: which weights; see ``find_targets``.
        progress: a progress bar over the layers.

    Returns:
        One :class:`~deepshrink.compress.prune.LayerSparsity` per pruned weight.

    Raises:
        DeepShrinkError: unknown method, sparsity outside [0, 1), a layer already
            weight-shared (prune before sharing), an unknown layer pattern.
    """
    if method not in METHODS:
        raise DeepShrinkError(f"method={method!r} must be one of {', '.join(METHODS)}")
    targets = find_targets(model, layers, filter_fn)
    if not targets:
        raise DeepShrinkError(f"{type(model).__name__} has no compressible weight")
    if not isinstance(sparsity, dict):
        check_sparsity(sparsity)
    per_layer = resolve_per_layer(sparsity, targets, "sparsity")
    report = []
    for t in track(targets, f"pruning ({method})", show=progress):
        if per_layer[t.name] is None:
            continue
        s = check_sparsity(per_layer[t.name], f"sparsity[{t.name}]")
        comp = compression_of(t.module, t.param)
        if comp is not None and not isinstance(comp, Mask):
            raise DeepShrinkError(f"{t.name} is already {type(comp).__name__}; prune before weight sharing")
        matrix = _matrix(t).float()
        hinv = _inverse_hessian(calibration, t, matrix) if method == "sparsegpt" else None
        if hinv is None:
            keep = _wanda_mask(t, matrix, calibration, s)
        else:
            new, keep = _sparsegpt(matrix, hinv, s)
            _write_latent(t, new)
        apply_mask_(t, keep.reshape(t.weight.shape))
        report.append(layer_sparsity(t))
    return report


def share_calibrated_(
    model: nn.Module,
    calibration: Calibration,
    bits: int | dict[str, int] | None = None,
    *,
    compensate: bool = True,
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> list[LayerCodebook]:
    """Weight sharing that keeps each layer's output on calibration data, not its weights.

    Per layer: k-means over the surviving weights, each weighted by how much an error
    in it changes the output (see :meth:`Calibration.importance`); then, where the
    layer's input Gram matrix is known and ``compensate`` is on, codes assigned column
    by column with each column's rounding error folded into the next (GPTQ). Pruned
    weights stay zero. Build the optimizer after this call: codebooks are new parameters.

    Args:
        model: any ``nn.Module`` (pruned or not), calibrated.
        calibration: its statistics.
        bits: bits per code (1..16) or ``{pattern: bits}``; default 8 for conv, 5 for the rest.
        compensate: GPTQ's error feedback; off, each weight takes its nearest centroid.
        layers, filter_fn: which weights; see ``find_targets``.
        progress: a progress bar over the layers.

    Returns:
        One :class:`~deepshrink.compress.quantize.LayerCodebook` per layer (``mse``:
        the survivors' mean squared change).

    Raises:
        DeepShrinkError: bits out of range, an unknown layer pattern.
    """
    report = []
    for t, b in track(bits_per_target(model, bits, layers, filter_fn), "sharing weights (calibrated k-means)",
                      show=progress):  # fmt: skip
        matrix = _matrix(t).float()
        mask = (current_mask(t) & (t.weight.detach() != 0)).reshape(matrix.shape)
        codebook = _weighted_codebook(t, matrix, mask, calibration, b)
        hinv = _inverse_hessian(calibration, t, matrix) if compensate and codebook.numel() > 1 else None
        codes = _assign_codes(matrix, mask, codebook, hinv)
        shared = SharedWeight(codebook, codes.reshape(t.weight.shape), mask.reshape(t.weight.shape), b)
        decoded = shared(t.weight).detach().reshape(matrix.shape)
        mse = float(((matrix - decoded)[mask] ** 2).mean()) if mask.any() else 0.0
        reparametrize_(t.module, t.param, shared.to(t.weight.device))
        report.append(LayerCodebook(t.name, b, codebook.numel(), int(mask.sum()), mse))
    return report


def _assign_codes(
    matrix: torch.Tensor, mask: torch.Tensor, codebook: torch.Tensor, hinv: torch.Tensor | None
) -> torch.Tensor:
    """Each weight's code: the nearest centroid, after GPTQ's error feedback when ``hinv`` is given."""
    if hinv is None:
        return nearest_code(matrix, codebook)
    new = _obs_sweep(matrix, hinv, lambda w, j: codebook[nearest_code(w, codebook)] * mask[:, j])
    return nearest_code(new, codebook)


def _weighted_codebook(
    target: Target, matrix: torch.Tensor, mask: torch.Tensor, calibration: Calibration, bits: int
) -> torch.Tensor:
    """The ascending codebook of the survivors, by k-means weighted by importance (plain where unknown)."""
    survivors = matrix[mask]
    if survivors.numel() == 0:
        return torch.zeros(1, device=matrix.device)  # an all-zero layer still needs an (unused) entry
    importance = calibration.importance(target)
    weights = None
    if importance is not None:
        weights = importance.to(matrix.device).expand_as(matrix)[mask].double().cpu().numpy()
        weights = weights if weights.sum() > 0 else None
    centroids, _ = kmeans_1d(survivors.double().cpu().numpy(), 1 << bits, "density", weights=weights)
    return torch.from_numpy(np.sort(centroids)).to(matrix.device)
