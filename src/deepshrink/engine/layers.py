"""Modules that replace ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Embedding``, computing from the compressed weight.

They are inference-only: inputs are detached, no gradient flows, and the dense
weight is never built (a convolution runs each kept weight over a shifted input plane).
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.arithmetic import as_conv2d, moved, pad_amounts, taps_first
from deepshrink.engine import kernels
from deepshrink.engine.matrix import SparseMatrix
from deepshrink.errors import DeepShrinkError, UnsupportedLayerError
from deepshrink.tensor import CompressedTensor

try:
    from deepshrink.engine import _simd
except ImportError:  # not built: the numba kernels run
    _simd = None


def _as_numpy(x: torch.Tensor, layer: str) -> np.ndarray:
    """A CPU float32 tensor as a NumPy view (no copy when already contiguous)."""
    if not isinstance(x, torch.Tensor) or x.dtype is not torch.float32 or not x.is_cpu:
        got = f"{x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DeepShrinkError(f"{layer} takes a float32 CPU tensor, got {got}")
    return (x.detach() if x.requires_grad else x).contiguous().numpy()


def _bias_buffer(bias: torch.Tensor | None, size: int, layer: str) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = torch.as_tensor(bias).detach().to(torch.float32).reshape(-1).clone()
    if bias.numel() != size:
        raise DeepShrinkError(f"{layer}: bias has {bias.numel()} entries, the weight has {size} rows")
    return bias


class _EngineModule(nn.Module):
    """What the engine's modules share: the laid-out matrix, and ``weight`` decoded only on demand."""

    matrix: SparseMatrix
    weight_shape: tuple[int, ...]

    def _bias_array(self) -> np.ndarray:
        """The bias buffer as a checked NumPy view (zeros without bias), made again only when the buffer object changes.

        At batch 1 a small layer's product takes a few microseconds, as much as
        ``nn.Module``'s attribute lookup, ``Tensor.numpy`` and the checks take together.
        """
        bias, cached = self._buffers["bias"], self.__dict__.get("_bias_cache")  # __dict__: past nn.Module's hooks
        if cached is None or cached[0] is not bias:
            array = self.matrix.check_bias(None if bias is None else bias.detach().numpy())
            cached = self.__dict__["_bias_cache"] = (bias, array)
        return cached[1]

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, decoded afresh at each access.

        For code that reads ``module.weight`` itself instead of calling the module
        (weight tying, ``F.linear(x, m.weight)``): it stays correct, but that
        computation is dense, not the engine's, hence the warning.
        """
        warnings.warn(f"{type(self).__name__}.weight was read: decoding the dense weight; the computation that "
                      "uses it does not run on the engine", stacklevel=2)  # fmt: skip
        return self._decode()

    def _decode(self) -> torch.Tensor:
        return self.matrix.tensor.to_dense().reshape(self.weight_shape)

    def _rows(self, flat: np.ndarray, matrix: SparseMatrix) -> np.ndarray:
        """``flat @ W.T + bias`` by ``matrix`` for a contiguous ``(n, cols)`` float32 array, every ``n`` (0 and 1 too)."""
        bias = self._bias_array()
        # checked by the caller, straight to the products: at batch 1 a small layer's product takes microseconds
        if flat.shape[0] == 1:
            return matrix._matvec(flat[0], bias).reshape(1, -1)
        if flat.shape[0]:
            return matrix._product(flat, bias)
        return np.empty((0, matrix.shape[0]), dtype=np.float32)

    @property
    def held_bytes(self) -> int:
        """Bytes the module holds for its weight now: see :attr:`SparseMatrix.held_bytes`, plus its buffers."""
        return sum(m.held_bytes for m in self._matrices()) + sum(b.nbytes for b in self.buffers())

    def _matrices(self) -> list[SparseMatrix]:
        return [self.matrix]


class SparseLinear(_EngineModule):
    """``y = W x + b`` computed from a compressed ``W`` (drop-in for ``nn.Linear`` at inference).

    Batch 1 runs EIE's interleaved-CSC kernel (zero activations skipped); larger
    batches run the kernel :class:`~deepshrink.engine.matrix.SparseMatrix` picks.

    Args:
        weight: ``(out_features, in_features)`` compressed weight.
        bias: ``(out_features,)`` or ``None``.
        workers: rows are interleaved over this many workers (default: numba's threads).
        arithmetic: ``"float32"``, ``"fixed16"`` (EIE's 16-bit fixed point) or ``"int8"``
            (per-token int8 on VNNI); ``None`` (default): the weight's own (float32 unless
            declared int8); see :class:`~deepshrink.engine.matrix.SparseMatrix`.

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
        arithmetic: str | None = None,
    ) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise DeepShrinkError(f"SparseLinear needs a 2-D weight, got shape {weight.shape}")
        self.out_features, self.in_features = self.weight_shape = weight.shape
        self.matrix = SparseMatrix(weight, workers, arithmetic)
        self.register_buffer("bias", _bias_buffer(bias, self.out_features, "SparseLinear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise DeepShrinkError(f"SparseLinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        y = self._rows(_as_numpy(x, "SparseLinear").reshape(-1, self.in_features), self.matrix)
        return torch.from_numpy(y).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.matrix!r}, bias={self.bias is not None}"


class SparseEmbedding(_EngineModule):
    """``nn.Embedding`` at inference from a compressed table: a looked-up row is decoded, the table never is.

    The table stays one code per entry (a byte; the zero of pruned entries gets its
    own code) and the codebook, so a 4-bit shared word-embedding table takes a quarter
    of its fp32 bytes, and a lookup decodes only the rows it returns.

    Args:
        weight: ``(num_embeddings, embedding_dim)`` compressed table, at most 255 shared values.

    Raises:
        DeepShrinkError: ``weight`` is not 2-D or has more than 255 shared values.

    Examples:
        >>> w = CompressedTensor.from_dense(torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, -1.0]]))
        >>> SparseEmbedding(w)(torch.tensor([[2, 0]])).tolist()
        [[[0.0, -1.0], [0.0, 2.0]]]
    """

    def __init__(self, weight: CompressedTensor) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise DeepShrinkError(f"SparseEmbedding needs a 2-D table, got shape {weight.shape}")
        if len(weight.codebook) >= 256:
            raise DeepShrinkError(
                f"SparseEmbedding holds at most 255 shared values, the table has {len(weight.codebook)}"
            )
        self.num_embeddings, self.embedding_dim = self.weight_shape = weight.shape
        # only the codes below: a vocabulary's positions (8 bytes a kept entry) would outweigh them
        codes = np.full(weight.numel, len(weight.codebook), dtype=np.uint8)  # the last code is the pruned zero
        codes[weight.positions] = weight.codes
        # not in the state dict: both come from the compressed weight, which the file holds
        self.register_buffer("codes", torch.from_numpy(codes.reshape(weight.shape)), persistent=False)
        # every byte a code with a value (the shared ones, the pruned zero, zeros past them): the C lookup reads
        # any code without a bound check
        values = np.zeros(256, dtype=np.float32)
        values[: len(weight.codebook)] = weight.codebook
        self.register_buffer("values", torch.from_numpy(values), persistent=False)
        self.codebook_size = len(weight.codebook)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or not ids.is_cpu:
            got = f"{ids.dtype} on {ids.device}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise DeepShrinkError(f"SparseEmbedding takes int64 or int32 CPU indices, got {got}")
        flat = ids.reshape(-1).numpy()
        out = np.empty((flat.shape[0], self.embedding_dim), dtype=np.float32)
        if flat.shape[0]:
            low, high = int(flat.min()), int(flat.max())
            if low < 0 or high >= self.num_embeddings:  # as nn.Embedding: no negative indices either
                raise IndexError(f"SparseEmbedding: index {low if low < 0 else high} is out of range for "
                                 f"{self.num_embeddings} embeddings")  # fmt: skip
            if _simd is not None:  # nothing to compile at the first call
                ids64 = flat.astype(np.int64, copy=False)
                _simd.decode_rows(self.codes.numpy(), self.values.numpy(), ids64, out, *self.weight_shape, len(flat))
            else:
                kernels.decode_rows(self.codes.numpy(), self.values.numpy(), flat, out)
        return torch.from_numpy(out).reshape(*ids.shape, self.embedding_dim)

    def _decode(self) -> torch.Tensor:
        return self.values[self.codes.long()]

    @property
    def held_bytes(self) -> int:
        """Bytes the module holds: a byte per entry and the values."""
        return sum(b.nbytes for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, codebook={self.codebook_size}"


class SparseConv2d(_EngineModule):
    """A 2-D convolution computed from the compressed ``(out, in / groups * kh * kw)`` matrix, two ways.

    Directly: each kept weight is decoded once and multiplies a whole shifted plane of
    the (zero-padded) input; no patch matrix, pruned weights cost nothing. Or as one
    product of the patches (im2col): each output position's patch a token, read from the
    image channels-last (the matrix's columns ordered tap by tap to match), by the
    engine's batched kernels. Each call takes the patches where the direct way loses
    (small planes, strides) or an int8 kernel wins (see :meth:`_by_patches`); each
    way's matrix is made on its first use. The output has the input's memory format, as
    ``nn.Conv2d``'s: give channels-last images (``x.to(memory_format=torch.channels_last)``)
    and the patch products read and write without a copy.

    Args:
        weight: ``(out_channels, in_channels / groups, kh, kw)`` compressed weight.
        bias: ``(out_channels,)`` or ``None``.
        stride, padding, dilation, groups: as in ``nn.Conv2d``, including
            ``padding="same"`` / ``"valid"`` (zero padding) and depthwise convolutions.
        workers: as in :class:`SparseLinear`.
        arithmetic: as in :class:`SparseLinear`; in ``"int8"`` the patches are the int8
            product's tokens. Grouped convolutions (``groups > 1``) run directly, in
            float32 there, with a warning; fixed16 runs directly.

    Raises:
        DeepShrinkError: ``weight`` is not 4-D, ``groups`` does not divide the output
            channels, ``padding`` is an unknown string or ``"same"`` with a stride, or
            ``bias`` does not match.
    """

    def __init__(
        self,
        weight: CompressedTensor,
        bias: torch.Tensor | None = None,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        workers: int | None = None,
        arithmetic: str | None = None,
    ) -> None:
        super().__init__()
        if len(weight.shape) != 4:
            raise DeepShrinkError(f"SparseConv2d needs a 4-D weight, got shape {weight.shape}")
        if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
            raise DeepShrinkError(f"groups={groups!r} must be a positive integer dividing the {weight.shape[0]} "
                                  "output channels")  # fmt: skip
        self.out_channels, per_group, *kernel = self.weight_shape = weight.shape
        self.in_channels = per_group * groups
        self.kernel_size = tuple(kernel)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._stride, self._dilation = _pair(stride), _pair(dilation)  # as the kernel takes them
        self._pad = pad_amounts(padding, self.kernel_size, self._stride, self._dilation)
        arithmetic = weight.arithmetic if arithmetic is None else arithmetic
        if arithmetic == weight.arithmetic == "int8" and groups > 1:
            raise DeepShrinkError(f"a convolution in {groups} groups cannot compute in int8 as its weight declares: "
                                  "int8 products take groups=1")  # fmt: skip
        if arithmetic == "int8" and groups > 1:
            warnings.warn(f"a convolution in {groups} groups runs in float32: int8 products take groups=1",
                          stacklevel=2)  # fmt: skip
            arithmetic = "float32"
        # int8 computes from the patches' matrix (its columns tap by tap), the others from the weight's own
        # order, the direct convolution's; each makes the other on first use (see forward)
        by_taps = arithmetic == "int8"
        self.matrix = SparseMatrix(taps_first(weight) if by_taps else weight, workers, arithmetic)
        self._patched: SparseMatrix | None = self.matrix if by_taps else None
        self._direct: SparseMatrix | None = None if by_taps else self.matrix
        self.register_buffer("bias", _bias_buffer(bias, self.out_channels, "SparseConv2d"))
        depthwise = groups > 1 and per_group == 1 and self.out_channels == groups and arithmetic == "float32"
        # a depthwise layer's filters as (taps, channels), decoded once: see _depthwise_forward
        self.register_buffer("taps", _depthwise_taps(weight) if depthwise else None, persistent=False)

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d, weight: CompressedTensor, **kwargs: object) -> SparseConv2d:
        """Take geometry and bias from ``conv``; ``kwargs`` go to the constructor.

        Raises:
            UnsupportedLayerError: padding modes other than zeros (reflect, replicate,
                circular) have no sparse path.
        """
        if conv.padding_mode != "zeros":
            raise UnsupportedLayerError(f"{cls.__name__} supports padding_mode='zeros', got {conv.padding_mode!r}")
        return cls(weight, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                   groups=conv.groups, **kwargs)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise DeepShrinkError(f"SparseConv2d expects (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        (kh, kw), (sy, sx), (dy, dx) = self.kernel_size, self._stride, self._dilation
        left, right, top, bottom = self._pad
        out_h = (x.shape[2] + top + bottom - dy * (kh - 1) - 1) // sy + 1
        out_w = (x.shape[3] + left + right - dx * (kw - 1) - 1) // sx + 1
        if min(out_h, out_w) < 1:
            raise DeepShrinkError(f"input of {tuple(x.shape[2:])}, padded by {self._pad} (left, right, top, bottom), "
                                  f"is smaller than the dilated kernel {self.kernel_size}")  # fmt: skip
        if self.taps is not None:
            return self._depthwise_forward(x, out_h, out_w)
        if self._by_patches(x.shape[0], out_h, out_w):
            return self._patches_forward(x, out_h, out_w)
        padded = F.pad(x.detach(), self._pad) if any(self._pad) else x
        if self._direct is None:  # int8, a plane no int8 kernel wins: made once, float32
            self._direct = SparseMatrix(_taps_last(self.matrix.tensor, self.kernel_size), self.matrix.workers)
        out = self._direct.conv2d(_as_numpy(padded, "SparseConv2d"), self.kernel_size, self._stride, self._dilation,
                                  self._bias_array(), self.groups)  # fmt: skip
        return _as_format_of(x, torch.from_numpy(out))

    def _matrices(self) -> list[SparseMatrix]:
        """The matrices made so far: one per way the convolution has run (the same one where both share it)."""
        return [self.matrix] + [m for m in (self._patched, self._direct) if m is not None and m is not self.matrix]

    def _by_patches(self, batch: int, out_h: int, out_w: int) -> bool:
        """Whether a product of the patches (im2col) runs this convolution rather than the direct one.

        Where an int8 kernel runs the product, always. Large stride-1 planes never (see
        :data:`DIRECT_MIN_PLANE`). Else by cost: the direct convolution sweeps each weight over
        each output row (short rows cost it a loop each, strides read with gaps), the patches
        are gathered and multiplied by the cheapest float32 kernel, whose outputs cost more
        (see :data:`PATCH_OUTPUT_COST`). fixed16 and grouped convolutions are direct only, as
        is everything without the C extension.
        """
        if self.groups > 1 or self.matrix.arithmetic == "fixed16":
            return False
        tokens = batch * out_h * out_w
        if self.matrix.int8_kernel(tokens):
            return True
        lines = self.matrix._line_costs(tokens) if self.matrix.simd else {}
        if not lines or (out_h * out_w >= DIRECT_MIN_PLANE and self._stride == (1, 1)):
            return False
        rows = self.matrix.tensor.nnz * batch * out_h
        direct = rows * (DIRECT_ROW_COST + out_w * DIRECT_MAC_COST) * (DIRECT_STRIDED if self._stride != (1, 1) else 1)
        gather = tokens * self.matrix.shape[1] * PATCH_ENTRY_COST
        return min(lines.values()) + gather + tokens * self.out_channels * PATCH_OUTPUT_COST < direct

    def _patches_forward(self, x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        """The convolution as one product of its patches (im2col), channels-last in and out.

        In NCHW the patch matrix cost 5x the int8 product itself to gather (ResNet-18,
        batch 8); channels-last, a patch is ``kh * kw`` contiguous runs, and a 1 x 1
        convolution's patches are the image itself. Images go in groups whose patches fit
        :data:`SCRATCH_MAX_BYTES`.
        """
        image = _as_numpy(x.permute(0, 2, 3, 1), "SparseConv2d")  # no copy when x is channels-last already
        if self._patched is None:  # float32: made once
            self._patched = SparseMatrix(taps_first(self.matrix.tensor), self.matrix.workers, self.matrix.arithmetic)
        group = max(1, SCRATCH_MAX_BYTES // (out_h * out_w * self.matrix.shape[1] * 4))
        parts = [self._patch_rows(image[i : i + group], out_h, out_w) for i in range(0, max(len(image), 1), group)]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return _as_format_of(
            x, torch.from_numpy(out).reshape(x.shape[0], out_h, out_w, self.out_channels).permute(0, 3, 1, 2)
        )

    def _patch_rows(self, image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
        """The product of a channels-last ``(batch, H, W, C)`` image's patches: ``(batch * out_h * out_w, out)``."""
        (kh, kw), (sy, sx), (dy, dx) = self.kernel_size, self._stride, self._dilation
        if (kh, kw, sy, sx, *self._pad) == (1, 1, 1, 1, 0, 0, 0, 0):
            return self._rows(image.reshape(-1, self.in_channels), self._patched)
        patches = _scratch(len(image) * out_h * out_w * self.matrix.shape[1]).reshape(-1, self.matrix.shape[1])
        if _simd is not None:  # nothing to compile at the first call
            _simd.nhwc_patches(image, patches, self._geometry(image, out_h, out_w), self.matrix.workers)
        else:
            kernels.nhwc_patches(image, (kh, kw), (sy, sx), (dy, dx), (self._pad[2], self._pad[0]), out_w, patches)
        return self._rows(patches, self._patched)

    def _depthwise_forward(self, x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        """A depthwise convolution on the channels-last image, each tap a vector over the channels.

        The direct kernel runs each weight over its channel's plane: for a depthwise layer that is
        9 short loops per channel, and the layer is bound by the image's memory traffic
        (MobileNetV2's took half its time there). Its filters are few (9 floats a channel), so
        they are decoded once, pruned taps as zeros, and the image is read once, channels-last.
        """
        image = _as_numpy(x.permute(0, 2, 3, 1), "SparseConv2d")  # no copy when x is channels-last already
        out = np.empty((x.shape[0], out_h, out_w, self.out_channels), dtype=np.float32)
        taps, bias = self.taps.numpy(), self._bias_array()
        if _simd is not None:  # nothing to compile at the first call
            _simd.depthwise_nhwc(image, taps, bias, out, self._geometry(image, out_h, out_w), self.matrix.workers)
        else:
            kernels.depthwise_nhwc(image, taps, self.kernel_size, self._stride, self._dilation,
                                   (self._pad[2], self._pad[0]), bias, out)  # fmt: skip
        return _as_format_of(x, torch.from_numpy(out).permute(0, 3, 1, 2))

    def _geometry(self, image: np.ndarray, out_h: int, out_w: int) -> tuple[int, ...]:
        """The C kernels' geometry: the ``(batch, H, W, C)`` image's, the kernel's, the padding's top and left, the output plane."""
        return (
            *image.shape,
            *self.kernel_size,
            *self._stride,
            *self._dilation,
            self._pad[2],
            self._pad[0],
            out_h,
            out_w,
        )

    def _decode(self) -> torch.Tensor:
        dense = self.matrix.tensor.to_dense()
        if self.matrix is self._patched:  # back from tap-by-tap columns
            kh, kw = self.kernel_size
            dense = dense.reshape(self.out_channels, kh, kw, -1).permute(0, 3, 1, 2)
        return dense.reshape(self.weight_shape)

    def extra_repr(self) -> str:
        return (
            f"{self.matrix!r}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )


class SparseConv1d(SparseConv2d):
    """A 1-D convolution on the engine: a :class:`SparseConv2d` over a height-1 image.

    Args:
        weight: ``(out_channels, in_channels, k)`` compressed weight (its matrix
            view is the 2-D kernel's: same positions, same codes).
        bias, stride, padding, dilation, groups, workers, arithmetic: as in
            ``nn.Conv1d`` and :class:`SparseConv2d`.

    Raises:
        DeepShrinkError: ``weight`` is not 3-D, or as :class:`SparseConv2d`.
    """

    def __init__(
        self,
        weight: CompressedTensor,
        bias: torch.Tensor | None = None,
        *,
        stride: int | tuple[int] = 1,
        padding: int | tuple[int] | str = 0,
        dilation: int | tuple[int] = 1,
        groups: int = 1,
        workers: int | None = None,
        arithmetic: str | None = None,
    ) -> None:
        if len(weight.shape) != 3:
            raise DeepShrinkError(f"SparseConv1d needs a 3-D weight, got shape {weight.shape}")
        super().__init__(as_conv2d(weight), bias, stride=(1, _single(stride)),
                         padding=padding if isinstance(padding, str) else (0, _single(padding)),
                         dilation=(1, _single(dilation)), groups=groups, workers=workers,
                         arithmetic=arithmetic)  # fmt: skip
        self.weight_shape = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise DeepShrinkError(f"SparseConv1d expects (batch, {self.in_channels}, L), got {tuple(x.shape)}")
        return super().forward(x.unsqueeze(2)).squeeze(2)


#: The direct convolution's costs in the cost model's unit (~0.75 ns, one thread, Zen 4; fitted on ResNet-18's
#: layers at batch 8 and LeNet-5's at batches 1 and 64, within 30% at stride 1): a kept weight's pass over one
#: output row, and each multiply-add; at a stride the gapped reads cost about 3x (2.2-3.4x measured).
DIRECT_ROW_COST = 0.85
DIRECT_MAC_COST = 0.136
DIRECT_STRIDED = 3.0
#: A product of the patches, beyond its kernel's cost: gathering an entry (a memcpy per tap, 0.35 ns), and
#: storing an output of the float32 kernels that hold tokens in their lanes (transposed on the way out; the
#: measured excess over their model, 3-8 ns, on the same layers at 70%).
PATCH_ENTRY_COST = 0.45
PATCH_OUTPUT_COST = 8.0
#: Output planes (positions per image) from which a stride-1 convolution that no int8 kernel runs goes
#: direct without weighing: the float32 kernels' line costs, fitted at 4-25% density, put the patch
#: products of ResNet-18's 56 x 56 layers at half their measured time at 50% (direct won by 1.2-1.8x).
DIRECT_MIN_PLANE = 1024

#: Most bytes of patches gathered at once: the images of a larger batch go in groups, so the buffer each
#: thread keeps for them (below) stays under this (ResNet-18's first layer: 7.4 MB an image).
SCRATCH_MAX_BYTES = 64 << 20

_SCRATCH = threading.local()


def _scratch(size: int) -> np.ndarray:
    """``size`` float32 of this thread's scratch buffer, which grows to the largest size asked, and stays.

    The patch matrices of a CNN's first layers run to tens of MB: allocated afresh at each
    call, every page of them faulted in again (ResNet-18's first convolution, batch 8:
    35-95 ms, against 9 for its int8 product). Per thread: two threads may run one model.
    """
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = _SCRATCH.buffer = np.empty(size, dtype=np.float32)
    return buffer[:size]


def _as_format_of(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` in ``x``'s memory format, as ``nn.Conv2d`` returns it: channels-last for channels-last input.

    Code after a convolution may ``view`` its output, which an NCHW input's caller expects
    contiguous; a channels-last caller gets channels-last, which the patch products read
    and write without a copy (pass images as ``x.to(memory_format=torch.channels_last)``).
    """
    return out.contiguous(memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (and not also NCHW, as a one-channel image is)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _depthwise_taps(weight: CompressedTensor) -> torch.Tensor:
    """A depthwise ``(C, 1, kh, kw)`` weight as ``(kh * kw, C)`` float32: tap ``(i, j)`` of every filter in row ``i * kw + j``."""
    channels, _, kh, kw = weight.shape
    taps = np.zeros((kh * kw, channels), dtype=np.float32)
    channel, tap = np.divmod(weight.positions, kh * kw)
    taps[tap, channel] = weight.codebook[weight.codes]
    return torch.from_numpy(taps)


def _taps_last(matrix: CompressedTensor, kernel: tuple[int, int]) -> CompressedTensor:
    """The inverse of :func:`~deepshrink.arithmetic.taps_first`: the ``(out, in, kh, kw)`` weight of a tap-by-tap matrix."""
    taps = kernel[0] * kernel[1]
    out, columns = matrix.shape
    channels = columns // taps
    row, rest = np.divmod(matrix.positions, columns)
    tap, channel = np.divmod(rest, channels)
    return moved(matrix, (out, channels, *kernel), (row * channels + channel) * taps + tap)


def _single(value: int | tuple[int]) -> int:
    return value if isinstance(value, int) else value[0]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
