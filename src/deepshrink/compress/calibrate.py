"""What each layer sees: statistics of its inputs over unlabelled calibration batches.

One-shot compression of a pretrained model needs no labels, only inputs like the
ones it will serve. For every weight a stage may touch, :func:`calibrate` runs the
model over the batches and keeps

- for ``nn.Linear`` and ``nn.Conv1d`` / ``nn.Conv2d`` (ungrouped): the Gram matrix
  ``H = sum x x^T`` of the layer's input vectors (convolution inputs as the patches
  the kernel sees), the Hessian of the layer's squared output error that Wanda
  (its diagonal), SparseGPT and GPTQ (all of it) rely on;
- for ``nn.Embedding``: how often each row was looked up.

Other layer types get no statistics; the one-shot stages fall back to plain
magnitudes there. Padding is left out: when a batch is a mapping with an
``attention_mask`` (a tokenizer's output), only the positions it marks count.
Under ``torchrun`` the sums are added over all ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.compress.targets import FilterFn, Target, find_targets
from deepshrink.errors import DeepShrinkError
from deepshrink.progress import track

Batch = torch.Tensor | tuple | list | dict


@dataclass
class LayerStats:
    """The calibration statistics of one weight.

    Attributes:
        gram: ``sum x x^T`` over the layer's input vectors (float32, on the model's
            device), shape ``[fan_in, fan_in]``; ``None`` for embeddings.
        lookups: for an embedding, how often each row was used; else ``None``.
        vectors: how many input vectors (or lookups) were summed.
    """

    gram: torch.Tensor | None = None
    lookups: torch.Tensor | None = None
    vectors: int = 0

    def input_energy(self) -> torch.Tensor:
        """Mean squared value of each input feature (``diag(H) / vectors``): Wanda's ``||x_j||^2``, scaled."""
        if self.gram is None:
            raise DeepShrinkError("an embedding has no input features; use lookups")
        return torch.diagonal(self.gram) / max(self.vectors, 1)


@dataclass
class Calibration:
    """Statistics per target name (``encoder.layer.0.attention.self.query.weight``)."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    batches: int = 0

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def importance(self, target: Target) -> torch.Tensor | None:
        """How much each weight of ``target`` matters to the layer's output, broadcastable to its 2-D view.

        For a weight ``W[o, i]`` of a linear map the squared output error of a change
        ``d`` is about ``d^2 H[i, i]``, so ``diag(H)`` per input column; for an embedding,
        the row's lookup count plus a floor of 1% of the mean (a row never seen in
        calibration may still be used later). ``None`` without statistics.
        """
        stats = self.layers.get(target.name)
        if stats is None:
            return None
        if stats.lookups is not None:
            counts = stats.lookups.float()
            return (counts + 0.01 * counts.mean().clamp(min=1e-12)).unsqueeze(1)
        return stats.input_energy().float().clamp(min=0).unsqueeze(0)


def call_model(model: nn.Module, batch: Batch) -> object:
    """Run ``model`` on one batch: a mapping as keyword arguments, a tuple or list as positional ones."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor in it moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch


def _token_mask(batch: Batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` (``[..., features]``) at real positions: ``mask`` is ``[batch, sequence]``."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Convolution input as the rows the kernel multiplies: ``[patches, in_channels * kernel]``."""
    kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    if x.dim() == len(kernel) + 1:  # one unbatched sample
        x = x.unsqueeze(0)
    if len(kernel) == 1:  # a 1-D convolution is a 2-D one of height 1
        x = x.unsqueeze(-2)
        kernel, dilation, padding, stride = (1, *kernel), (1, *dilation), (0, *padding), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _calibrated_kind(target: Target) -> str | None:
    module = target.module
    kind = parametrize.type_before_parametrizations(module)
    if kind is nn.Linear:
        return "linear"
    if kind in (nn.Conv1d, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return None if isinstance(module.padding, str) else "conv"
    if kind is nn.Embedding:
        return "embedding"
    return None


class _Collector:
    """Forward hooks that add one layer's statistics per batch."""

    def __init__(self, target: Target, kind: str, stats: LayerStats) -> None:
        self.target, self.kind, self.stats = target, kind, stats
        self.mask: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        x = inputs[0].detach()
        if self.kind == "embedding":
            ids = x[self.mask.to(x.device)] if self.mask is not None and x.shape == self.mask.shape else x.reshape(-1)
            counts = torch.bincount(ids.reshape(-1), minlength=module.num_embeddings)
            self.stats.lookups = counts if self.stats.lookups is None else self.stats.lookups + counts
            self.stats.vectors += ids.numel()
            return
        rows = _tokens(x, self.mask) if self.kind == "linear" else _patches(module, x)
        rows = rows.float()
        gram = rows.T @ rows
        self.stats.gram = gram if self.stats.gram is None else self.stats.gram + gram
        self.stats.vectors += rows.shape[0]


def _reduce(calibration: Calibration) -> None:
    """Add every rank's sums (under torchrun), so all ranks hold the same statistics."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for stats in calibration.layers.values():
        for name in ("gram", "lookups"):
            value = getattr(stats, name)
            if value is not None:
                dist.all_reduce(value)
        vectors = torch.tensor([stats.vectors], dtype=torch.float64)
        dist.all_reduce(vectors)
        stats.vectors = int(vectors.item())


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> Calibration:
    """Run ``model`` (in eval mode) over ``batches`` and collect each target's input statistics.

    Args:
        model: any ``nn.Module``; its targets are found as every stage finds them.
        batches: inputs only, no labels: tensors, tuples (positional arguments) or
            mappings (keyword arguments, e.g. a tokenizer's output; padding marked
            by its ``attention_mask`` is left out). Moved to the model's device.
        layers, filter_fn: which weights; see ``find_targets``.
        progress: a progress bar over the batches.

    Returns:
        A :class:`Calibration` with an entry for each Linear, ungrouped Conv1d/Conv2d
        and Embedding target the batches reached.

    Raises:
        DeepShrinkError: no batch, or no target was reached by any batch.

    Examples:
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> calib = calibrate(net, [torch.ones(4, 3)], progress=False)
        >>> calib.layers["0.weight"].gram.tolist(), calib.layers["0.weight"].vectors
        ([[4.0, 4.0, 4.0], [4.0, 4.0, 4.0], [4.0, 4.0, 4.0]], 4)
    """
    targets = find_targets(model, layers, filter_fn, warn_unsupported=False)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    calibration = Calibration()
    collectors = []
    for t in targets:
        kind = _calibrated_kind(t)
        if kind is not None:
            collectors.append(_Collector(t, kind, calibration.layers.setdefault(t.name, LayerStats())))
    handles = [c.target.module.register_forward_hook(c) for c in collectors]
    was_training = model.training
    model.eval()
    try:
        for batch in track(batches, "calibrating", show=progress):
            mask = _token_mask(batch)
            for c in collectors:
                c.mask = mask
            call_model(model, batch_to(batch, device))
            calibration.batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if calibration.batches == 0:
        raise DeepShrinkError("calibration needs at least one batch of inputs")
    calibration.layers = {k: v for k, v in calibration.layers.items() if v.vectors > 0}
    _reduce(calibration)
    if collectors and not calibration.layers:
        raise DeepShrinkError("no compressible layer saw any input during calibration")
    return calibration
