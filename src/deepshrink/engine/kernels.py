"""Numba kernels of the inference engine: sparse matrix times activations.

Both kernels read a *segmented relative-index stream*, the layout built by
:mod:`deepshrink.engine.layout`: for each segment (a column of one worker's rows
for the CSC kernel, a row for the CSR kernel) a run of 8-bit gaps, each "the
number of zeros before this weight", with the escape symbol :data:`ESCAPE`
meaning "skip ``ESCAPE`` positions, no weight here" (the same code as
:mod:`deepshrink.coding.relative`), and beside each gap the weight's codebook
index. A weight's value is looked up in the codebook on the fly, as EIE does;
the dense matrix is never built.

The kernels are dtype-generic: float32 codebook, activations and accumulators
give the fp32 engine; int16 codebook and activations with an int64 accumulator
give the 16-bit fixed-point mode (numba widens int16 products to int64, so no
product overflows). Every index is int64 (``intp``) or unsigned, so nothing
wraps at 65,536.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Bits of one stored gap. One byte keeps loads aligned and escapes rare: at the
#: EIE layers' densities (4-25 %) the mean gap inside a worker's column is 2-13.
INDEX_BITS = 8
#: The escape symbol, ``2**INDEX_BITS - 1``.
ESCAPE = (1 << INDEX_BITS) - 1


_ONE = np.uint64(1)
_ESCAPE_U = np.uint64(ESCAPE)


@njit(cache=True)
def nonzero_columns(x: np.ndarray) -> np.ndarray:
    """Indices (uint64) of the non-zero entries of the 1-D ``x`` (EIE's leading non-zero detection).

    Examples:
        >>> nonzero_columns(np.array([0.0, 2.0, 0.0, -1.0], dtype=np.float32)).tolist()
        [1, 3]
    """
    found = np.empty(x.shape[0], dtype=np.uint64)
    n = 0
    for j in range(x.shape[0]):
        if x[j] != 0:
            found[n] = j
            n += 1
    return found[:n]


# Loop indices below are uint64 on purpose: numba adds a negative-index
# wrap-around check to every access through a signed index, and mixing uint64
# with a signed integer would promote to float64, hence the typed constants.


@njit(cache=True, fastmath=True)
def _csc_worker(ptr, gaps, codes, codebook, x, active, out) -> None:
    """One worker's share of :func:`csc_matvec`: ``out`` is its row of accumulators."""
    for t in range(active.shape[0]):
        j = active[t]
        xj = x[j]
        row = np.uint64(0)  # the next row a gap of 0 would land on
        for k in range(ptr[j], ptr[j + _ONE]):
            gap = np.uint64(gaps[k])
            if gap == _ESCAPE_U:  # a gap too long for 8 bits: skip, no weight
                row += _ESCAPE_U
                continue
            row += gap
            out[row] += codebook[codes[k]] * xj
            row += _ONE


@njit(parallel=True, cache=True, fastmath=True)
def csc_matvec(
    col_ptr: np.ndarray,  # (workers, cols + 1) uint64 offsets into gaps / codes
    gaps: np.ndarray,  # (n_symbols,) uint8 relative local-row indices
    codes: np.ndarray,  # (n_symbols,) uint8 / uint16 codebook indices
    codebook: np.ndarray,  # (k,) float32 or int16
    x: np.ndarray,  # (cols,) float32 or int16 input activations
    acc: np.ndarray,  # (workers, local_rows) float32 or int64, zeroed
) -> None:
    """EIE's batch-1 kernel: ``acc[w, i] += W[w + workers * i, j] * x[j]``.

    Worker ``w`` owns rows ``w, w + workers, ...`` (row ``i`` to worker
    ``i mod workers``) and writes only its own row of ``acc``, so no two threads
    write one output. Columns whose activation is zero are never visited.
    """
    active = nonzero_columns(x)
    for w in prange(col_ptr.shape[0]):
        _csc_worker(col_ptr[w], gaps, codes, codebook, x, active, acc[w])


@njit(cache=True, fastmath=True)
def csc_matvec_serial(col_ptr, gaps, codes, codebook, x, acc) -> None:
    """:func:`csc_matvec` on the calling thread, for layers too small to repay a parallel launch."""
    active = nonzero_columns(x)
    for w in range(col_ptr.shape[0]):
        _csc_worker(col_ptr[w], gaps, codes, codebook, x, active, acc[w])


@njit(cache=True, fastmath=True)
def _csr_rows(row_ptr, gaps, codes, codebook, xt, out, first, stop) -> None:
    """Rows ``first .. stop - 1`` of :func:`csr_matmul`."""
    batch = np.uint64(xt.shape[1])
    for i in range(np.uint64(first), np.uint64(stop)):
        col = np.uint64(0)  # the next column a gap of 0 would land on
        for k in range(row_ptr[i], row_ptr[i + _ONE]):
            gap = np.uint64(gaps[k])
            if gap == _ESCAPE_U:
                col += _ESCAPE_U
                continue
            col += gap
            value = codebook[codes[k]]
            for b in range(batch):  # unsigned: no wrap-around checks, so this loop vectorises
                out[i, b] += value * xt[col, b]
            col += _ONE


@njit(parallel=True, cache=True, fastmath=True)
def csr_matmul(
    row_ptr: np.ndarray,  # (rows + 1,) uint64 offsets into gaps / codes
    gaps: np.ndarray,  # (n_symbols,) uint8 relative column indices
    codes: np.ndarray,  # (n_symbols,) uint8 / uint16 codebook indices
    codebook: np.ndarray,  # (k,) float32 or int16
    xt: np.ndarray,  # (cols, batch) float32 or int16, batch contiguous
    out: np.ndarray,  # (rows, batch) float32 or int64, zeroed
) -> None:
    """Row-parallel kernel for batches: ``out[i, :] += W[i, j] * xt[j, :]``.

    Each weight is decoded once and applied to the whole batch with a
    contiguous (vectorised) inner loop; rows are split over threads, so no two
    threads write one output.
    """
    for i in prange(row_ptr.shape[0] - 1):
        _csr_rows(row_ptr, gaps, codes, codebook, xt, out, i, i + 1)


@njit(cache=True, fastmath=True)
def csr_matmul_serial(row_ptr, gaps, codes, codebook, xt, out) -> None:
    """:func:`csr_matmul` on the calling thread, for small products."""
    _csr_rows(row_ptr, gaps, codes, codebook, xt, out, 0, row_ptr.shape[0] - 1)
