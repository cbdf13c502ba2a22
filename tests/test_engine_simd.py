"""The SIMD kernels (deepshrink.engine._simd): every kernel, AVX-512 and portable, against the decoded matrix
on random shapes and sparsity structures; the cost model's choices; the numba fallback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepshrink.arithmetic import int8_matmul_reference, int8_weights
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
    assert not SparseMatrix(t, arithmetic="fixed16").simd
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


def test_int8_sparse_layouts_are_checked_before_a_kernel_reads_them() -> None:
    """A layout whose offsets go backwards or whose columns leave the matrix is refused, not read out of bounds."""
    t = structured_tensor(40, 30, 0.2, "unstructured", 4, seed=6)
    x, out, bias = np.zeros((2, 30), np.float32), np.empty((2, 40), np.float32), np.zeros(40, np.float32)
    for layout in ("blocks", "rows"):
        p = layouts.int8_panels(t, layout)
        ptr, cols, by_rows = p.sparse

        def run(ptr=ptr, cols=cols, p=p, by_rows=by_rows) -> None:
            _simd.int8_matmul(p.codes, False, None, p.rowsum, p.outliers, float(p.scale), x, out, bias, 40, 30, 2, 30,
                              40, 1, (ptr, cols, by_rows))  # fmt: skip

        run()
        backwards = ptr.copy()
        backwards[1] = backwards[-1] + 4
        with pytest.raises(ValueError, match="ptr is not a non-decreasing list of offsets"):
            run(ptr=backwards)
        outside = cols.copy()
        outside[-1] = 60
        with pytest.raises(ValueError, match="60 is outside the matrix"):
            run(cols=outside)


def test_count_nonzero_counts_each_row_as_numpy_does(isa) -> None:
    """The cost model's count: NaN counts (NaN != 0), -0.0 does not, every length (the vector tail)."""
    x = np.random.default_rng(3).standard_normal((5, 37)).astype(np.float32)
    x[x < 0.3] = 0.0
    x[0, 3], x[1, 36], x[2, 5] = np.nan, -0.0, np.inf
    counts = np.empty(5, np.int64)
    assert _simd.count_nonzero(x, counts, 5, 37) == np.count_nonzero(x)
    np.testing.assert_array_equal(counts, np.count_nonzero(x, axis=1))


def int8_reference(t: CompressedTensor, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The NumPy reference of ``t``'s int8 product."""
    weights, scale, outliers = int8_weights(t)
    return int8_matmul_reference(x, weights, scale, bias, outliers)


# bits 1-5 decode codes through the vpermb table, 6-8 (more than 63 values) store the int8 weights themselves
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(0, 70), cols=st.integers(0, 200), density=st.floats(0, 1),
       structure=st.sampled_from(["unstructured", "blocks", "dense"]), bits=st.integers(1, 8),
       batch=st.integers(1, 40), scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))  # fmt: skip
def test_int8_is_bit_exact_against_its_numpy_reference(isa, rows, cols, density, structure, bits, batch, scale, seed):
    t = structured_tensor(rows, cols, density, structure, bits, seed)
    m = SparseMatrix(t, workers=2, arithmetic="int8")
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, cols)) * scale * (rng.random((batch, cols)) < 0.8)).astype(np.float32)
    x[0] = 0.0  # an all-zero token: scale 0, the bias alone
    bias = rng.standard_normal(rows).astype(np.float32)
    expected = int8_reference(t, x, bias)
    assert "int8" in m.kernels(batch)
    assert ("int8-blocks" in m.kernels(batch)) == m._blocky()  # the block layout where under 90% of blocks are kept
    for kernel in (k for k in m.kernels(batch) if k.startswith("int8")):
        np.testing.assert_array_equal(m.run(x, kernel, bias), expected)
        np.testing.assert_array_equal(m.run(x[-1:], kernel, bias), expected[-1:])


@pytest.mark.parametrize("batch", [1, 7, 8, 13, 24, 25, 100])
def test_int8_on_every_token_count_and_thread_count(isa, batch: int) -> None:
    """Both kernel families (one panel up to 7 tokens, two panels from 8), one and two threads, the same bits."""
    t = structured_tensor(100, 130, 0.7, "unstructured", 4, seed=batch)
    x = np.random.default_rng(batch).standard_normal((batch, 130)).astype(np.float32)
    expected = int8_reference(t, x, np.zeros(100, np.float32))
    for workers in (1, 2):
        np.testing.assert_array_equal(SparseMatrix(t, workers=workers, arithmetic="int8").run(x, "int8"), expected)


@pytest.mark.parametrize("batch", [1, 15, 16, 17, 33, 100])
@pytest.mark.parametrize(("structure", "kernel"), [("blocks", "int8-blocks"), ("unstructured", "int8-rows")])
@pytest.mark.parametrize("cols", [132, 2100])  # the row layout: one chunk of columns, and three
def test_int8_sparse_layouts_on_every_token_count_and_thread_count(isa, batch, structure, kernel, cols) -> None:
    """The block and row layouts' kernels (16 tokens in the lanes, the last block partial), one and two threads,
    rows of every length (empty ones too), far centroids."""
    rng = np.random.default_rng(batch)
    t = structured_tensor(100, cols, 0.3 if structure == "blocks" else 0.05, structure, 4, seed=batch)
    codes = rng.integers(0, 15, t.nnz)
    codes[rng.choice(t.nnz, 5, replace=False)] = 15  # a few weights on a far centroid
    t = CompressedTensor(t.shape, t.positions, codes, np.append(t.codebook[:15], np.float32(50)), 4)
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    expected = int8_reference(t, x, np.ones(100, np.float32))
    for workers in (1, 2):
        m = SparseMatrix(t, workers=workers, arithmetic="int8")
        np.testing.assert_array_equal(m.run(x, kernel, np.ones(100, np.float32)), expected)
    assert len(layouts.int8_panels(t, kernel.partition("-")[2]).outliers[1]) > 0  # the far centroid's weights: float32


def test_int8_is_close_to_the_decoded_matrix_and_per_token() -> None:
    """Errors of the size int8 rounding makes, and a token's result independent of the rest of its batch."""
    t = structured_tensor(64, 256, 1.0, "dense", 4, seed=3)
    m = SparseMatrix(t, arithmetic="int8")
    assert m.kernel_for(np.ones((10, 256), np.float32)) == "int8"  # dense: int8 is the fastest product
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 256)).astype(np.float32)
    x[3] *= 1000.0  # a loud token must not coarsen the others' quantization
    exact = x.astype(np.float64) @ t.to_dense().numpy().T.astype(np.float64)
    out = m.matmul(x)
    # each product term is off by at most half a step of x and of w: a bound per output
    peak_x, peak_w = np.abs(x).max(axis=1, keepdims=True), np.abs(t.codebook).max()
    bound = 256 * (peak_x / 127 * peak_w + peak_w / 127 * peak_x) / 2 + 1e-3
    assert (np.abs(out - exact) <= bound).all()
    np.testing.assert_array_equal(out[5], m.run(x[5:6], "int8")[0])
    assert np.abs(out[5] - exact[5]).max() < 0.05 * np.abs(exact[5]).max()


def test_int8_turns_a_token_holding_nan_or_inf_into_nan(isa) -> None:
    """As a float32 product would, and only that token's outputs (the others are as without it)."""
    t = structured_tensor(40, 70, 0.8, "unstructured", 3, seed=10)
    x = np.random.default_rng(10).standard_normal((4, 70)).astype(np.float32)
    x[1, 5], x[2, 69] = np.nan, -np.inf
    m = SparseMatrix(t, arithmetic="int8")
    out = m.run(x, "int8")
    np.testing.assert_array_equal(out, int8_reference(t, x, np.zeros(40, np.float32)))
    assert np.isnan(out[1:3]).all() and np.isfinite(out[[0, 3]]).all()
    np.testing.assert_array_equal(out[[0, 3]], m.run(x[[0, 3]], "int8"))


def test_int8_keeps_far_centroids_in_float32(isa) -> None:
    """One centroid 100x the others (as importance-weighted k-means keeps a few large weights) leaves the rest's step fine."""
    rng = np.random.default_rng(8)
    codebook = np.append(rng.standard_normal(15) * 0.05, 5.0).astype(np.float32)
    codes = rng.integers(0, 15, 64 * 200)
    codes[rng.choice(len(codes), 20, replace=False)] = 15  # 20 weights use the far centroid
    t = CompressedTensor((64, 200), np.arange(64 * 200), codes, codebook, 4)
    layout = layouts.int8_panels(t)
    assert len(layout.outliers[1]) == 20 and layout.scale == np.float32(np.abs(codebook[:15]).max() / 127)
    x = rng.standard_normal((9, 200)).astype(np.float32)
    out = SparseMatrix(t, arithmetic="int8").run(x, "int8")
    np.testing.assert_array_equal(out, int8_reference(t, x, np.zeros(64, np.float32)))
    exact = x.astype(np.float64) @ t.to_dense().numpy().T.astype(np.float64)
    assert np.abs(out - exact).max() < 0.02 * np.abs(exact).max()


@pytest.mark.parametrize(("stride", "dilation", "padding"), [((1, 1), (1, 1), 1), ((2, 1), (1, 2), 0)])
@pytest.mark.parametrize("kernel", ["int8", "int8-blocks", "int8-rows"])
def test_int8_convolution_is_the_int8_product_of_its_patches(isa, stride, dilation, padding, kernel, monkeypatch):
    import torch
    import torch.nn.functional as F

    from deepshrink.engine import SparseConv2d

    monkeypatch.setattr(SparseMatrix, "_int8_costs", lambda self, tokens: {kernel: 0.0})  # each int8 kernel in turn
    rng = np.random.default_rng(6)
    t = structured_tensor(8, 3 * 3 * 3, 0.6, "unstructured", 4, seed=6)
    t4 = CompressedTensor((8, 3, 3, 3), t.positions, t.codes, t.codebook, t.bits)
    x = torch.from_numpy(rng.standard_normal((2, 3, 11, 9)).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(8).astype(np.float32))
    conv = SparseConv2d(t4, bias, stride=stride, padding=padding, dilation=dilation, arithmetic="int8")
    out = conv(x)
    patches = F.unfold(x, (3, 3), dilation=dilation, padding=padding, stride=stride)  # (batch, 27, positions)
    flat = patches.transpose(1, 2).reshape(-1, 27).numpy()
    expected = int8_reference(t, flat, bias.numpy())  # the (c, i, j) patches times the weight as stored
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).reshape(-1, 8).numpy(), expected, rtol=0, atol=1e-6)
    exact = F.conv2d(x, t4.to_dense(), bias, stride, padding, dilation)
    assert out.shape == exact.shape and (out - exact).abs().max() < 0.05 * exact.abs().max()
    assert out.is_contiguous()  # NCHW in, NCHW out, as nn.Conv2d (code after it may view it)
    last = conv(x.contiguous(memory_format=torch.channels_last))
    assert last.is_contiguous(memory_format=torch.channels_last)  # the next convolution reads it as it is
    torch.testing.assert_close(last, out, rtol=0, atol=0)
    torch.testing.assert_close(conv._decode(), t4.to_dense(), rtol=0, atol=0)  # the weight, back in nn.Conv2d's order


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kernel=st.sampled_from([(1, 1), (3, 3), (2, 3), (1, 5)]),
    stride=st.sampled_from([(1, 1), (2, 2), (1, 3)]),
    dilation=st.sampled_from([(1, 1), (2, 1)]),
    padding=st.sampled_from([0, 1, (2, 0), "same", "valid"]),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    batch=st.integers(1, 3),
)
def test_int8_convolution_of_any_geometry_is_its_patches_product(isa, kernel, stride, dilation, padding, size, batch):
    """1 x 1 (the image is its own patch matrix), "same" with an even kernel (one more on the right), one position."""
    import torch
    import torch.nn.functional as F

    from deepshrink.engine import SparseConv2d

    stride = (1, 1) if padding == "same" else stride  # nn.Conv2d refuses "same" with a stride
    x = torch.from_numpy(np.random.default_rng(sum(size)).standard_normal((batch, 4, *size)).astype(np.float32))
    t = structured_tensor(6, 4 * kernel[0] * kernel[1], 0.7, "unstructured", 4, seed=batch)
    t4 = CompressedTensor((6, 4, *kernel), t.positions, t.codes, t.codebook, t.bits)
    reference = torch.nn.Conv2d(4, 6, kernel, stride, padding, dilation, bias=False)
    try:
        with torch.no_grad():
            expected_shape = reference(x).shape
    except RuntimeError:
        conv = SparseConv2d(t4, stride=stride, padding=padding, dilation=dilation, arithmetic="int8")
        with pytest.raises(DeepShrinkError, match="is smaller than the dilated kernel"):
            conv(x)  # nn.Conv2d refuses it too
        return
    conv = SparseConv2d(t4, stride=stride, padding=padding, dilation=dilation, arithmetic="int8")
    out = conv(x)
    assert out.shape == expected_shape
    patches = F.unfold(F.pad(x, conv._pad), kernel, dilation=dilation, stride=stride)  # (c, i, j) order
    patches = patches.transpose(1, 2).reshape(-1, t.shape[1]).numpy()
    ours = patches.reshape(len(patches), 4, -1).transpose(0, 2, 1).reshape(len(patches), -1)  # (i, j, c): the layer's
    if conv._by_patches(*out.shape[:1], *out.shape[2:]) and conv.matrix.kernel_for(
        ours if len(ours) > 1 else ours[0]
    ).startswith("int8"):
        expected = int8_reference(t, patches, np.zeros(6, np.float32))
    else:  # a float32 kernel runs the product, or the direct convolution: the decoded product
        expected = patches @ t.to_dense().numpy().T
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).reshape(-1, 6).numpy(), expected, rtol=0, atol=1e-5)


def test_int8_convolution_leaves_what_no_int8_kernel_wins_to_the_direct_one() -> None:
    """A small, very sparse matrix over many positions: the float32 direct convolution, built on first use."""
    import torch
    import torch.nn.functional as F

    from deepshrink.engine import SparseConv2d

    t = structured_tensor(8, 16 * 9, 0.02, "unstructured", 4, seed=3)
    t4 = CompressedTensor((8, 16, 3, 3), t.positions, t.codes, t.codebook, t.bits)
    conv = SparseConv2d(t4, padding=1, arithmetic="int8")
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 16, 20, 20)).astype(np.float32))
    assert conv.matrix.int8_kernel(2 * 20 * 20) is None and conv._direct is None and not conv._by_patches(2, 20, 20)
    expected = F.conv2d(x, t4.to_dense(), None, 1, 1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert conv._direct is not None and conv._direct.arithmetic == "float32"
    last = conv(x.contiguous(memory_format=torch.channels_last))  # the direct way too, back in its format
    assert last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(last, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv._direct.tensor.to_dense(), t4.to_dense(), rtol=0, atol=0)  # taps back in place
    assert conv.held_bytes == conv.matrix.held_bytes + conv._direct.held_bytes  # both ways' matrices counted


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 20)),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    threads=st.sampled_from([1, 2]),
)
def test_channels_last_kernels_in_c_are_the_numba_ones(shape, kernel, stride, dilation, pad, threads) -> None:
    """The patch gather and the depthwise convolution: C (what runs) against numba (the fallback), bit for bit."""
    from deepshrink.engine import _simd, kernels

    batch, height, width, channels = shape
    out_h = (height + 2 * pad[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * pad[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    if min(out_h, out_w) < 1:
        return
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    geometry = (*shape, *kernel, *stride, *dilation, *pad, out_h, out_w)
    taps = kernel[0] * kernel[1]
    ours, theirs = (np.full((batch * out_h * out_w, taps * channels), np.nan, np.float32) for _ in range(2))
    _simd.nhwc_patches(x, ours, geometry, threads)
    kernels.nhwc_patches(x, kernel, stride, dilation, pad, out_w, theirs)
    np.testing.assert_array_equal(ours, theirs)
    filters, bias = (
        rng.standard_normal((taps, channels)).astype(np.float32),
        rng.standard_normal(channels).astype(np.float32),
    )
    ours, theirs = (np.full((batch, out_h, out_w, channels), np.nan, np.float32) for _ in range(2))
    _simd.depthwise_nhwc(x, filters, bias, ours, geometry, threads)
    kernels.depthwise_nhwc(x, filters, kernel, stride, dilation, pad, bias, theirs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)  # the same sums; the compilers may order them apart


def test_channels_last_kernels_refuse_what_does_not_fit() -> None:
    from deepshrink.engine import _simd

    x, out = np.zeros((1, 4, 4, 2), np.float32), np.zeros((16, 18), np.float32)
    with pytest.raises(ValueError, match="out holds 1152 bytes, the kernel reads 2304"):
        _simd.nhwc_patches(x, out, (1, 4, 4, 2, 3, 3, 1, 1, 1, 1, 1, 1, 4, 8), 1)  # a plane twice as wide
    with pytest.raises(ValueError, match="x holds 128 bytes"):
        _simd.nhwc_patches(x, out, (2, 4, 4, 2, 3, 3, 1, 1, 1, 1, 1, 1, 4, 4), 1)
    with pytest.raises(ValueError, match="an empty kernel or output plane"):
        _simd.depthwise_nhwc(x, np.zeros((9, 2), np.float32), np.zeros(2, np.float32), out, (1, 4, 4, 2, 3, 3, 1, 1,
                             1, 1, 0, 0, 0, 2), 1)  # fmt: skip


def test_convolutions_without_the_extension_run_the_numba_kernels(monkeypatch) -> None:
    import torch
    import torch.nn.functional as F

    from deepshrink.engine import layers

    monkeypatch.setattr(layers, "_simd", None)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 6, 10, 9)).astype(np.float32))
    t = structured_tensor(6, 6 * 9, 0.5, "unstructured", 4, seed=2)
    t4 = CompressedTensor((6, 6, 3, 3), t.positions, t.codes, t.codebook, t.bits)
    conv = layers.SparseConv2d(t4, stride=2, padding=1)  # a stride: the patches
    torch.testing.assert_close(conv(x), F.conv2d(x, t4.to_dense(), None, 2, 1), rtol=1e-5, atol=1e-5)
    depthwise = CompressedTensor((6, 1, 3, 3), np.arange(54)[::2], t.codes[:27], t.codebook, t.bits)
    conv = layers.SparseConv2d(depthwise, padding=1, groups=6)
    torch.testing.assert_close(conv(x), F.conv2d(x, depthwise.to_dense(), None, 1, 1, 1, 6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arithmetic", ["float32", "int8"])
def test_a_large_batch_gathers_its_patches_in_groups_of_images(arithmetic, monkeypatch) -> None:
    """Under a small cap the buffer kept for the patches holds one group, and the result is the whole batch's."""
    import threading

    import torch
    import torch.nn.functional as F

    from deepshrink.engine import layers

    t = structured_tensor(8, 4 * 9, 0.6, "unstructured", 4, seed=4)
    t4 = CompressedTensor((8, 4, 3, 3), t.positions, t.codes, t.codebook, t.bits)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((5, 4, 12, 10)).astype(np.float32))
    whole = layers.SparseConv2d(t4, stride=2, padding=1, arithmetic=arithmetic)(x)
    per_image = 6 * 5 * 36 * 4  # out_h * out_w * columns * 4 bytes
    monkeypatch.setattr(layers, "SCRATCH_MAX_BYTES", 2 * per_image)  # two images a group: 2 + 2 + 1
    monkeypatch.setattr(layers, "_SCRATCH", threading.local())
    grouped = layers.SparseConv2d(t4, stride=2, padding=1, arithmetic=arithmetic)(x)
    assert layers._SCRATCH.buffer.nbytes == 2 * per_image
    torch.testing.assert_close(grouped, whole, rtol=1e-6, atol=1e-6)  # int8: per token, so batch-independent
    exact = F.conv2d(x, t4.to_dense(), None, 2, 1)
    assert (grouped - exact).abs().max() <= (1e-5 if arithmetic == "float32" else 0.05) * exact.abs().max()


def test_int8_leaves_very_sparse_products_to_float32() -> None:
    """At 2% density a sparse float32 kernel visits 50x fewer weights than dense int8: it runs them, more exactly."""
    t = structured_tensor(2000, 2000, 0.02, "unstructured", 4, seed=9)
    m = SparseMatrix(t, workers=2, arithmetic="int8")
    x = np.random.default_rng(9).standard_normal((1, 2000)).astype(np.float32)
    assert m.kernel_for(x) != "int8" and "int8" in m.kernels(1)
    np.testing.assert_allclose(m.matmul(x), x @ t.to_dense().numpy().T, rtol=1e-4, atol=1e-4)


def test_int8_refuses_what_it_cannot_run(monkeypatch) -> None:
    import torch

    from deepshrink.engine import SparseConv2d, compile_model

    t = structured_tensor(8, 27, 0.5, "unstructured", 4, seed=7)
    with pytest.raises(DeepShrinkError, match="arithmetic='int4' is not one of float32, fixed16, int8"):
        SparseMatrix(t, arithmetic="int4")
    with pytest.raises(DeepShrinkError, match="is not one of"):
        compile_model(torch.nn.Linear(2, 2), {}, arithmetic="bf16")
    wide = CompressedTensor((1, 1 << 16), np.array([5]), np.array([0]), np.array([1.0], np.float32), 1)
    with pytest.raises(DeepShrinkError, match="fewer than 65,536 columns"):
        SparseMatrix(wide, arithmetic="int8")
    with pytest.raises(DeepShrinkError, match="SparseConv2d runs it"):
        SparseMatrix(t, arithmetic="int8").conv2d(np.zeros((1, 3, 5, 5), np.float32), (3, 3), (1, 1), (1, 1))
    grouped = CompressedTensor((8, 3, 3, 3), t.positions, t.codes, t.codebook, t.bits)
    with pytest.warns(UserWarning, match="runs in float32"):
        conv = SparseConv2d(grouped, groups=2, arithmetic="int8")
    assert conv.matrix.arithmetic == "float32"
    monkeypatch.setattr(matrix, "_simd", None)
    with pytest.raises(DeepShrinkError, match="SIMD extension"):
        SparseMatrix(t, arithmetic="int8")
