"""Layers declared to compute in int8: the PyTorch model then computes what the engine's int8 kernels do.

A declared layer's output is its int8 product: each input row (a token; for a convolution,
each output position's patch) rounded to int8 on its own scale, the codebook to int8 with one
scale (far centroids kept in float32), exact integer sums, then the float32 steps of
:func:`~deepshrink.arithmetic.int8_matmul_reference`, the reference the engine's kernels are
bit-exact against. So a declared model gives the same numbers in PyTorch (to evaluate it, on
any data) and on the engine (to run it): ONNX's quantize-dequantize models are the same idea.
The declaration travels in the file (each tensor's ``arithmetic``), and
:func:`~deepshrink.fileformat.model_io.load_into` and the engine both follow it.

``nn.Linear`` layers and ``nn.Conv1d`` / ``nn.Conv2d`` ones with ``groups=1`` and zero
padding can be declared. Declare after training: the outputs come from the weights as they
were declared, and carry no gradient (the layers refuse to run in training mode).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.arithmetic import (
    MAX_INT8_COLUMNS,
    as_conv2d,
    int8_conv2d_reference,
    int8_matmul_reference,
    int8_weights,
    taps_first,
)
from deepshrink.compress.parametrization import Compression, compression_of
from deepshrink.compress.targets import find_targets
from deepshrink.errors import DeepShrinkError
from deepshrink.tensor import CompressedTensor


def can_compute_in_int8(module: nn.Module, param: str) -> bool:
    """Whether ``module.<param>`` may be declared int8: an ``nn.Linear``'s weight, or an ``nn.Conv1d`` /
    ``nn.Conv2d``'s with ``groups=1`` and zero padding (the products the engine's int8 kernels run)."""
    if param != "weight":
        return False
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def check_int8_layer(name: str, module: nn.Module | None, param: str) -> None:
    """Raise, naming it, unless the weight ``name`` (``module.<param>``) can compute in int8 (:func:`can_compute_in_int8`)."""
    if module is None or not can_compute_in_int8(module, param):
        layer = "no layer" if module is None else parametrize.type_before_parametrizations(module).__name__
        raise DeepShrinkError(f"{name} ({layer}): only nn.Linear and nn.Conv1d / nn.Conv2d (groups=1, zero "
                              "padding) layers compute in int8")  # fmt: skip


class Int8Product:
    """A forward hook making a layer output its int8 product (see the module docstring)."""

    def __init__(self, tensor: CompressedTensor) -> None:
        self.tensor = tensor
        self._weights: tuple | None = None  # made at the first call: a model compiled for the engine never needs them

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if module.training and torch.is_grad_enabled():
            raise DeepShrinkError("a layer declared int8 computes no gradient: call model.eval() (declare int8 "
                                  "after training)")  # fmt: skip
        if self._weights is None:
            self._weights = int8_weights(self._matrix(module))
        weights, scale, outliers = self._weights
        x = args[0].detach().to("cpu", torch.float32)
        bias = np.zeros(self.tensor.shape[0], np.float32) if module.bias is None else module.bias.detach().cpu().numpy()
        bias = bias.astype(np.float32, copy=False)
        if isinstance(module, nn.Linear):
            out = int8_matmul_reference(x.reshape(-1, x.shape[-1]).numpy(), weights, scale, bias, outliers)
            out = torch.from_numpy(out).reshape(*x.shape[:-1], -1)
        elif isinstance(module, nn.Conv1d):  # a 1-row 2-D convolution, as the engine runs it
            padding = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
            out = int8_conv2d_reference(x.unsqueeze(2).numpy(), weights, scale, bias, outliers,
                                        (1, module.kernel_size[0]), (1, module.stride[0]), padding,
                                        (1, module.dilation[0]))  # fmt: skip
            out = torch.from_numpy(out).squeeze(2)
        else:
            out = int8_conv2d_reference(x.numpy(), weights, scale, bias, outliers, module.kernel_size, module.stride,
                                        module.padding, module.dilation)  # fmt: skip
            out = torch.from_numpy(out)
        return out.to(output.device, output.dtype)

    def _matrix(self, module: nn.Module) -> CompressedTensor:
        """The matrix the engine multiplies: a Linear's weight, a convolution's patch by patch (tap by tap)."""
        if isinstance(module, nn.Linear):
            return self.tensor
        return taps_first(as_conv2d(self.tensor) if isinstance(module, nn.Conv1d) else self.tensor)


def _remove_hook(module: nn.Module) -> None:
    """Remove ``module``'s :class:`Int8Product` hook, if it has one."""
    for key in [key for key, hook in module._forward_hooks.items() if isinstance(hook, Int8Product)]:
        del module._forward_hooks[key]


def computes_in_int8(module: nn.Module) -> bool:
    """Whether ``module`` was declared to compute in int8 (:func:`compute_in_int8_`)."""
    return any(isinstance(hook, Int8Product) for hook in module._forward_hooks.values())


def compute_in_int8_(model: nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Make the compressed layers of ``model`` that can (:func:`can_compute_in_int8`) compute in int8, and be saved so.

    Args:
        model: a model whose weights deepshrink compressed (pruned and/or shared).
        layers: patterns as in :func:`~deepshrink.compress.targets.find_targets`; ``None``:
            every compressed layer that can (embeddings, grouped convolutions and LSTMs stay float32).

    Returns:
        The names of the weights declared.

    Raises:
        DeepShrinkError: a selected weight cannot be declared or is not compressed, a layer's
            product has 65,536 columns or more, or nothing is selected.
    """
    tensors = {}
    for t in find_targets(model, layers, warn_unsupported=False):
        able = can_compute_in_int8(t.module, t.param)
        compression = compression_of(t.module, t.param)
        if layers is None and not (able and isinstance(compression, Compression)):
            continue
        if able and not isinstance(compression, Compression):
            raise DeepShrinkError(f"{t.name} is not compressed: prune or share it before declaring int8")
        tensors[t.name] = compression.to_compressed(t.weight.detach()).with_arithmetic("int8") if able else None
    if not tensors:
        raise DeepShrinkError(f"{type(model).__name__} has no compressed layer that can compute in int8")
    return install_int8_(model, tensors)


def install_int8_(model: nn.Module, tensors: dict[str, CompressedTensor | None]) -> list[str]:
    """Make the layers whose weights ``tensors`` declares int8 (by name) compute in int8 (see the module docstring).

    Returns:
        Their names.

    Raises:
        DeepShrinkError: a weight declared int8 cannot be (:func:`can_compute_in_int8`; ``None``
            stands for one that cannot), or its product has 65,536 columns or more.
    """
    modules = dict(model.named_modules())
    declared = []
    for name, tensor in tensors.items():
        if tensor is not None and tensor.arithmetic != "int8":
            continue
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        check_int8_layer(name, module, param)  # a None tensor is one that cannot: so it raises
        columns = math.prod(tensor.shape[1:])
        if columns > MAX_INT8_COLUMNS:
            raise DeepShrinkError(f"{name}: its products have {columns:,} columns; int8 products take at most "
                                  f"{MAX_INT8_COLUMNS:,} (int32 sums)")  # fmt: skip
        _remove_hook(module)
        module.register_forward_hook(Int8Product(tensor))
        declared.append(name)
    return declared


def fake_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each row (last axis) rounded to int8 on its own scale as the int8 products do, the gradient
    passed straight through (the rounding's, zero almost everywhere, would stop training)."""
    rows = x.detach()
    peak = rows.abs().amax(-1, keepdim=True)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    rounded = torch.round(rows * (127 / safe)).clamp(-127, 127) * (safe / 127)
    return x + (torch.where(peak > 0, rounded, torch.zeros_like(rows)) - rows)


def train_with_int8_inputs(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Round the inputs of ``model``'s compressed ``nn.Linear`` layers to int8 per token while it trains
    (:func:`fake_int8`), so that its weights learn the rounding before the layers are declared int8.

    Convolutions are left out: their int8 products round each output position's patch on its own,
    which no rounding of the input image reproduces.

    Returns:
        The hooks' handles: ``remove()`` each when training is done.
    """
    handles = []
    for t in find_targets(model, warn_unsupported=False):
        if isinstance(t.module, nn.Linear) and t.param == "weight" and compression_of(t.module, t.param) is not None:
            handles.append(t.module.register_forward_pre_hook(lambda module, args: (fake_int8(args[0]), *args[1:])))
    return handles


def compute_in_float32_(model: nn.Module) -> nn.Module:
    """Undo :func:`compute_in_int8_`: every layer of ``model`` computes in float32 again. Returns ``model``."""
    for module in model.modules():
        _remove_hook(module)
    return model
