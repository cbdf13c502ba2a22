"""The simulator's numba kernels against plain Python references."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from deepshrink.hardware.kernels import pe_column_entries, queue_schedule


def reference_entries(dense: np.ndarray, n_pe: int, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Build each PE's column slices row by row and count padding as EIE stores them."""
    n_rows, n_cols = dense.shape
    kept = np.zeros((n_pe, n_cols), dtype=np.int64)
    padding = np.zeros((n_pe, n_cols), dtype=np.int64)
    max_run = (1 << index_bits) - 1  # the largest zero count one index field holds
    for pe in range(n_pe):
        for col in range(n_cols):
            zeros = 0
            for value in dense[pe::n_pe, col]:
                if value == 0:
                    zeros += 1
                    continue
                while zeros > max_run:  # store a padding zero after max_run zeros; it takes a row
                    padding[pe, col] += 1
                    zeros -= max_run + 1
                kept[pe, col] += 1
                zeros = 0
    return kept, padding


def run_entries(dense: np.ndarray, n_pe: int, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(dense)  # row-major order, as CompressedTensor.positions
    return pe_column_entries(
        rows.astype(np.int64), cols.astype(np.int64), np.int64(n_pe), np.int64(dense.shape[1]), np.int64(index_bits)
    )


@pytest.mark.parametrize(
    "shape,density,n_pe,index_bits",
    [
        ((0, 5), 0.5, 4, 4),
        ((7, 0), 0.5, 4, 4),
        ((40, 30), 0.0, 4, 4),
        ((40, 30), 1.0, 3, 2),
        ((200, 17), 0.05, 4, 4),
        ((300, 9), 0.02, 1, 3),
        ((65, 33), 0.3, 64, 1),
        ((10, 10), 0.5, 16, 4),
    ],
)
def test_pe_column_entries_matches_reference(shape, density, n_pe, index_bits):
    rng = np.random.default_rng(sum(shape) + n_pe)
    dense = (rng.random(shape) < density) * rng.integers(1, 5, shape)
    kept, padding = run_entries(dense, n_pe, index_bits)
    ref_kept, ref_padding = reference_entries(dense, n_pe, index_bits)
    np.testing.assert_array_equal(kept, ref_kept)
    np.testing.assert_array_equal(padding, ref_padding)
    assert kept.sum() == np.count_nonzero(dense)


@pytest.mark.parametrize(
    "zeros_before,expected_padding", [(0, 0), (15, 0), (16, 1), (31, 1), (32, 2), (47, 2), (48, 3)]
)
def test_padding_rule_at_the_4_bit_boundaries(zeros_before, expected_padding):
    # One PE, one column: a weight after `zeros_before` zero rows.
    dense = np.zeros((zeros_before + 1, 1))
    dense[-1, 0] = 1.0
    kept, padding = run_entries(dense, 1, 4)
    assert (kept[0, 0], padding[0, 0]) == (1, expected_padding)


def reference_schedule(cost: np.ndarray, depth: int) -> tuple[np.ndarray, int]:
    """Step the hardware one cycle at a time with explicit queues."""
    n_active, n_pe = cost.shape
    queues = [deque() for _ in range(n_pe)]  # (activation, first cycle it can be read)
    remaining = [0] * n_pe  # cycles left on the head activation; 0 = not started
    finish = np.zeros(n_pe, dtype=np.int64)
    next_k, stalls, cycle = 0, 0, 0
    while next_k < n_active or any(queues):
        if next_k < n_active:
            if all(len(q) < depth for q in queues):
                for q in queues:
                    q.append((next_k, cycle + 1))
                next_k += 1
            else:
                stalls += 1
        for p, q in enumerate(queues):
            if remaining[p] == 0 and q and q[0][1] <= cycle:
                remaining[p] = cost[q[0][0], p]
            if remaining[p]:
                remaining[p] -= 1
                if remaining[p] == 0:
                    q.popleft()  # the slot is free for the next cycle's broadcast
                    finish[p] = cycle + 1
        cycle += 1
    return finish, stalls


@pytest.mark.parametrize(
    "n_active,n_pe,depth,max_cost",
    [(0, 4, 8, 5), (1, 1, 1, 1), (30, 4, 1, 6), (40, 8, 2, 9), (60, 5, 8, 20), (25, 3, 100, 4), (50, 16, 4, 1)],
)
def test_queue_schedule_matches_cycle_stepping(n_active, n_pe, depth, max_cost):
    rng = np.random.default_rng(n_active * 7 + depth)
    cost = rng.integers(1, max_cost + 1, size=(n_active, n_pe)).astype(np.int64)
    finish, stalls = queue_schedule(cost, np.int64(depth))
    ref_finish, ref_stalls = reference_schedule(cost, depth)
    np.testing.assert_array_equal(finish, ref_finish)
    assert stalls == ref_stalls


def test_queue_schedule_of_unit_work_is_one_column_per_cycle():
    # Every PE takes one cycle per column: the broadcast never waits, one cycle of latency.
    finish, stalls = queue_schedule(np.ones((100, 8), dtype=np.int64), np.int64(2))
    assert stalls == 0
    assert finish.tolist() == [101] * 8


def test_depth_one_is_lock_step():
    # With one queue entry, each column waits for the slowest PE on the previous one.
    cost = np.array([[5, 1], [1, 5], [2, 2]], dtype=np.int64)
    finish, _ = queue_schedule(cost, np.int64(1))
    # broadcast 0 at 0, done at 6; broadcast 1 at 6, done at 12; broadcast 2 at 12, done at 15
    assert finish.tolist() == [15, 15]
