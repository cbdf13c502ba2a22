"""The engine: kernels against plain NumPy references, layers against the decoded dense model
(odd shapes, every batch path, 16-bit fixed point), and real LeNets on MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepshrink.engine import (
    SparseConv2d,
    SparseEmbedding,
    SparseLinear,
    SparseMatrix,
    compile_model,
    engine_layers,
    from_file,
    kernels,
    matrix,
)
from deepshrink.engine.fixedpoint import fraction_bits, from_fixed, to_fixed
from deepshrink.engine.matrix import segmented_stream, sliced_rows
from deepshrink.errors import DeepShrinkError, UnsupportedLayerError
from deepshrink.tensor import CompressedTensor

# (rows, cols, weight density): empty and all-zero matrices, one row, one column,
# long gaps (escapes) and more rows than a uint16 holds.
SHAPES = [(0, 5, 0.5), (4, 0, 0.5), (5, 7, 0.0), (1, 9, 0.6), (9, 1, 0.6), (600, 40, 0.004), (70_000, 3, 0.01)]


def random_tensor(rows: int, cols: int, density: float, seed: int = 0, bits: int = 4) -> CompressedTensor:
    rng = np.random.default_rng(seed)
    positions = np.flatnonzero(rng.random(rows * cols) < density)
    codebook = rng.standard_normal(1 << bits).astype(np.float32)
    return CompressedTensor((rows, cols), positions, rng.integers(0, 1 << bits, len(positions)), codebook, bits)


def reference_segments(
    segment: np.ndarray, offset: np.ndarray, codes: np.ndarray, n_segments: int, pad_code: int
) -> tuple[list[int], list[int], list[int]]:
    """EIE's padding spelled out, one entry at a time."""
    ptr, gaps, out_codes = [0], [], []
    for s in range(n_segments):
        previous = -1
        for off, code in zip(offset[segment == s], codes[segment == s]):
            zeros = off - previous - 1
            while zeros > kernels.MAX_GAP:  # a padding entry: MAX_GAP zeros, then a zero weight
                gaps.append(kernels.MAX_GAP)
                out_codes.append(pad_code)
                zeros -= kernels.MAX_GAP + 1
            gaps.append(zeros)
            out_codes.append(code)
            previous = off
        ptr.append(len(gaps))
    return ptr, gaps, out_codes


@pytest.mark.parametrize("n_segments", [0, 1, 3, 8])
def test_segmented_stream_matches_reference(n_segments: int) -> None:
    rng = np.random.default_rng(n_segments)
    n = 4 * n_segments
    segment = np.sort(rng.integers(0, max(n_segments, 1), n))
    offset = rng.integers(0, 900, n)  # gaps of several hundred need padding
    edges = [0, 256, 257, 513, 769] if n_segments else []  # gaps of 255, 0 and 256 in segment 0
    keys = np.unique(np.concatenate([segment * 1000 + offset, edges])).astype(np.int64)
    segment, offset = keys // 1000, keys % 1000
    codes = rng.integers(0, 16, len(keys)).astype(np.uint8)
    ptr, gaps, aligned = segmented_stream(segment, offset, codes, n_segments, pad_code=16)
    ref_ptr, ref_gaps, ref_codes = reference_segments(segment, offset, codes, n_segments, 16)
    assert ptr.tolist() == ref_ptr and gaps.tolist() == ref_gaps and aligned.tolist() == ref_codes
    assert aligned.dtype == np.uint8
    assert segmented_stream(segment, offset, codes, n_segments, pad_code=256)[2].dtype == np.uint16


@pytest.mark.parametrize("x", [[], [0.0, 0.0], [0.0, 1.5, 0.0, -2.0, 3.0]])
def test_nonzero_columns(x: list[float]) -> None:
    x = np.array(x, dtype=np.float32)
    np.testing.assert_array_equal(kernels.nonzero_columns(x), np.flatnonzero(x))


@pytest.mark.parametrize("rows,cols,density", SHAPES)
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("kernel", [kernels.csc_matvec, kernels.csc_matvec_serial], ids=["parallel", "serial"])
def test_csc_kernel_matches_dense(rows: int, cols: int, density: float, workers: int, kernel) -> None:
    t = random_tensor(rows, cols, density)
    m = SparseMatrix(t, workers=workers)
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    x[::3] = 0  # zero activations are skipped
    acc = np.zeros((workers, m.local_rows), dtype=np.float32)
    out = np.empty(rows, dtype=np.float32)
    bias = np.arange(rows, dtype=np.float32)
    kernel(m.col_ptr, m.col_gaps, m.col_codes, m.codebook, x, 1.0, bias, acc, out)
    np.testing.assert_allclose(out, t.to_dense().numpy() @ x + bias, rtol=1e-5, atol=1e-5)


def test_sliced_layout_matches_reference() -> None:
    t = random_tensor(37, 50, 0.2, seed=7)  # 37 rows: the last slice is part padding
    ptr, packed, slice_rows, col_bits = sliced_rows(*t.rows_cols(), t.codes, t.matrix_shape, len(t.codebook))
    assert packed.dtype == np.uint16 and col_bits == 6 and len(slice_rows) == 40
    dense = t.to_dense().numpy()
    lengths = (dense != 0).sum(axis=1)
    assert lengths[slice_rows[:37]].tolist() == sorted(lengths, reverse=True)  # longest first
    assert sorted(slice_rows.tolist()) == list(range(40))  # the rows, then the padding lanes' places
    for s in range(len(ptr) - 1):
        block = packed[ptr[s] : ptr[s + 1]].reshape(-1, kernels.SLICE_ROWS).astype(np.int64)
        for lane, row in enumerate(slice_rows[8 * s : 8 * s + 8]):
            cols, codes = block[:, lane] & (2**col_bits - 1), block[:, lane] >> col_bits
            real = cols < 50  # the rest is padding, column 50
            assert (cols[real][:-1] < cols[real][1:]).all() and not real[real.sum() :].any()
            if row < 37:
                np.testing.assert_array_equal(t.codebook[codes[real]], dense[row, cols[real]])
            else:
                assert not real.any()
    wide = random_tensor(3, 5000, 0.01, seed=8)  # 13 column bits + 4 code bits: 32-bit entries
    assert sliced_rows(*wide.rows_cols(), wide.codes, wide.matrix_shape, 16)[1].dtype == np.uint32


@pytest.mark.parametrize("rows,cols,density", SHAPES + [(300, 5000, 0.02)])
@pytest.mark.parametrize("use_table", [True, False], ids=["table", "gather"])
@pytest.mark.parametrize("kernel", [kernels.sliced_matvec, kernels.sliced_matvec_serial], ids=["parallel", "serial"])
def test_sliced_batch1_kernel_matches_dense(rows: int, cols: int, density: float, use_table: bool, kernel) -> None:
    t = random_tensor(rows, cols, density, seed=5)
    m = SparseMatrix(t)
    x = np.random.default_rng(6).standard_normal(cols).astype(np.float32)
    out = np.empty(rows, dtype=np.float32)
    bias = np.arange(rows, dtype=np.float32)
    kernel(*m.sliced(), t.codebook, x, use_table, 1.0, bias, np.zeros(1, np.float32), out, 3)
    np.testing.assert_allclose(out, t.to_dense().numpy() @ x + bias, rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 40), cols=st.integers(0, 300), density=st.floats(0, 1), bits=st.integers(1, 8),
       active=st.floats(0, 1), fixed=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_every_batch1_kernel_matches_dense_on_any_matrix(rows, cols, density, bits, active, fixed, seed) -> None:
    t = random_tensor(rows, cols, density, seed=seed, bits=bits)
    m = SparseMatrix(t, workers=2, arithmetic="fixed16" if fixed else "float32")
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(cols) * (rng.random(cols) < active)).astype(np.float32)
    expected = t.to_dense().numpy().astype(np.float64) @ x
    tolerance = 2e-3 * (1 + np.abs(t.codebook).max(initial=0) * np.abs(x).sum()) if fixed else 1e-4
    assert m.kernel_for(x) in m.kernels(1)
    for kernel in m.kernels(1):
        np.testing.assert_allclose(m.run(x[None], kernel)[0], expected, rtol=1e-4, atol=tolerance, err_msg=kernel)
    np.testing.assert_allclose(m.matvec(x), expected, rtol=1e-4, atol=tolerance)


def test_batch1_kernel_choice_follows_activation_density() -> None:
    m = SparseMatrix(random_tensor(600, 4000, 0.1), workers=2)
    dense_x, sparse_x = np.ones(4000, np.float32), np.zeros(4000, np.float32)
    sparse_x[::20] = 1.0
    assert m.prefers_rows(dense_x) and not m.prefers_rows(sparse_x)
    assert not m.use_table  # 4,000 columns x 16 codes: the table would not fit the cache
    assert SparseMatrix(random_tensor(600, 300, 0.1), workers=2).use_table
    for x in (dense_x, sparse_x):  # both paths, same answer
        np.testing.assert_allclose(m.matvec(x), m.tensor.to_dense().numpy() @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows,cols,density", SHAPES)
@pytest.mark.parametrize("kernel", [kernels.csr_matmul, kernels.csr_matmul_serial], ids=["parallel", "serial"])
def test_csr_kernel_matches_dense(rows: int, cols: int, density: float, kernel) -> None:
    t = random_tensor(rows, cols, density, seed=2)
    m = SparseMatrix(t)
    xt = np.random.default_rng(3).standard_normal((cols, 5)).astype(np.float32)
    out = np.zeros((rows, 5), dtype=np.float32)
    kernel(*m.row_major(), m.codebook, xt, out)
    np.testing.assert_allclose(out, t.to_dense().numpy() @ xt, rtol=1e-5, atol=1e-5)


def test_kernels_in_fixed_point_are_exact_integer_sums() -> None:
    t = random_tensor(300, 200, 0.1, seed=4)
    cb, _ = to_fixed(t.codebook)
    x, _ = to_fixed(np.random.default_rng(5).standard_normal(200))
    x[::2] = 0
    dense = np.zeros(t.numel, dtype=np.int64)
    dense[t.positions] = cb[t.codes]
    dense = dense.reshape(300, 200)
    m = SparseMatrix(t, workers=2, arithmetic="fixed16")
    np.testing.assert_array_equal(m.codebook[:-1], cb)
    acc = np.zeros((2, m.local_rows), dtype=np.int64)
    out = np.empty(300, dtype=np.float32)
    kernels.csc_matvec(m.col_ptr, m.col_gaps, m.col_codes, m.codebook, x, 1.0, np.zeros(300, np.float32), acc, out)
    np.testing.assert_array_equal(acc.T.reshape(-1)[:300], dense @ x.astype(np.int64))
    out = np.zeros((300, 1), dtype=np.int64)
    kernels.csr_matmul(*m.row_major(), m.codebook, x[:, None].copy(), out)
    np.testing.assert_array_equal(out[:, 0], dense @ x.astype(np.int64))
    for use_table in (True, False):
        sums = np.empty(300, dtype=np.float32)  # scale 1: the exact integer sums, as float32
        kernels.sliced_matvec(*m.sliced(), cb, x, use_table, 1.0, np.zeros(300, np.float32), np.zeros(1, np.int64),
                              sums, 2)  # fmt: skip
        np.testing.assert_array_equal(sums, (dense @ x.astype(np.int64)).astype(np.float32))


def test_fixed_point_formats() -> None:
    assert fraction_bits(np.zeros(3)) == 15 and fraction_bits(np.zeros(0)) == 15
    q, frac = to_fixed(np.array([1.0, -1.0, 0.3]))  # 1.0 needs one integer bit
    assert frac == 14 and q.tolist() == [16384, -16384, round(0.3 * 2**14)]
    q, frac = to_fixed(np.array([0.99999]))  # rounds up to 2**15: saturates
    assert frac == 15 and q.tolist() == [32767]
    values = np.random.default_rng(6).standard_normal(1000) * 7
    q, frac = to_fixed(values)
    assert np.abs(from_fixed(q, frac) - values).max() <= 2.0 ** -(frac + 1) + 1e-6


# -- layers and products against the decoded dense weights ---------------------


BATCHES = [1, 2, 3, 4, 16, 64]  # matmul picks per sample or the row kernel; both are checked


def fixed_point_reference(t: CompressedTensor, x: np.ndarray) -> np.ndarray:
    """EIE arithmetic spelled out: int16 weights and activations (one Q format per sample), exact int64 sums."""
    cb, cb_frac = to_fixed(t.codebook)
    dense = np.zeros(t.numel, dtype=np.int64)
    dense[t.positions] = cb[t.codes]
    rows = []
    for sample in x:
        xq, x_frac = to_fixed(sample)
        rows.append(from_fixed(dense.reshape(t.shape[0], -1) @ xq.astype(np.int64), cb_frac + x_frac))
    return np.stack(rows)


@pytest.mark.parametrize("rows,cols,density", SHAPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_matrix_products_match_dense(rows: int, cols: int, density: float, batch: int) -> None:
    t = random_tensor(rows, cols, density, seed=batch)
    dense = t.to_dense().numpy()
    x = np.random.default_rng(batch).standard_normal((batch, cols)).astype(np.float32)
    x[:, ::4] = 0
    m = SparseMatrix(t, workers=2)
    np.testing.assert_allclose(m.matmul(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.matmul_columns(np.ascontiguousarray(x.T)), dense @ x.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.matvec(x[0]), dense @ x[0], rtol=1e-5, atol=1e-5)


def test_batches_go_per_sample_while_that_visits_fewer_weights() -> None:
    m = SparseMatrix(random_tensor(1000, 2000, 0.25, seed=3), workers=2)
    rng = np.random.default_rng(4)
    sparse = (rng.random((64, 2000)) < 0.3).astype(np.float32)
    assert m.prefers_samples(sparse[:4])  # a few samples at 30 % activation: EIE's kernel per sample
    assert not m.prefers_samples(sparse)  # 64 of them: the row kernel's one pass
    assert m.prefers_samples(np.zeros((16, 2000), np.float32))  # nothing active: next to nothing per sample
    assert not m.prefers_samples(np.ones((16, 2000), np.float32))
    tiny = SparseMatrix(random_tensor(10, 10, 0.5, seed=5))
    assert not tiny.prefers_samples(np.ones((3, 10), np.float32))  # a few weights: one call beats three


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_fixed_point_matches_reference_exactly(batch: int) -> None:
    t = random_tensor(500, 300, 0.1, seed=7)
    x = np.maximum(np.random.default_rng(8).standard_normal((batch, 300)), 0).astype(np.float32) * 3
    np.testing.assert_array_equal(SparseMatrix(t, arithmetic="fixed16").matmul(x), fixed_point_reference(t, x))


def test_all_zero_input_and_weights() -> None:
    t = random_tensor(40, 30, 0.0)
    assert not SparseMatrix(t).matvec(np.ones(30, np.float32)).any()
    t = random_tensor(40, 30, 0.3)
    assert not SparseMatrix(t).matvec(np.zeros(30, np.float32)).any()
    assert not SparseMatrix(t, arithmetic="fixed16").matvec(np.zeros(30, np.float32)).any()


def test_bad_input_is_named() -> None:
    m = SparseMatrix(random_tensor(4, 3, 0.5))
    with pytest.raises(DeepShrinkError, match="cols=3"):
        m.matvec(np.zeros(4, np.float32))
    with pytest.raises(DeepShrinkError, match="float32"):
        m.matmul(np.zeros((2, 3), np.float64))
    with pytest.raises(DeepShrinkError, match="workers=0"):
        SparseMatrix(random_tensor(4, 3, 0.5), workers=0)
    with pytest.raises(DeepShrinkError, match="2-D"):
        SparseLinear(CompressedTensor.from_dense(torch.ones(2, 2, 2)))
    with pytest.raises(DeepShrinkError, match="bias has 3"):
        SparseLinear(random_tensor(4, 3, 0.5), torch.ones(3))
    layer = SparseLinear(random_tensor(4, 3, 0.5))
    with pytest.raises(DeepShrinkError, match=r"\(\.\.\., 3\)"):
        layer(torch.zeros(2, 4))
    with pytest.raises(DeepShrinkError, match="float32 CPU"):
        layer(torch.zeros(2, 3, dtype=torch.float64))


def test_sparse_linear_follows_its_bias_buffer() -> None:
    t = random_tensor(6, 5, 0.5)
    layer, x = SparseLinear(t), torch.randn(1, 5)
    torch.testing.assert_close(layer(x), x @ t.to_dense().T)  # no bias
    layer.bias = torch.ones(6)  # a new buffer object
    torch.testing.assert_close(layer(x), x @ t.to_dense().T + 1)
    layer.load_state_dict({"bias": torch.full((6,), 2.0)})  # copied into the same buffer
    torch.testing.assert_close(layer(x), x @ t.to_dense().T + 2)
    layer.bias = torch.ones(5)
    with pytest.raises(DeepShrinkError, match=r"bias must be float32 of shape \(6,\)"):
        layer(x)


def test_sparse_linear_keeps_leading_dims() -> None:
    t = random_tensor(6, 5, 0.5)
    bias = torch.arange(6, dtype=torch.float32)
    x = torch.randn(2, 3, 5)
    expected = F.linear(x, t.to_dense(), bias)
    torch.testing.assert_close(SparseLinear(t, bias)(x), expected)


# (kernel, stride, padding, dilation, batch): the stride-1 flat path with and without
# dilation and padding, strided and mixed geometries, a 1x1 kernel, "same" padding
# (uneven for an even kernel), an empty batch.
CONVS = [
    ((3, 3), 1, 0, 1, 1),
    ((3, 3), 2, 1, 1, 3),
    ((3, 3), 1, 2, 2, 2),
    ((2, 4), (1, 2), (0, 1), (2, 1), 2),
    ((1, 1), 1, 0, 1, 2),
    ((5, 3), (2, 1), 2, (1, 3), 1),
    ((2, 4), 1, "same", (1, 2), 2),
    ((3, 3), 1, "same", 1, 1),
    ((3, 3), 1, "valid", 1, 0),
]


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")  # PyTorch's own, on the reference
@pytest.mark.parametrize("kernel,stride,padding,dilation,batch", CONVS)
def test_sparse_conv_matches_conv2d(kernel, stride, padding, dilation, batch: int) -> None:
    conv = nn.Conv2d(3, 8, kernel, stride=stride, padding=padding, dilation=dilation)
    taps = 3 * kernel[0] * kernel[1]
    t = random_tensor(8, taps, 0.3, seed=batch).to_dense().reshape(8, 3, *kernel)
    weight = CompressedTensor.from_dense(t)
    sparse = SparseConv2d.from_conv(conv, weight)
    for by_patches in (False, True):  # both ways, whichever the cost model picks here
        sparse._by_patches = lambda *geometry, by_patches=by_patches: by_patches
        for size in ((11, 9), (24, 20)):
            x = torch.relu(torch.randn(batch, 3, *size))
            expected = F.conv2d(x, t, conv.bias, stride, padding, dilation)
            out = sparse(x)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert out.is_contiguous() or out.numel() == 0  # NCHW in, NCHW out: code after it may view it
    assert sparse._patched is not None and sparse._direct is sparse.matrix
    del sparse._by_patches
    with pytest.raises(UnsupportedLayerError, match="reflect"):
        SparseConv2d.from_conv(nn.Conv2d(3, 8, 3, padding_mode="reflect"), weight)
    if padding == 0:
        with pytest.raises(DeepShrinkError, match="is smaller than the dilated kernel"):
            sparse(torch.zeros(1, 3, kernel[0] - 1, 9))
    with pytest.raises(DeepShrinkError, match="'full'"):
        SparseConv2d(weight, padding="full")


@pytest.mark.parametrize(
    "in_channels,out_channels,groups,stride", [(4, 6, 2, 1), (6, 6, 6, 1), (6, 6, 6, 2), (6, 12, 6, 2), (8, 4, 4, 1)]
)
def test_grouped_and_depthwise_conv_match_conv2d(in_channels: int, out_channels: int, groups: int, stride: int) -> None:
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups)
    taps = in_channels // groups * 9
    t = random_tensor(out_channels, taps, 0.5, seed=groups).to_dense().reshape(out_channels, -1, 3, 3)
    x = torch.relu(torch.randn(2, in_channels, 9, 10))
    layer = SparseConv2d.from_conv(conv, CompressedTensor.from_dense(t))
    expected = F.conv2d(x, t, conv.bias, stride, 1, 1, groups)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert (layer.taps is not None) == (in_channels == out_channels == groups)  # depthwise: its own kernel
    last = layer(x.contiguous(memory_format=torch.channels_last))
    assert last.is_contiguous(memory_format=torch.channels_last) and layer(x).is_contiguous()  # as nn.Conv2d
    torch.testing.assert_close(last, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(DeepShrinkError, match="groups=4"):
        SparseConv2d(CompressedTensor.from_dense(torch.ones(6, 1, 3, 3)), groups=4)


@settings(max_examples=30, deadline=None)
@given(
    channels=st.integers(2, 20),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.sampled_from([1, 2, (1, 3)]),
    dilation=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1, 2, "valid"]),
    size=st.tuples(st.integers(5, 14), st.integers(5, 14)),
    channels_last=st.booleans(),
    bias=st.booleans(),
)
def test_depthwise_conv_of_any_geometry_matches_conv2d(channels, kernel, stride, dilation, padding, size, channels_last,
                                                       bias) -> None:  # fmt: skip
    conv = nn.Conv2d(channels, channels, kernel, stride=stride, padding=padding, dilation=dilation, groups=channels,
                     bias=bias)  # fmt: skip
    t = random_tensor(channels, kernel[0] * kernel[1], 0.6, seed=channels).to_dense().reshape(channels, 1, *kernel)
    layer = SparseConv2d.from_conv(conv, CompressedTensor.from_dense(t))
    assert layer.taps is not None
    x = torch.randn(2, channels, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        expected = F.conv2d(x, t, conv.bias, stride, padding, dilation, channels)
    except RuntimeError:  # smaller than the dilated kernel
        with pytest.raises(DeepShrinkError, match="smaller than the dilated kernel"):
            layer(x)
        return
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_sparse_conv_in_fixed_point_matches_reference_per_image() -> None:
    t = random_tensor(6, 2 * 9, 0.4, seed=9)
    x = np.maximum(np.random.default_rng(10).standard_normal((3, 2, 7, 8)), 0).astype(np.float32)
    x[1] *= 50  # each image gets its own Q format: its result must not depend on the others
    out = SparseMatrix(t, arithmetic="fixed16").conv2d(x, (3, 3), (1, 1), (1, 1))
    cb, cb_frac = to_fixed(t.codebook)
    dense = np.zeros(t.numel, dtype=np.int64)
    dense[t.positions] = cb[t.codes]
    for b in range(3):
        xq, frac = to_fixed(x[b])
        cols = F.unfold(torch.from_numpy(xq.astype(np.float64))[None], 3)[0].numpy().astype(np.int64)  # exact
        expected = from_fixed(dense.reshape(6, -1) @ cols, frac + cb_frac).reshape(6, 5, 6)
        np.testing.assert_array_equal(out[b], expected)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 3, 1), (1, "same", 2), (3, 1, 2)])
def test_sparse_conv1d_matches_conv1d(stride, padding, dilation) -> None:
    from deepshrink.engine import SparseConv1d

    conv = nn.Conv1d(3, 5, 4, stride=stride, padding=padding, dilation=dilation)
    t = random_tensor(5, 12, 0.4, seed=stride).to_dense().reshape(5, 3, 4)
    x = torch.relu(torch.randn(2, 3, 17))
    layer = SparseConv1d.from_conv(conv, CompressedTensor.from_dense(t))
    torch.testing.assert_close(layer(x), F.conv1d(x, t, conv.bias, stride, padding, dilation), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="does not run on the engine"):
        torch.testing.assert_close(layer.weight, t)  # decoded on demand, for code that reads it


class _Mixed(nn.Module):
    """Layers the engine runs (Conv1d, Linear) beside ones it must leave dense."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 5, stride=2, padding=2)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.emb = nn.Embedding(10, 16)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).transpose(1, 2) + self.emb(tokens)[:, None]
        return self.head(self.gru(self.enc(h))[0].mean(1))


def test_compile_model_keeps_what_it_cannot_run_dense_and_says_so() -> None:
    from deepshrink.compress.prune import prune_
    from deepshrink.compress.quantize import share_weights_

    torch.manual_seed(0)
    net = _Mixed().eval()
    with pytest.warns(UserWarning):  # prune_ names the attention's in_proj_weight as unsupported
        prune_(net, 0.6)
        share_weights_(net)
    with pytest.warns(UserWarning) as caught:
        fast = compile_model(net)
    said = " ".join(str(w.message) for w in caught)
    for name in ("enc.self_attn.out_proj.weight", "enc.linear1.weight", "gru.weight_hh_l0"):
        assert f"{name} stays dense" in said
    assert [n for n, _ in engine_layers(fast)] == ["conv", "emb", "head"]
    assert not any(hasattr(m, "parametrizations") for m in fast.modules())  # what stays dense is decoded once
    x, tokens = torch.randn(3, 4, 31), torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(fast(x, tokens), net(x, tokens), rtol=1e-5, atol=1e-5)


def test_sparse_embedding_matches_the_decoded_table() -> None:
    from deepshrink.compress.prune import prune_
    from deepshrink.compress.quantize import share_weights_

    torch.manual_seed(1)
    net = nn.Sequential(nn.Embedding(50, 12, padding_idx=0)).eval()
    prune_(net, 0.5)
    share_weights_(net, bits=3)
    fast = compile_model(net)
    assert isinstance(fast[0], SparseEmbedding) and fast[0].codes.dtype == torch.uint8
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), net(ids), rtol=0, atol=0)
        for other in (ids.int(), ids.t(), ids[0, 0], ids[:0], torch.tensor([49, 0])):  # int32, strided, 0-d, empty
            torch.testing.assert_close(fast(other), net(other), rtol=0, atol=0)
    for bad in (torch.tensor([3, 50]), torch.tensor([-1, 2])):
        with pytest.raises(IndexError, match=r"index (50|-1) is out of range for 50 embeddings"):
            fast(bad)
    with pytest.raises(DeepShrinkError, match="takes int64 or int32 CPU indices, got torch.float32"):
        fast(ids.float())
    from deepshrink.engine import kernels, layers

    if layers._simd is not None:  # the C lookup is numba's (the fallback)
        expected = np.empty((ids.numel(), 12), np.float32)
        kernels.decode_rows(fast[0].codes.numpy(), fast[0].values.numpy(), ids.reshape(-1).numpy(), expected)
        np.testing.assert_array_equal(fast(ids).reshape(-1, 12).numpy(), expected)
        with pytest.raises(IndexError, match="index 50 is out of range for 50 rows"):  # checked in C too
            layers._simd.decode_rows(fast[0].codes.numpy(), np.zeros(256, np.float32), np.array([3, 50]),
                                     np.empty((2, 12), np.float32), 50, 12, 2)  # fmt: skip
    with pytest.raises(DeepShrinkError, match="at most 255 shared values"):
        SparseEmbedding(random_tensor(300, 2, 1.0, bits=9))


def test_compile_model_names_bad_tensors() -> None:
    net = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(DeepShrinkError, match="not a weight"):
        compile_model(net, {"1.weight": random_tensor(4, 3, 0.5)})
    with pytest.raises(DeepShrinkError, match="differs"):
        compile_model(net, {"0.weight": random_tensor(3, 3, 0.5)})
    with pytest.warns(UserWarning, match="no compressed weights"):
        compile_model(net, {})


# -- real models on real MNIST -------------------------------------------------


def compress_(model: nn.Module, sparsity: float) -> nn.Module:
    from deepshrink.compress.prune import prune_
    from deepshrink.compress.quantize import share_weights_

    prune_(model, sparsity)
    share_weights_(model)  # Deep Compression's defaults: 8 bits conv, 5 bits fc
    return model.eval()


@pytest.fixture(scope="module")
def lenet300(_trained_lenet300) -> nn.Module:
    import copy

    return compress_(copy.deepcopy(_trained_lenet300), 0.8)


@pytest.fixture(scope="module")
def lenet5(mnist_train) -> nn.Module:
    from deepshrink.compress.train import TrainConfig, fit
    from deepshrink.models import lenet_5

    torch.manual_seed(0)
    model = lenet_5()
    images, labels = mnist_train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small-model training: far faster on one thread of a busy machine
    try:
        fit(model, (images, labels), TrainConfig(lr=0.05, batch_size=64, max_steps=60, progress=False))
    finally:
        torch.set_num_threads(threads)
    return compress_(model, 0.88)


def logits(model: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


def assert_same_predictions(engine: nn.Module, decoded: nn.Module, images: torch.Tensor, batch: int) -> None:
    """Logits within fp32 rounding of the decoded model's, and the same predicted classes."""
    ours, theirs = logits(engine, images, batch), logits(decoded, images, len(images))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))


@pytest.mark.parametrize("batch", [1, 64])
def test_lenet300_on_engine_equals_decoded(lenet300: nn.Module, mnist_test, batch: int) -> None:
    engine = compile_model(lenet300)
    assert [n for n, _ in engine_layers(engine)] == ["fc1", "fc2", "fc3"]
    images = mnist_test[0][: 60 if batch == 1 else 2000]
    assert_same_predictions(engine, lenet300, images, batch)


@pytest.mark.parametrize("batch", [1, 64])
def test_lenet5_on_engine_equals_decoded(lenet5: nn.Module, mnist_test, batch: int) -> None:
    engine = compile_model(lenet5)
    assert [n for n, _ in engine_layers(engine)] == ["conv1", "conv2", "fc1", "fc2"]
    images = mnist_test[0][: 30 if batch == 1 else 256]
    assert_same_predictions(engine, lenet5, images, batch)


@pytest.mark.parametrize(
    ("arithmetic", "tolerance"),
    [
        ("fixed16", 0.003),  # EIE: 16 bits keep accuracy
        pytest.param("int8", 0.005, marks=pytest.mark.skipif(matrix._simd is None, reason="int8 runs on the SIMD "
                                                             "extension, not built here (pip install -e .)")),
    ],
)  # fmt: skip
def test_fixed_point_keeps_lenet300_accuracy(lenet300: nn.Module, mnist_test, arithmetic: str, tolerance: float):
    images, labels = mnist_test
    floating, fixed = (
        float((logits(compile_model(lenet300, arithmetic=a), images, 1000).argmax(1) == labels).float().mean())
        for a in ("float32", arithmetic)
    )
    assert floating > 0.9, floating
    assert abs(fixed - floating) <= tolerance, (floating, fixed)


def test_from_file_runs_the_saved_model(lenet300: nn.Module, mnist_test, tmp_path) -> None:
    from deepshrink.fileformat.model_io import save

    path = tmp_path / "lenet300.dsz"
    save(lenet300, path, factory="deepshrink.models:lenet_300_100")
    assert_same_predictions(from_file(path), lenet300, mnist_test[0][:500], 100)
    save(lenet300, path)  # no factory: the caller must bring the architecture
    with pytest.raises(DeepShrinkError, match="pass model="):
        from_file(path)
    from deepshrink.models import lenet_300_100

    assert_same_predictions(from_file(path, lenet_300_100()), lenet300, mnist_test[0][:500], 100)


def test_cli_run_and_bench(lenet300: nn.Module, mnist_test, tmp_path, capsys) -> None:
    from deepshrink.cli import main
    from deepshrink.fileformat.model_io import save

    path = tmp_path / "net.dsz"
    save(lenet300, path, factory="deepshrink.models:lenet_300_100")
    images = mnist_test[0][:40]
    np.save(tmp_path / "x.npy", images.numpy())
    assert main(["run", str(path), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")]) == 0
    torch.testing.assert_close(
        torch.from_numpy(np.load(tmp_path / "y.npy")), logits(lenet300, images, 40), rtol=1e-4, atol=1e-4
    )
    assert (
        main(["bench", str(path), "--input", str(tmp_path / "x.npy"), "--batch-sizes", "1", "8", "--repeats", "1"]) == 0
    )
    assert "speed-up" in capsys.readouterr().out
    assert main(["run", str(path)]) == 2  # neither --input nor --data: a named error, not a traceback
    run = ["run", str(path), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y8.npy")]
    assert main([*run, "--arithmetic", "int4"]) == 2
    assert "argument --arithmetic: invalid choice: 'int4'" in capsys.readouterr().err
    if matrix._simd is not None:
        assert main(["bench", str(path), "--input", str(tmp_path / "x.npy"), "--batch-sizes", "8", "--repeats", "1",
                     "--arithmetic", "int8"]) == 0  # fmt: skip
        assert "engine (int8)" in capsys.readouterr().out
        assert main([*run, "--arithmetic", "int8"]) == 0
        int8 = torch.from_numpy(np.load(tmp_path / "y8.npy"))
        assert (int8.argmax(1) == logits(lenet300, images, 40).argmax(1)).float().mean() >= 0.95
