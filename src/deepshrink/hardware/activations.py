"""Real input activations of a model's compressed layers, for the simulator.

EIE skips zero activations, so a layer's cost depends on the data. This module runs a
model on real inputs and records what each compressed matrix is multiplied with: a
``Linear`` layer's input vector, or a ``Conv2d`` layer's im2col patches (one matrix-vector
product per output position).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from deepshrink.errors import UnsupportedLayerError


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    module_name, _, param = param_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if (
        param != "weight"
        or not isinstance(module, (nn.Linear, nn.Conv2d))
        or (isinstance(module, nn.Conv2d) and module.groups != 1)
    ):
        raise UnsupportedLayerError(
            f"cannot record the inputs of {param_name!r} ({type(module).__name__}); activations are recorded "
            "for the weight of nn.Linear and nn.Conv2d (groups=1); give an activation density instead"
        )
    return module


def _matrix_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the weight's matrix view multiplies: ``(vectors, in_features)`` or im2col patches."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"Conv2d with padding={module.padding!r}, padding_mode={module.padding_mode!r}: "
            "give an activation density instead"
        )
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, C*kh*kw, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B*L, C*kh*kw)


@torch.no_grad()
def layer_inputs(
    model: nn.Module, names: Iterable[str], inputs: torch.Tensor, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Record the input vectors each named weight multiplies while ``model`` runs on ``inputs``.

    Args:
        model: the (compressed) model; it is run in eval mode and left as it was.
        names: parameter names such as ``"fc1.weight"`` (keys of ``compressed_tensors``).
        inputs: a batch of model inputs.
        batch_size: inputs per forward pass.

    Returns:
        ``{name: (vectors, cols) float32}``, one row per matrix-vector product, in the
        weight's matrix-view column order.

    Raises:
        UnsupportedLayerError: a name is not the weight of an ``nn.Linear`` or a
            ``groups=1`` ``nn.Conv2d`` with numeric zero padding.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> {k: v.shape for k, v in layer_inputs(net, ["0.weight", "2.weight"], torch.ones(5, 4)).items()}
        {'0.weight': (5, 4), '2.weight': (5, 3)}
    """
    owners = {name: _owner(model, name) for name in names}
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in owners}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: recorded[name].append(_matrix_inputs(m, args[0])))
        for name, module in owners.items()
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {name: torch.cat(chunks).float().cpu().numpy() for name, chunks in recorded.items() if chunks}
