"""Modules that replace ``nn.Linear`` and ``nn.Conv2d`` and compute from the compressed weight.

They are inference-only: inputs are detached, no gradient flows, and the dense
weight is never built (a convolution becomes im2col times the sparse matrix).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.engine.matrix import SparseMatrix
from deepshrink.errors import DeepShrinkError, UnsupportedLayerError
from deepshrink.tensor import CompressedTensor


def _as_numpy(x: torch.Tensor, layer: str) -> np.ndarray:
    """A CPU float32 tensor as a NumPy view (no copy when already contiguous)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        got = f"{x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DeepShrinkError(f"{layer} takes a float32 CPU tensor, got {got}")
    return x.detach().contiguous().numpy()


def _bias_buffer(bias: torch.Tensor | None, size: int, layer: str) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = torch.as_tensor(bias).detach().to(torch.float32).reshape(-1).clone()
    if bias.numel() != size:
        raise DeepShrinkError(f"{layer}: bias has {bias.numel()} entries, the weight has {size} rows")
    return bias


class SparseLinear(nn.Module):
    """``y = W x + b`` computed from a compressed ``W`` (drop-in for ``nn.Linear`` at inference).

    Batch 1 runs EIE's interleaved-CSC kernel (zero activations skipped); larger
    batches run the kernel :class:`~deepshrink.engine.matrix.SparseMatrix` picks.

    Args:
        weight: ``(out_features, in_features)`` compressed weight.
        bias: ``(out_features,)`` or ``None``.
        workers: rows are interleaved over this many workers (default: numba's threads).
        fixed_point: EIE's 16-bit fixed-point arithmetic instead of fp32.

    Raises:
        DeepShrinkError: ``weight`` is not 2-D or ``bias`` does not match.

    Examples:
        >>> w = CompressedTensor.from_dense(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
        >>> SparseLinear(w, torch.tensor([0.5, 0.0]))(torch.tensor([[1.0, 3.0]])).tolist()
        [[6.5, 1.0]]
    """

    def __init__(
        self,
        weight: CompressedTensor,
        bias: torch.Tensor | None = None,
        *,
        workers: int | None = None,
        fixed_point: bool = False,
    ) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise DeepShrinkError(f"SparseLinear needs a 2-D weight, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.matrix = SparseMatrix(weight, workers, fixed_point)
        self.register_buffer("bias", _bias_buffer(bias, self.out_features, "SparseLinear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise DeepShrinkError(f"SparseLinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        flat = _as_numpy(x, "SparseLinear").reshape(-1, self.in_features)  # (B, in)
        y = self.matrix.matmul(flat)  # (B, out), freshly allocated: add the bias in place
        if self.bias is not None:
            y += self.bias.numpy()
        return torch.from_numpy(y).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.matrix!r}, bias={self.bias is not None}"


class SparseConv2d(nn.Module):
    """A 2-D convolution as im2col times the compressed ``(out, in * kh * kw)`` matrix.

    Every (image, output position) pair is one column of the batch, so even a
    single image runs the batched row-parallel kernel.

    Args:
        weight: ``(out_channels, in_channels, kh, kw)`` compressed weight.
        bias: ``(out_channels,)`` or ``None``.
        stride, padding, dilation: as in ``nn.Conv2d`` (numeric padding only).
        workers, fixed_point: as in :class:`SparseLinear`.

    Raises:
        DeepShrinkError: ``weight`` is not 4-D, ``padding`` is a string, or
            ``bias`` does not match.
    """

    def __init__(
        self,
        weight: CompressedTensor,
        bias: torch.Tensor | None = None,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        workers: int | None = None,
        fixed_point: bool = False,
    ) -> None:
        super().__init__()
        if len(weight.shape) != 4:
            raise DeepShrinkError(f"SparseConv2d needs a 4-D weight, got shape {weight.shape}")
        if isinstance(padding, str):
            raise DeepShrinkError(f"SparseConv2d takes numeric padding, got padding={padding!r}")
        self.out_channels, self.in_channels, *kernel = weight.shape
        self.kernel_size = tuple(kernel)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.matrix = SparseMatrix(weight, workers, fixed_point)
        self.register_buffer("bias", _bias_buffer(bias, self.out_channels, "SparseConv2d"))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight: CompressedTensor, **kwargs: object) -> "SparseConv2d":
        """Take geometry and bias from ``conv``; ``kwargs`` go to the constructor.

        Raises:
            UnsupportedLayerError: grouped convolutions and padding modes other
                than zeros have no sparse path.
        """
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UnsupportedLayerError(
                f"SparseConv2d supports groups=1, numeric padding and padding_mode='zeros', got "
                f"groups={conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        return cls(weight, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise DeepShrinkError(f"SparseConv2d expects (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        _as_numpy(x, "SparseConv2d")  # validates dtype and device
        batch, _, height, _ = x.shape
        cols = F.unfold(x.detach(), self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C*kh*kw, L)
        positions = cols.shape[2]
        xt = cols.permute(1, 0, 2).reshape(cols.shape[1], batch * positions)  # (C*kh*kw, B*L)
        out = torch.from_numpy(self.matrix.matmul_columns(xt.contiguous().numpy()))  # (O, B*L)
        out = out.reshape(self.out_channels, batch, positions).permute(1, 0, 2)  # (B, O, L)
        if self.bias is not None:
            out = out + self.bias[:, None]
        (pad, _), (dil, _), (stride, _) = _pair(self.padding), _pair(self.dilation), _pair(self.stride)
        out_h = (height + 2 * pad - dil * (self.kernel_size[0] - 1) - 1) // stride + 1  # as in nn.Conv2d
        return out.reshape(batch, self.out_channels, out_h, positions // out_h)

    def extra_repr(self) -> str:
        return (
            f"{self.matrix!r}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"
        )


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
