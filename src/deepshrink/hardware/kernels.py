"""numba kernels of the EIE simulator: the per-PE matrix layout and the queue recurrence.

Both kernels assume validated input (the public wrappers in :mod:`deepshrink.hardware.eie`
check shapes and ranges) and use int64 indices throughout, so no loop counter can wrap.
Each one has a plain NumPy / Python reference in ``tests/test_hardware_kernels.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def pe_column_entries(
    rows: np.ndarray, cols: np.ndarray, n_pe: np.int64, n_cols: np.int64, index_bits: np.int64
) -> tuple[np.ndarray, np.ndarray]:
    """Stored entries and padding zeros of every (PE, column) slice of an interleaved CSC.

    Row ``r`` belongs to PE ``r % n_pe`` at local row ``r // n_pe``. Within one PE's slice
    of one column, each stored entry carries the number of zero rows before it in an
    ``index_bits``-bit field; a run of ``g`` zeros longer than ``2**index_bits - 1`` is
    bridged by ``g >> index_bits`` padding zero entries (each padding entry itself takes a
    row, so it covers ``2**index_bits`` rows), as in EIE.

    Args:
        rows, cols: ``(nnz,)`` int64 matrix coordinates in row-major order (the order of
            :attr:`CompressedTensor.positions`), so each slice is visited top to bottom.
        n_pe: number of processing elements.
        n_cols: number of matrix columns.
        index_bits: width of the relative row index.

    Returns:
        ``(kept, padding)``, two ``(n_pe, n_cols)`` int64 arrays: surviving weights and
        padding zeros stored in each PE's slice of each column.
    """
    kept = np.zeros((n_pe, n_cols), dtype=np.int64)
    padding = np.zeros((n_pe, n_cols), dtype=np.int64)
    last_local = np.full((n_pe, n_cols), -1, dtype=np.int64)  # local row of the slice's previous entry
    for i in range(rows.shape[0]):
        pe = rows[i] % n_pe
        local = rows[i] // n_pe
        col = cols[i]
        gap = local - last_local[pe, col] - 1
        padding[pe, col] += gap >> index_bits
        kept[pe, col] += 1
        last_local[pe, col] = local
    return kept, padding


@njit(cache=True)
def queue_schedule(cost: np.ndarray, depth: np.int64) -> tuple[np.ndarray, np.int64]:
    """Cycle-level schedule of broadcast activations through per-PE queues.

    Activation ``k`` (in broadcast order) is written into every PE's queue at cycle
    ``b[k]``: at most one broadcast per cycle, and only once every queue has room. A queue
    entry is held until its PE has finished the column (the head of the queue addresses the
    column pointers), so a queue of ``depth`` has room for ``k`` once every PE has finished
    activation ``k - depth``. PE ``p`` starts activation ``k`` the cycle after its broadcast
    at the earliest, and spends ``cost[k, p]`` cycles on it.

    Args:
        cost: ``(n_active, n_pe)`` int64 cycles each PE spends on each broadcast activation
            (at least 1).
        depth: queue depth, at least 1.

    Returns:
        ``(finish, broadcast_stalls)``: ``(n_pe,)`` cycle at which each PE finishes its last
        activation (the layer takes ``finish.max()`` cycles; all zeros when nothing is
        broadcast), and the number of cycles the broadcast waited for a full queue.
    """
    n_active, n_pe = cost.shape
    finish = np.zeros(n_pe, dtype=np.int64)
    all_done = np.zeros(n_active, dtype=np.int64)  # cycle at which every PE has finished activation k
    broadcast = np.int64(-1)
    stalls = np.int64(0)
    for k in range(n_active):
        cycle = broadcast + 1
        if k >= depth and all_done[k - depth] > cycle:
            stalls += all_done[k - depth] - cycle
            cycle = all_done[k - depth]
        broadcast = cycle
        done = np.int64(0)
        for p in range(n_pe):
            start = max(finish[p], broadcast + 1)
            finish[p] = start + cost[k, p]
            done = max(done, finish[p])
        all_done[k] = done
    return finish, stalls
