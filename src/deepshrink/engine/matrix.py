"""The engine-side form of one compressed weight matrix, and its products.

:class:`SparseMatrix` lays a :class:`~deepshrink.tensor.CompressedTensor` out
for the kernels in :mod:`deepshrink.engine.kernels` and picks one per call:

- batch 1 (EIE's case): interleaved CSC, row ``i`` to worker ``i mod workers``,
  8-bit relative row indices, zero activations skipped;
- batch >= :data:`CSR_MIN_BATCH`: CSR with relative column indices, rows split
  over threads, each decoded weight applied to the whole batch;
- batches in between: the batch-1 kernel once per sample (zero skipping still
  pays there).

The stored form stays codes plus codebook: values are looked up on the fly.
This is the API a sparse LSTM or any other layer calls for its SpMV.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from deepshrink.coding.relative import encode_relative
from deepshrink.engine import kernels
from deepshrink.engine.fixedpoint import from_fixed, to_fixed
from deepshrink.errors import DeepShrinkError
from deepshrink.tensor import CompressedTensor

#: Smallest batch that goes to the CSR kernel. Measured on the EIE layers
#: (benchmarks/bench_engine.py, 2 threads): at 35 % activation density the
#: per-sample CSC kernel still wins at batch 2 and loses from batch 4 on.
CSR_MIN_BATCH = 4
#: Fewest multiply-accumulates worth a parallel launch. A launch costs ~10 us on an
#: idle 2-core machine and can cost milliseconds on a busy one, while this kernel
#: does about 1 ns per weight: LeNet-sized layers run on the calling thread.
PARALLEL_MIN_MACS = 50_000


def _parallel(macs: float) -> bool:
    """Whether a product of ``macs`` multiply-accumulates should launch numba's threads.

    With one thread a launch only hands the work to a pool thread, which on a busy
    machine waits for a core: the calling thread does it instead.
    """
    return macs >= PARALLEL_MIN_MACS and numba.get_num_threads() > 1


def segmented_stream(
    segment: np.ndarray, offset: np.ndarray, codes: np.ndarray, n_segments: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative-index stream with one run per segment, each run's indices restarting at 0.

    Entries must be sorted by ``(segment, offset)``. The gaps are encoded by
    :func:`~deepshrink.coding.relative.encode_relative` on *virtual* positions in
    which each segment starts right after the previous one's last entry, so the
    first gap of a segment is its first offset.

    Args:
        segment: ``(nnz,)`` segment of each entry (column of a worker, or row).
        offset: ``(nnz,)`` position inside the segment (local row, or column).
        codes: ``(nnz,)`` codebook index of each entry.
        n_segments: the number of segments (empty ones included).

    Returns:
        ``ptr`` ``(n_segments + 1,)`` uint64 (segment ``s`` is ``ptr[s]:ptr[s + 1]``),
        ``gaps`` uint8 and ``codes`` aligned with ``gaps`` (0 under an escape).

    Examples:
        >>> ptr, gaps, c = segmented_stream(np.array([0, 0, 2]), np.array([1, 3, 0]),
        ...                                 np.array([5, 6, 7]), 3)
        >>> ptr.tolist(), gaps.tolist(), c.tolist()
        ([0, 2, 2, 3], [1, 1, 0], [5, 6, 7])
    """
    segment = np.asarray(segment, dtype=np.int64)
    offset = np.asarray(offset, dtype=np.int64)
    counts = np.bincount(segment, minlength=n_segments)
    starts = np.zeros(n_segments + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    span = np.zeros(n_segments, dtype=np.int64)  # last offset + 1 of each non-empty segment
    filled = counts > 0
    span[filled] = offset[starts[1:][filled] - 1] + 1
    base = np.cumsum(span) - span
    gaps = encode_relative(base[segment] + offset, kernels.INDEX_BITS)
    real = np.flatnonzero(gaps != kernels.ESCAPE)  # real gaps are < ESCAPE by construction
    after = np.zeros(len(real) + 1, dtype=np.uint64)  # stream index after entry k - 1
    after[1:] = real + 1
    aligned = np.zeros(len(gaps), dtype=codes.dtype)
    aligned[real] = codes
    return after[starts], gaps, aligned


class SparseMatrix:
    """A compressed weight matrix laid out for the engine's kernels.

    Args:
        tensor: the weight; its matrix view (``rows = shape[0]``) is used.
        workers: how many workers the batch-1 layout interleaves rows over;
            defaults to numba's thread count.
        fixed_point: compute in EIE's 16-bit fixed point (int16 codebook and
            activations, int64 accumulators) instead of fp32.

    Raises:
        DeepShrinkError: if ``workers`` is not a positive integer or ``tensor`` is 0-D.

    Examples:
        >>> import torch
        >>> w = CompressedTensor.from_dense(torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, -1.0]]))
        >>> SparseMatrix(w, workers=2).matvec(np.array([1.0, 3.0], dtype=np.float32)).tolist()
        [6.0, 1.0, -3.0]
    """

    def __init__(self, tensor: CompressedTensor, workers: int | None = None, fixed_point: bool = False) -> None:
        workers = numba.get_num_threads() if workers is None else workers
        if not isinstance(workers, (int, np.integer)) or workers < 1:
            raise DeepShrinkError(f"workers={workers!r} must be a positive integer")
        if not tensor.shape:
            raise DeepShrinkError("a 0-D tensor has no matrix view; the engine needs at least 1-D weights")
        self.tensor = tensor
        # not tensor.matrix_shape: that reports 0 columns when there are 0 rows
        self.shape = (tensor.shape[0], math.prod(tensor.shape[1:]))
        self.workers = int(workers)
        self.fixed_point = bool(fixed_point)
        if self.fixed_point:
            self.codebook, self.codebook_frac = to_fixed(tensor.codebook)
        else:
            self.codebook, self.codebook_frac = tensor.codebook, 0
        self.col_ptr, self.col_gaps, self.col_codes = self._interleaved_csc()
        self._csr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def local_rows(self) -> int:
        """Rows per worker (the last workers may own one row fewer)."""
        return -(-self.shape[0] // self.workers)

    @property
    def nbytes(self) -> int:
        """Bytes of the batch-1 layout: pointers, gaps, codes and codebook."""
        return sum(a.nbytes for a in (self.col_ptr, self.col_gaps, self.col_codes, self.codebook))

    def _interleaved_csc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols = self.tensor.rows_cols()  # empty when there are 0 rows, so no division by 0 columns
        n_cols = self.shape[1]
        worker, local = rows % self.workers, rows // self.workers
        segment = worker * n_cols + cols
        # positions are row-major, so a stable sort by segment keeps each segment's rows ascending
        order = np.argsort(segment, kind="stable")
        ptr, gaps, codes = segmented_stream(segment[order], local[order], self.tensor.codes[order], self.workers * n_cols)
        # worker w's column j is segment w * n_cols + j: view the pointers as (workers, cols + 1)
        col_ptr = ptr[np.arange(self.workers)[:, None] * n_cols + np.arange(n_cols + 1)]
        return col_ptr, gaps, codes

    def _row_major(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._csr is None:  # built on the first large batch only
            rows, cols = self.tensor.rows_cols()  # positions are row-major: already sorted
            self._csr = segmented_stream(rows, cols, self.tensor.codes, self.shape[0])
        return self._csr

    def _check_input(self, x: np.ndarray, ndim: int) -> None:
        if x.ndim != ndim or x.shape[-1] != self.shape[1]:
            raise DeepShrinkError(
                f"input of shape {x.shape} does not fit a {self.shape[0]} x {self.shape[1]} matrix; "
                f"expected {'(cols,)' if ndim == 1 else '(batch, cols)'} with cols={self.shape[1]}"
            )
        if x.dtype != np.float32:
            raise DeepShrinkError(f"input dtype {x.dtype} is not supported; the engine takes float32")

    def _quantize(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Activations in the kernels' dtype; in fixed point one Q format per call."""
        return to_fixed(x) if self.fixed_point else (x, 0)

    def _accumulators(self, shape: tuple[int, int]) -> np.ndarray:
        return np.zeros(shape, dtype=np.int64 if self.fixed_point else np.float32)

    def _finish(self, acc: np.ndarray, frac: int) -> np.ndarray:
        return from_fixed(acc, frac + self.codebook_frac) if self.fixed_point else acc

    def _csc_matvec(self, x: np.ndarray) -> np.ndarray:
        acc = self._accumulators((self.workers, self.local_rows))
        macs = self.tensor.nnz * np.count_nonzero(x) / max(self.shape[1], 1)  # expected, zero columns skipped
        kernel = kernels.csc_matvec if _parallel(macs) else kernels.csc_matvec_serial
        kernel(self.col_ptr, self.col_gaps, self.col_codes, self.codebook, x, acc)
        return acc.T.reshape(-1)[: self.shape[0]]  # row i = worker i % workers, slot i // workers

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``W @ x`` for one ``(cols,)`` float32 vector, with EIE's batch-1 kernel.

        Returns:
            ``(rows,)`` float32.

        Raises:
            DeepShrinkError: on a wrong shape or dtype.
        """
        self._check_input(x, 1)
        xk, frac = self._quantize(np.ascontiguousarray(x))
        return self._finish(self._csc_matvec(xk), frac)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T`` for a ``(batch, cols)`` float32 batch, kernel chosen by batch size.

        Returns:
            ``(batch, rows)`` float32.

        Raises:
            DeepShrinkError: on a wrong shape or dtype.
        """
        self._check_input(x, 2)
        if x.shape[0] >= CSR_MIN_BATCH:
            return self.matmul_columns(np.ascontiguousarray(x.T)).T
        if x.shape[0] == 1:  # the main case: no per-sample loop
            xk, frac = self._quantize(np.ascontiguousarray(x[0]))
            return self._finish(self._csc_matvec(xk), frac)[None]
        xk, frac = self._quantize(x)
        acc = self._accumulators((x.shape[0], self.shape[0]))
        for b in range(x.shape[0]):
            acc[b] = self._csc_matvec(np.ascontiguousarray(xk[b]))
        return self._finish(acc, frac)

    def matmul_columns(self, xt: np.ndarray) -> np.ndarray:
        """``W @ xt`` for a ``(cols, n)`` float32 array with the row-parallel kernel.

        This is the layout im2col produces for a convolution (``n`` = batch x
        output positions), so no transpose is needed there.

        Returns:
            ``(rows, n)`` float32.

        Raises:
            DeepShrinkError: on a wrong shape or dtype.
        """
        if xt.ndim != 2 or xt.shape[0] != self.shape[1] or xt.dtype != np.float32:
            raise DeepShrinkError(
                f"input of shape {xt.shape} and dtype {xt.dtype} does not fit; expected float32 "
                f"(cols, n) with cols={self.shape[1]}"
            )
        row_ptr, gaps, codes = self._row_major()
        xk, frac = self._quantize(np.ascontiguousarray(xt))
        out = self._accumulators((self.shape[0], xt.shape[1]))
        kernel = kernels.csr_matmul if _parallel(self.tensor.nnz * xt.shape[1]) else kernels.csr_matmul_serial
        kernel(row_ptr, gaps, codes, self.codebook, xk, out)
        return self._finish(out, frac)

    def __repr__(self) -> str:
        mode = "fixed16" if self.fixed_point else "fp32"
        return f"SparseMatrix({self.shape[0]}x{self.shape[1]}, nnz={self.tensor.nnz}, workers={self.workers}, {mode})"
