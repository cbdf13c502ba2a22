"""Linear layers declared to compute in int8: the PyTorch model then computes what the engine's int8 kernels do.

A declared layer's output is its int8 product: each input row (a token) rounded to int8 on
its own scale, the codebook to int8 with one scale (far centroids kept in float32), exact
integer sums, then the float32 steps of
:func:`~deepshrink.arithmetic.int8_matmul_reference`, the reference the engine's
kernels are bit-exact against. So a declared model gives the same numbers in PyTorch (to
evaluate it, on any data) and on the engine (to run it): ONNX's quantize-dequantize models
are the same idea. The declaration travels in the file (each tensor's ``arithmetic``), and
:func:`~deepshrink.fileformat.model_io.load_into` and the engine both follow it.

Declare after training: the outputs come from the weights as they were declared, and
carry no gradient (the layers refuse to run in training mode).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.arithmetic import int8_matmul_reference, int8_weights
from deepshrink.compress.parametrization import Compression, compression_of
from deepshrink.compress.targets import find_targets
from deepshrink.errors import DeepShrinkError
from deepshrink.tensor import CompressedTensor

#: Columns an int8 product takes: its int32 sums hold at most 65,535 columns of 255 x 127.
MAX_INT8_COLUMNS = (1 << 16) - 1


class Int8Product:
    """A forward hook making an ``nn.Linear`` output its int8 product (see the module docstring)."""

    def __init__(self, tensor: CompressedTensor) -> None:
        self.tensor = tensor
        self._weights: tuple | None = None  # made at the first call: a model compiled for the engine never needs them

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if module.training and torch.is_grad_enabled():
            raise DeepShrinkError("a Linear declared int8 computes no gradient: call model.eval() (declare int8 "
                                  "after training)")  # fmt: skip
        x = args[0].detach()
        rows = x.reshape(-1, x.shape[-1]).to("cpu", torch.float32).numpy()
        bias = np.zeros(self.tensor.shape[0], np.float32) if module.bias is None else module.bias.detach().cpu().numpy()
        if self._weights is None:
            self._weights = int8_weights(self.tensor)
        weights, scale, outliers = self._weights
        out = int8_matmul_reference(rows, weights, scale, bias.astype(np.float32, copy=False), outliers)
        return torch.from_numpy(out).reshape(*x.shape[:-1], -1).to(output.device, output.dtype)


def _hook_of(module: nn.Module) -> int | None:
    """The id of ``module``'s :class:`Int8Product` hook, or None."""
    return next((key for key, hook in module._forward_hooks.items() if isinstance(hook, Int8Product)), None)


def computes_in_int8(module: nn.Module) -> bool:
    """Whether ``module`` was declared to compute in int8 (:func:`compute_in_int8_`)."""
    return _hook_of(module) is not None


def compute_in_int8_(model: nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Make the compressed ``nn.Linear`` layers of ``model`` compute in int8, and be saved so.

    Args:
        model: a model whose weights deepshrink compressed (pruned and/or shared).
        layers: patterns as in :func:`~deepshrink.compress.targets.find_targets`; ``None``:
            every compressed Linear (other layers, embeddings and convolutions, stay float32).

    Returns:
        The names of the weights declared.

    Raises:
        DeepShrinkError: a selected weight is not an ``nn.Linear``'s or is not compressed, a
            Linear has 65,536 input features or more, or nothing is selected.
    """
    tensors = {}
    for t in find_targets(model, layers, warn_unsupported=False):
        linear = isinstance(t.module, nn.Linear) and t.param == "weight"
        compression = compression_of(t.module, t.param)
        if layers is None and not (linear and isinstance(compression, Compression)):
            continue
        if linear and not isinstance(compression, Compression):
            raise DeepShrinkError(f"{t.name} is not compressed: prune or share it before declaring int8")
        tensors[t.name] = compression.to_compressed(t.weight.detach()).with_arithmetic("int8") if linear else None
    if not tensors:
        raise DeepShrinkError(f"{type(model).__name__} has no compressed nn.Linear to compute in int8")
    return install_int8_(model, tensors)


def install_int8_(model: nn.Module, tensors: dict[str, CompressedTensor | None]) -> list[str]:
    """Make the layers whose weights ``tensors`` declares int8 (by name) compute in int8 (see the module docstring).

    Returns:
        Their names.

    Raises:
        DeepShrinkError: a weight declared int8 is not an ``nn.Linear``'s (``None`` stands for one that is
            not), or has 65,536 columns or more.
    """
    modules = dict(model.named_modules())
    declared = []
    for name, tensor in tensors.items():
        if tensor is not None and tensor.arithmetic != "int8":
            continue
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        if tensor is None or not (isinstance(module, nn.Linear) and param == "weight"):
            layer = "no layer" if module is None else parametrize.type_before_parametrizations(module).__name__
            raise DeepShrinkError(f"{name} ({layer}): only nn.Linear layers compute in int8")
        if module.in_features > MAX_INT8_COLUMNS:
            raise DeepShrinkError(f"{name} has {module.in_features:,} input features; int8 products take at "
                                  f"most {MAX_INT8_COLUMNS:,} (int32 sums)")  # fmt: skip
        old = _hook_of(module)
        if old is not None:
            del module._forward_hooks[old]
        module.register_forward_hook(Int8Product(tensor))
        declared.append(name)
    return declared


def compute_in_float32_(model: nn.Module) -> nn.Module:
    """Undo :func:`compute_in_int8_`: every Linear of ``model`` computes in float32 again. Returns ``model``."""
    for module in model.modules():
        hook = _hook_of(module)
        if hook is not None:
            del module._forward_hooks[hook]
    return model
