"""Load-balance-aware pruning (ESE, Han et al., FPGA 2017).

On EIE and ESE, row ``i`` of a weight matrix belongs to processing element
``i mod N``. Plain magnitude pruning leaves some PEs with more surviving weights
than others, and every PE waits for the busiest one. Load-balance-aware pruning
splits the matrix view (rows = dimension 0, for an LSTM the four stacked gate
matrices) into the ``N`` row-interleaved sub-matrices the PEs will own and
prunes each to the same sparsity, by magnitude inside the sub-matrix, so every
PE gets the same number of weights.

It works on any compressible weight (Linear, Conv, LSTM/GRU gates, Embedding)
and composes with :func:`deepshrink.compress.prune.prune_`: both AND their masks into
the same :class:`~deepshrink.compress.prune.Mask` through :func:`~deepshrink.compress.prune.apply_mask_`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from deepshrink.compress.prune import LayerSparsity, apply_mask_, check_sparsity, layer_sparsity, sparsity_per_target
from deepshrink.compress.targets import FilterFn
from deepshrink.errors import DeepShrinkError
from deepshrink.tensor import CompressedTensor


def check_n_pe(n_pe: object) -> int:
    """Validate a number of processing elements.

    Raises:
        DeepShrinkError: naming the value, unless it is an integer >= 1.
    """
    if isinstance(n_pe, bool) or not isinstance(n_pe, (int, np.integer)) or n_pe < 1:
        raise DeepShrinkError(f"n_pe={n_pe!r} must be a positive integer (the number of processing elements)")
    return int(n_pe)


def balanced_mask(weight: torch.Tensor, sparsity: float, n_pe: int) -> torch.Tensor:
    """Keep the largest magnitudes of each PE's rows, the same fraction for every PE.

    Args:
        weight: any tensor; its matrix view has ``shape[0]`` rows.
        sparsity: fraction in [0, 1) of each sub-matrix to remove.
        n_pe: processing elements; row ``i`` goes to PE ``i % n_pe``.

    Returns:
        A bool mask of ``weight``'s shape. Sub-matrix ``p`` keeps
        ``numel_p - floor(sparsity * numel_p)`` weights (PEs with one row fewer,
        when ``n_pe`` does not divide the rows, keep proportionally fewer).

    Raises:
        DeepShrinkError: a sparsity outside [0, 1) or a bad ``n_pe``.

    Examples:
        >>> w = torch.tensor([[8.0, 7.0], [1.0, 2.0], [6.0, 5.0], [3.0, 4.0]])
        >>> balanced_mask(w, 0.5, 2).int().tolist()  # plain pruning keeps rows 0 and 2, both PE 0's
        [[1, 1], [0, 0], [0, 0], [1, 1]]
    """
    sparsity = check_sparsity(sparsity)
    n_pe = check_n_pe(n_pe)
    matrix = weight.detach().abs().reshape(weight.shape[0], math.prod(weight.shape[1:]))  # (rows, cols)
    mask = torch.zeros(matrix.shape, dtype=torch.bool, device=weight.device)
    for pe in range(min(n_pe, matrix.shape[0])):
        sub = matrix[pe::n_pe].reshape(-1)  # this PE's rows, flattened
        n_keep = sub.numel() - math.floor(sparsity * sub.numel())
        kept = torch.zeros(sub.numel(), dtype=torch.bool, device=weight.device)
        kept[torch.topk(sub, n_keep, sorted=False).indices] = True
        mask[pe::n_pe] = kept.reshape(-1, matrix.shape[1])
    return mask.reshape(weight.shape)


def prune_balanced_(
    model: nn.Module,
    sparsity: float | dict[str, float],
    n_pe: int,
    *,
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[LayerSparsity]:
    """Prune ``model`` in place so that every PE's sub-matrix has the same sparsity.

    Args:
        model: any ``nn.Module``; see :func:`deepshrink.compress.targets.find_targets`.
        sparsity: fraction in [0, 1) of each layer to remove, or
            ``{pattern: sparsity}`` (``"*"`` for the rest). As with
            :func:`~deepshrink.compress.prune.prune_`, it counts weights already pruned.
        n_pe: processing elements the rows are interleaved over (ESE and EIE:
            row ``i`` to PE ``i mod n_pe``).
        layers, filter_fn: which weights; see ``find_targets``.

    Returns:
        One :class:`~deepshrink.compress.prune.LayerSparsity` per pruned weight.

    Raises:
        DeepShrinkError: an out-of-range sparsity or ``n_pe``, an unknown layer
            pattern, or a layer that is already weight-shared.

    Examples:
        >>> net = nn.Sequential(nn.Linear(16, 8))
        >>> [r.kept for r in prune_balanced_(net, 0.75, n_pe=4)]
        [32]
        >>> pe_loads(CompressedTensor.from_dense(net[0].weight.detach()), 4).tolist()
        [8, 8, 8, 8]
    """
    n_pe = check_n_pe(n_pe)
    report = []
    for t, s in sparsity_per_target(model, sparsity, layers, filter_fn):
        apply_mask_(t, balanced_mask(t.weight, s, n_pe))
        report.append(layer_sparsity(t))
    return report


def pe_loads(tensor: CompressedTensor, n_pe: int) -> np.ndarray:
    """Surviving weights each PE holds when row ``i`` goes to PE ``i % n_pe``.

    Returns:
        ``(n_pe,)`` int64.

    Raises:
        DeepShrinkError: a bad ``n_pe``.
    """
    rows, _ = tensor.rows_cols()
    return np.bincount(rows % check_n_pe(n_pe), minlength=n_pe).astype(np.int64)


def load_balance(tensor: CompressedTensor, n_pe: int) -> float:
    """Mean over max of :func:`pe_loads`: 1.0 when every PE has the same work.

    This is the best utilisation a matrix allows if every column were
    broadcast; the simulator's ``load_efficiency`` also counts per-column
    imbalance and queueing.

    Examples:
        >>> t = CompressedTensor.from_dense(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
        >>> load_balance(t, 2)
        0.75
    """
    loads = pe_loads(tensor, n_pe)
    return float(loads.mean() / loads.max()) if loads.max() > 0 else 1.0
