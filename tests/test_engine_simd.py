"""The SIMD kernels (deepshrink.engine._simd): every kernel, AVX-512 and portable, against the decoded matrix
on random shapes and sparsity structures; the cost model's choices; the numba fallback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepshrink.engine import SparseMatrix, layouts, matrix
from deepshrink.errors import DeepShrinkError
from deepshrink.tensor import CompressedTensor

_simd = pytest.importorskip("deepshrink.engine._simd", reason="the SIMD extension is not built (pip install -e .)")

ISAS = ["portable"] + (["avx512"] if _simd.isa() == "avx512" else [])


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test once per instruction set this CPU has (the portable C kernels always)."""
    best = _simd.isa()
    _simd.set_isa(request.param)
    yield request.param
    _simd.set_isa(best)


def structured_tensor(rows: int, cols: int, density: float, structure: str, bits: int, seed: int) -> CompressedTensor:
    """Random codes at ``density``: single weights, 16 x 1 blocks (16 rows of a panel, one column) or every weight."""
    rng = np.random.default_rng(seed)
    if structure == "dense":
        mask = np.ones((rows, cols), dtype=bool)
    elif structure == "blocks":
        mask = np.repeat(rng.random((-(-rows // 16), cols)) < density, 16, axis=0)[:rows]
    else:
        mask = rng.random((rows, cols)) < density
    positions = np.flatnonzero(mask)
    codebook = rng.standard_normal(1 << bits).astype(np.float32)
    return CompressedTensor((rows, cols), positions, rng.integers(0, 1 << bits, len(positions)), codebook, bits)


# the fixture only selects the instruction set, the same for every generated example
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(0, 80), cols=st.integers(0, 300), density=st.floats(0, 1),
       structure=st.sampled_from(["unstructured", "blocks", "dense"]), bits=st.integers(1, 8),
       batch=st.integers(1, 40), active=st.floats(0, 1), seed=st.integers(0, 2**16))  # fmt: skip
def test_every_kernel_matches_dense_on_any_matrix(isa, rows, cols, density, structure, bits, batch, active, seed):
    t = structured_tensor(rows, cols, density, structure, bits, seed)
    m = SparseMatrix(t, workers=2)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, cols)) * (rng.random((batch, cols)) < active)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    expected = x.astype(np.float64) @ t.to_dense().numpy().T.astype(np.float64) + bias
    for kernel in m.kernels(batch):
        np.testing.assert_allclose(m.run(x, kernel, bias), expected, rtol=1e-4, atol=1e-4, err_msg=kernel)
    assert m.kernel_for(x) in m.kernels(batch)


@pytest.mark.parametrize("structure", ["unstructured", "blocks", "dense"])
def test_every_kernel_on_two_threads(isa, monkeypatch, structure: str) -> None:
    """The pool's path: every product split over two threads, however small."""
    monkeypatch.setattr(matrix, "PARALLEL_MIN_COST", 0)
    t = structured_tensor(300, 500, 0.2, structure, 4, seed=11)
    m = SparseMatrix(t, workers=2)
    for batch in (1, 3, 40):
        x = np.maximum(np.random.default_rng(batch).standard_normal((batch, 500)), 0).astype(np.float32)
        for kernel in m.kernels(batch):
            np.testing.assert_allclose(m.run(x, kernel), x @ t.to_dense().numpy().T, rtol=1e-4, atol=1e-4,
                                       err_msg=kernel)  # fmt: skip


@pytest.mark.parametrize("batch", [1, 2, 5, 16, 17, 24, 25, 33, 70])
def test_panel_kernels_on_every_token_count(isa, batch: int) -> None:
    """Each token count has its own register-blocked kernel (1-24), more are split evenly."""
    for structure in ("dense", "blocks"):
        t = structured_tensor(130, 77, 0.3, structure, 4, seed=batch)
        m = SparseMatrix(t, workers=2)
        x = np.random.default_rng(batch).standard_normal((batch, 77)).astype(np.float32)
        np.testing.assert_allclose(m.run(x, "panels"), x @ t.to_dense().numpy().T, rtol=1e-4, atol=1e-4)


def test_held_bytes_counts_the_layouts_built() -> None:
    """What a matrix holds: its compressed arrays, then each layout a product built, and never a dense weight."""
    t = structured_tensor(200, 300, 0.1, "unstructured", 4, seed=3)
    m = SparseMatrix(t, workers=1)
    compressed = t.positions.nbytes + t.codes.nbytes + t.codebook.nbytes
    assert compressed <= m.held_bytes < compressed + 1024
    x = np.random.default_rng(3).standard_normal((20, 300)).astype(np.float32)
    m.run(x, "rows")
    entries = m._row_groups()[1]
    assert m.held_bytes >= compressed + entries.nbytes
    assert m.held_bytes < 4 * t.numel  # less than the fp32 matrix


def test_kernels_on_large_indices(isa) -> None:
    """Past 65,535 columns and 256 rows per segment; a 256-entry codebook (row kernel only)."""
    t = structured_tensor(3, 70_000, 0.01, "unstructured", 8, seed=1)
    m = SparseMatrix(t, workers=2)
    x = np.random.default_rng(2).standard_normal((3, 70_000)).astype(np.float32)
    assert "tiled" not in m.kernels(1) and "rows" in m.kernels(3)
    for kernel in m.kernels(3):
        np.testing.assert_allclose(m.run(x, kernel), x @ t.to_dense().numpy().T, rtol=1e-4, atol=1e-3)


def test_the_cost_model_picks_by_structure() -> None:
    rng = np.random.default_rng(0)
    dense = SparseMatrix(structured_tensor(384, 384, 1.0, "dense", 4, seed=1), workers=2)
    tokens = rng.standard_normal((17, 384)).astype(np.float32)
    assert dense.kernel_for(tokens) == "panels" and dense.kernel_for(tokens[0]) == "panels"
    sparse = SparseMatrix(structured_tensor(1000, 4096, 0.1, "unstructured", 4, seed=2), workers=2)
    relu = np.maximum(rng.standard_normal((16, 4096)), 0).astype(np.float32)
    assert sparse.kernel_for(np.abs(relu[0]) + 1) == "tiled"  # every activation non-zero
    assert sparse.kernel_for(relu) == "rows"
    very_sparse = relu[0] * (rng.random(4096) < 0.02)
    assert sparse.kernel_for(very_sparse) == "csc"  # EIE's kernel visits the few active columns only
    blocks = SparseMatrix(structured_tensor(1000, 4096, 0.1, "blocks", 4, seed=3), workers=2)
    assert blocks.kernel_for(relu[0]) == "panels" and blocks.kernel_for(relu) == "panels"


@pytest.mark.parametrize("stride,dilation,groups", [((1, 1), (1, 1), 1), ((2, 1), (1, 2), 2), ((1, 1), (2, 2), 4)])
def test_convolutions_in_c_match_numba(isa, monkeypatch, stride, dilation, groups: int) -> None:
    t = structured_tensor(8, 8 // groups * 9, 0.4, "unstructured", 8, seed=groups)
    x = np.maximum(np.random.default_rng(9).standard_normal((3, 8, 12, 11)), 0).astype(np.float32)
    bias = np.arange(8, dtype=np.float32)
    ours = SparseMatrix(t, workers=2).conv2d(x, (3, 3), stride, dilation, bias, groups)
    monkeypatch.setattr(matrix, "_simd", None)
    np.testing.assert_allclose(ours, SparseMatrix(t, workers=2).conv2d(x, (3, 3), stride, dilation, bias, groups),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_fixed_point_and_the_missing_extension_run_on_numba(monkeypatch) -> None:
    t = structured_tensor(50, 60, 0.5, "unstructured", 4, seed=4)
    assert not SparseMatrix(t, fixed_point=True).simd
    monkeypatch.setattr(matrix, "_simd", None)
    m = SparseMatrix(t, workers=2)
    assert not m.simd and m.kernels(1) == ("csc", "sliced") and m.kernels(4) == ("samples", "csr")
    x = np.random.default_rng(5).standard_normal((4, 60)).astype(np.float32)
    np.testing.assert_allclose(m.matmul(x), x @ t.to_dense().numpy().T, rtol=1e-5, atol=1e-5)


def test_the_thread_pool_works_in_a_forked_child() -> None:
    """A child process has none of its parent's pool threads: its products still run (and are right)."""
    import multiprocessing

    t = structured_tensor(300, 200, 1.0, "dense", 4, seed=7)
    x = np.random.default_rng(8).standard_normal((5, 200)).astype(np.float32)
    expected = SparseMatrix(t, workers=2).run(x, "panels")  # the parent's helpers are started
    with multiprocessing.get_context("fork").Pool(1) as child:
        np.testing.assert_allclose(child.apply(_panels_product, (t, x)), expected, rtol=1e-6)


def _panels_product(t: CompressedTensor, x: np.ndarray) -> np.ndarray:
    return SparseMatrix(t, workers=2).run(x, "panels")


def test_kernels_check_their_buffers() -> None:
    t = structured_tensor(40, 30, 1.0, "dense", 4, seed=6)
    m = SparseMatrix(t)
    with pytest.raises(DeepShrinkError, match="kernel 'tiled' cannot run a batch of 3"):
        m.run(np.zeros((3, 30), np.float32), "tiled")
    codes, _, _ = m._panels()
    x, out = np.zeros((2, 30), np.float32), np.empty((2, 40), np.float32)
    table, bias = layouts.panel_table(t).values, np.zeros(40, np.float32)
    with pytest.raises(ValueError, match="out holds 160 bytes, the kernel reads 320"):
        _simd.panels_matmul(codes, None, None, table, x, out[:1], bias, 40, 30, 2, 30, 40, 1)
    with pytest.raises(ValueError, match="codes holds"):
        _simd.panels_matmul(codes[:1], None, None, table, x, out, bias, 40, 30, 2, 30, 40, 1)
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        _simd.set_isa("sse9")
