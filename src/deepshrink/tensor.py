"""CompressedTensor: the one type every stage passes on.

A pruned, weight-shared weight tensor: its shape, the flat (row-major) positions
of the surviving weights, one codebook index per surviving weight, and the
per-layer codebook of shared values. Pruning and weight sharing produce it
(:func:`deepshrink.compressed_tensors`), the file format stores it, the engine
computes from it and the hardware simulator counts its cycles.

The *matrix view* of a tensor of shape ``(out, *rest)`` is ``rows = out`` and
``cols = prod(rest)``: for ``nn.Linear`` that is ``W`` in ``y = W x``, so a column
belongs to one input activation, as in EIE's column-major layout.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field

import numpy as np
import torch

from deepshrink.coding.relative import count_escapes
from deepshrink.errors import DeepShrinkError

MAX_CODE_BITS = 16
#: What a tensor's products compute in: ``"float32"``, the decoded weights times the inputs; ``"int8"``, each
#: input row (token) and the codebook rounded to int8 (one scale each), summed exactly in integers
#: (:func:`deepshrink.arithmetic.int8_matmul_reference`): a model declared so is the model the engine's
#: int8 kernels compute, bit for bit, and the PyTorch model it decodes to (:mod:`deepshrink.compress.int8`) too.
ARITHMETICS = ("float32", "int8")
_CHECK_CHUNK = 1 << 20  # positions compared a chunk at a time: no temporary the size of a large tensor


def _strictly_increasing(positions: np.ndarray) -> bool:
    return all(
        np.all(np.diff(positions[start : start + _CHECK_CHUNK + 1]) > 0)
        for start in range(0, len(positions) - 1, _CHECK_CHUNK)
    )


def _position_dtype(numel: int) -> type:
    """int32 where every flat position of ``numel`` elements fits, else int64."""
    return np.int32 if numel < 1 << 31 else np.int64


def code_dtype(bits: int) -> type:
    """Smallest unsigned NumPy dtype that holds a ``bits``-bit code."""
    return np.uint8 if bits <= 8 else np.uint16


@dataclass(frozen=True, eq=False)
class CompressedTensor:
    """A sparse tensor whose non-zeros are indices into a shared codebook.

    Args:
        shape: the dense shape.
        positions: ``(nnz,)`` strictly increasing flat row-major indices (int32 below 2**31 elements, else int64);
            not stored when every weight is kept (:attr:`whole`): :attr:`positions` makes them from the shape.
        codes: ``(nnz,)`` codebook index of each surviving weight.
        codebook: ``(k,)`` float32 shared values, ``k <= 2**bits``.
        bits: bits per code, 1..16.
        arithmetic: what its products compute in, one of :data:`ARITHMETICS`.

    Raises:
        DeepShrinkError: if the parts disagree (lengths, ranges, order) or ``arithmetic`` is unknown.

    Examples:
        >>> t = CompressedTensor.from_dense(torch.tensor([[0.0, 0.5], [0.5, -1.0]]))
        >>> t.nnz, t.bits, t.codebook.tolist()
        (3, 1, [-1.0, 0.5])
        >>> t.to_dense().tolist()
        [[0.0, 0.5], [0.5, -1.0]]
    """

    shape: tuple[int, ...]
    positions: InitVar[np.ndarray]  # read back through the property below; not stored for a tensor kept whole
    codes: np.ndarray
    codebook: np.ndarray
    bits: int
    arithmetic: str = "float32"
    _positions: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _csc: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self, positions: np.ndarray) -> None:
        shape = tuple(int(s) for s in self.shape)
        if any(s < 0 for s in shape):
            raise DeepShrinkError(f"shape {shape} has a negative dimension")
        if not isinstance(self.bits, (int, np.integer)) or not 1 <= self.bits <= MAX_CODE_BITS:
            raise DeepShrinkError(f"bits={self.bits!r} must be an integer in 1..{MAX_CODE_BITS}")
        if self.arithmetic not in ARITHMETICS:
            raise DeepShrinkError(f"arithmetic={self.arithmetic!r} is not one of {', '.join(ARITHMETICS)}")
        positions = np.ascontiguousarray(positions)
        if positions.dtype not in (np.int32, np.int64):  # unsigned ones would wrap in the order check below
            positions = positions.astype(np.int64)  # checked below, then narrowed where it fits
        codes = np.asarray(self.codes)
        codebook = np.ascontiguousarray(self.codebook, dtype=np.float32)
        if positions.ndim != 1 or codes.ndim != 1 or codebook.ndim != 1:
            raise DeepShrinkError("positions, codes and codebook must be 1-D arrays")
        if len(positions) != len(codes):
            raise DeepShrinkError(f"{len(positions)} positions but {len(codes)} codes")
        if len(codebook) > 1 << self.bits:
            raise DeepShrinkError(f"codebook has {len(codebook)} entries, more than 2**bits={1 << self.bits}")
        numel = math.prod(shape)
        if len(positions):
            if positions[0] < 0 or positions[-1] >= numel or not _strictly_increasing(positions):
                raise DeepShrinkError(f"positions must be strictly increasing and inside 0..{numel - 1}")
            if codes.min() < 0 or int(codes.max()) >= len(codebook):
                raise DeepShrinkError(f"a code is outside the codebook of {len(codebook)} entries")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "bits", int(self.bits))
        # A tensor kept whole (every position, so 0 .. numel - 1: strictly increasing inside the range) stores
        # none: its positions were 4 bytes a weight beside a code of half a byte (MiniLM on the engine held 41
        # MiB of them). Elsewhere int32 where every position fits, not int64.
        if len(positions) == numel:
            positions = None
        else:
            positions = positions.astype(_position_dtype(numel), copy=False)
        object.__setattr__(self, "_positions", positions)
        object.__setattr__(self, "codes", np.ascontiguousarray(codes, dtype=code_dtype(self.bits)))
        object.__setattr__(self, "codebook", codebook)

    # -- construction -------------------------------------------------------

    @classmethod
    def from_dense(cls, dense: torch.Tensor | np.ndarray, bits: int | None = None) -> CompressedTensor:
        """Losslessly wrap a dense tensor whose non-zeros take few distinct values.

        The codebook is the sorted distinct non-zero values. ``bits`` defaults to
        the fewest that index them.

        Raises:
            DeepShrinkError: if the tensor has more than ``2**16`` distinct non-zeros
                (it was not weight-shared) or more than ``2**bits``.
        """
        flat = torch.as_tensor(dense).detach().cpu().to(torch.float32).reshape(-1).numpy()
        positions = np.flatnonzero(flat)
        codebook, codes = np.unique(flat[positions], return_inverse=True)
        needed = max(1, math.ceil(math.log2(max(len(codebook), 1))))
        if needed > MAX_CODE_BITS:
            raise DeepShrinkError(
                f"tensor has {len(codebook)} distinct non-zero values; weight-share it first "
                f"(at most 2**{MAX_CODE_BITS})"
            )
        bits = needed if bits is None else bits
        if needed > bits:
            raise DeepShrinkError(f"{len(codebook)} distinct values do not fit in bits={bits}")
        return cls(tuple(np.shape(dense)), positions, codes.astype(np.int64), codebook, bits)

    def with_arithmetic(self, arithmetic: str) -> CompressedTensor:
        """The same weights, their products computed in ``arithmetic`` (see :data:`ARITHMETICS`)."""
        return CompressedTensor(self.shape, self.positions, self.codes, self.codebook, self.bits, arithmetic)

    # -- views ---------------------------------------------------------------

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return self.numel if self._positions is None else len(self._positions)

    @property
    def whole(self) -> bool:
        """Whether every weight is kept (no pruning): the positions are then not stored."""
        return self._positions is None

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this tensor holds: positions (none when whole), codes and codebook."""
        stored = 0 if self._positions is None else self._positions.nbytes
        return stored + self.codes.nbytes + self.codebook.nbytes

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(rows, cols)``: dimension 0 by the product of the rest."""
        rows = self.shape[0] if self.shape else 1
        return rows, (self.numel // rows if rows else 0)

    @property
    def values(self) -> np.ndarray:
        """``(nnz,)`` float32 value of each surviving weight."""
        return self.codebook[self.codes]

    def rows_cols(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column (in the matrix view) of each surviving weight."""
        _, cols = self.matrix_shape
        return np.divmod(self.positions, max(cols, 1))

    def to_dense(self) -> torch.Tensor:
        """Decode to a dense float32 ``torch.Tensor`` of :attr:`shape`."""
        flat = np.zeros(self.numel, dtype=np.float32)
        flat[self.positions] = self.values
        return torch.from_numpy(flat).reshape(self.shape)

    def to_csc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Column-major layout of the matrix view (cached; the tensor is immutable).

        Returns:
            ``col_ptr`` ``(cols + 1,)`` int64, ``row_idx`` ``(nnz,)`` int64 and
            ``codes`` ``(nnz,)``, the entries of column ``j`` being
            ``col_ptr[j]:col_ptr[j + 1]`` in increasing row order.
        """
        if self._csc is None:
            rows, cols = self.rows_cols()
            order = np.lexsort((rows, cols))  # by column, then row
            col_ptr = np.zeros(self.matrix_shape[1] + 1, dtype=np.int64)
            np.cumsum(np.bincount(cols, minlength=self.matrix_shape[1]), out=col_ptr[1:])
            object.__setattr__(self, "_csc", (col_ptr, rows[order], self.codes[order]))
        return self._csc

    def to_csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row-major layout of the matrix view: ``row_ptr``, ``col_idx``, ``codes``.

        Positions are row-major already, so this is a split, not a sort.
        """
        rows, cols = self.rows_cols()
        row_ptr = np.zeros(self.matrix_shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=self.matrix_shape[0]), out=row_ptr[1:])
        return row_ptr, cols, self.codes

    # -- size accounting -----------------------------------------------------

    def fixed_width_bits(self, index_bits: int, codebook_bits: int = 32) -> dict[str, int]:
        """Exact bits of the fixed-width (before entropy coding) encoding.

        Counts the relative-index stream (escapes included), one ``bits``-wide
        code per surviving weight, and the codebook.
        """
        n_symbols = self.nnz + count_escapes(self.positions, index_bits)
        return {
            "index": n_symbols * index_bits,
            "codes": self.nnz * self.bits,
            "codebook": len(self.codebook) * codebook_bits,
        }

    def __repr__(self) -> str:
        return (
            f"CompressedTensor(shape={self.shape}, nnz={self.nnz}, density={self.density:.3f}, "
            f"bits={self.bits}, codebook={len(self.codebook)})"
        )


def _positions(self: CompressedTensor) -> np.ndarray:
    """``(nnz,)`` flat row-major positions of the kept weights (made on each call for a tensor kept whole)."""
    if self._positions is None:
        return np.arange(self.numel, dtype=_position_dtype(self.numel))
    return self._positions


# Set after the class is made: a property named as the InitVar inside the class body would be its default.
CompressedTensor.positions = property(_positions)  # type: ignore[assignment]
