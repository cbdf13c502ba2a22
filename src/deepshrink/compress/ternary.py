"""Trained ternary quantization (Zhu, Han, Mao, Dally, ICLR 2017).

Each selected weight becomes ``+Wp``, ``-Wn`` or 0: latent weights above
``t * max|w|`` map to ``+Wp``, below ``-t * max|w|`` to ``-Wn``, the rest to 0
(``t = 0.05`` by default, as in the paper). ``Wp`` and ``Wn`` are trainable per
layer; autograd gives each the sum of the gradients of the weights assigned
to it (the paper's rule). The full-precision latent weights keep training,
with gradients scaled by ``Wp`` on the positive set, ``Wn`` on the negative set
and 1 in between (the paper's equation 8), so weights can move between the
three sets.

Like weight sharing, this is a parametrization on the weight, so masks from an
earlier pruning hold, ``state_dict`` keeps everything, and
:func:`deepshrink.compress.quantize.compressed_tensors` turns each layer into a
:class:`~deepshrink.tensor.CompressedTensor` with a 2-entry codebook at 2 bits,
which the file format stores with its positions and entropy-codes.
"""

from __future__ import annotations

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
from deepshrink.compress.prune import Mask
from deepshrink.compress.targets import FilterFn, find_targets
from deepshrink.errors import DeepShrinkError
from deepshrink.tensor import CompressedTensor

DEFAULT_THRESHOLD = 0.05  # t in the paper, a fraction of max |w|
TERNARY_BITS = 2  # the paper's 2-bit storage; the file's entropy coder takes the codes to about 1 bit


def check_threshold(threshold: object) -> float:
    """Validate a ternary threshold factor ``t`` in [0, 1).

    Raises:
        DeepShrinkError: naming the value otherwise.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise DeepShrinkError(f"threshold={threshold!r} must be a number in [0, 1) (a fraction of max |w|)")
    return float(threshold)


@register_compression
class TernaryWeight(Compression):
    """Parametrization ``w -> Wp * [w > d] - Wn * [w < -d]``, ``d = t * max|w * mask|``.

    Args:
        wp, wn: initial positive and negative scales (both > 0 for a sign-true ternary).
        mask: bool, weights pruned before stay zero.
        threshold: ``t``.
    """

    state_keys = ("wp", "wn", "mask", "_extra_state")
    bits = TERNARY_BITS

    def __init__(
        self,
        wp: float | torch.Tensor,
        wn: float | torch.Tensor,
        mask: torch.Tensor,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        super().__init__()
        self.threshold = check_threshold(threshold)
        self.wp = nn.Parameter(torch.as_tensor(wp, dtype=torch.float32).reshape(()).clone())
        self.wn = nn.Parameter(torch.as_tensor(wn, dtype=torch.float32).reshape(()).clone())
        self.register_buffer("mask", mask.to(torch.bool))

    @property
    def codebook(self) -> torch.Tensor:
        """``[-Wn, +Wp]``, the values the codes index (as in weight sharing)."""
        return torch.stack([-self.wn.detach(), self.wp.detach()])

    def sets(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool masks of the latent weights mapped to ``+Wp`` and to ``-Wn``."""
        latent = weight.detach() * self.mask
        delta = self.threshold * latent.abs().max()
        return (latent > delta) & self.mask, (latent < -delta) & self.mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        pos, neg = self.sets(weight)
        ternary = self.wp * pos - self.wn * neg
        # Zero in value, but carries the scaled latent gradient (Wp / 1 / Wn by set).
        scale = torch.where(pos, self.wp.detach(), torch.where(neg, self.wn.detach(), torch.ones_like(self.wp)))
        latent = weight * self.mask * scale
        return ternary + (latent - latent.detach())

    def get_extra_state(self) -> dict:
        return {"threshold": self.threshold}

    def set_extra_state(self, state: dict) -> None:
        self.threshold = check_threshold(state["threshold"])

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> TernaryWeight:
        return cls(state["wp"], state["wn"], state["mask"], state["_extra_state"]["threshold"])

    def to_compressed(self, weight: torch.Tensor) -> CompressedTensor:
        """Positions of the non-zero weights, code 0 for ``-Wn`` and 1 for ``+Wp``, at 2 bits."""
        flat = weight.detach().reshape(-1).cpu().numpy()
        wp = np.float32(self.wp.detach().cpu())
        positions = np.flatnonzero(flat)
        codes = (flat[positions] == wp).astype(np.uint8)
        return CompressedTensor(tuple(weight.shape), positions, codes, self.codebook.cpu().numpy(), self.bits)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, wp={self.wp.item():.4g}, wn={self.wn.item():.4g}"


@dataclass(frozen=True)
class LayerTernary:
    """One row of the ternarization report."""

    name: str
    wp: float
    wn: float
    positive: int
    negative: int
    weights: int

    @property
    def density(self) -> float:
        return (self.positive + self.negative) / self.weights if self.weights else 0.0


def ternarize_(
    model: nn.Module,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[LayerTernary]:
    """Make each selected weight ternary in place, with trainable scales.

    ``Wp`` and ``Wn`` start at the mean magnitude of the weights in their set
    (the least-squares fit of the latent weights), so accuracy right after
    ternarization is a fair start for fine-tuning. A pruned layer keeps its
    zeros. Build the optimizer after this call: ``Wp`` and ``Wn`` are new
    parameters.

    Args:
        model: any ``nn.Module``.
        threshold: ``t``; a latent weight counts as zero when ``|w| <= t * max|w|``.
        layers, filter_fn: which weights; see ``find_targets`` (the paper
            leaves the first and last layers in full precision).

    Returns:
        One :class:`LayerTernary` per layer.

    Raises:
        DeepShrinkError: a bad threshold or layer pattern, or a layer already
            weight-shared (ternarize a dense or pruned model).

    Examples:
        >>> net = nn.Sequential(nn.Linear(16, 8))
        >>> report = ternarize_(net)
        >>> len(torch.unique(net[0].weight.detach()))
        3
    """
    threshold = check_threshold(threshold)
    targets = find_targets(model, layers, filter_fn)
    if not targets:
        raise DeepShrinkError(f"{type(model).__name__} has no compressible weight")
    report = []
    for t in targets:
        comp = compression_of(t.module, t.param)
        if comp is not None and not isinstance(comp, (Mask, TernaryWeight)):
            raise DeepShrinkError(f"{t.name} is already {type(comp).__name__}; ternarize a dense or pruned model")
        mask = current_mask(t).clone()
        probe = TernaryWeight(1.0, 1.0, mask, threshold).to(t.weight.device)
        pos, neg = probe.sets(t.weight)
        w = t.weight.detach()
        wp = w[pos].abs().mean().item() if pos.any() else 0.0
        wn = w[neg].abs().mean().item() if neg.any() else 0.0
        reparametrize_(t.module, t.param, TernaryWeight(wp, wn, mask, threshold).to(w.device))
        report.append(LayerTernary(t.name, wp, wn, int(pos.sum()), int(neg.sum()), w.numel()))
    return report
