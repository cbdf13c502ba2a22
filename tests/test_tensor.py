import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepshrink import CompressedTensor, DeepShrinkError
from deepshrink.coding.relative import count_escapes, decode_relative, encode_relative


def _random_sparse(rng, shape, density, k=8):
    dense = np.zeros(int(np.prod(shape)), dtype=np.float32)
    keep = rng.random(dense.size) < density
    dense[keep] = rng.choice(np.linspace(-1, 1, k).astype(np.float32) + 0.01, keep.sum())
    return dense.reshape(shape)


@pytest.mark.parametrize("shape", [(5, 7), (1, 9), (9, 1), (4, 3, 2, 2), (0, 5), (3, 0)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_from_dense_round_trip_and_layouts(shape, density):
    dense = _random_sparse(np.random.default_rng(1), shape, density)
    t = CompressedTensor.from_dense(torch.from_numpy(dense))
    assert torch.equal(t.to_dense(), torch.from_numpy(dense))
    assert t.nnz == np.count_nonzero(dense)
    rows, cols = t.matrix_shape
    matrix = dense.reshape(rows, cols)
    col_ptr, row_idx, codes = t.to_csc()
    rebuilt = np.zeros_like(matrix)
    for j in range(cols):
        s = slice(col_ptr[j], col_ptr[j + 1])
        assert np.all(np.diff(row_idx[s]) > 0)  # increasing rows inside a column
        rebuilt[row_idx[s], j] = t.codebook[codes[s]]
    np.testing.assert_array_equal(rebuilt, matrix)
    row_ptr, col_idx, codes = t.to_csr()
    rebuilt[:] = 0
    for i in range(rows):
        s = slice(row_ptr[i], row_ptr[i + 1])
        rebuilt[i, col_idx[s]] = t.codebook[codes[s]]
    np.testing.assert_array_equal(rebuilt, matrix)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(positions=[0, 0], codes=[0, 0]), "strictly increasing"),
        (dict(positions=[0, 12], codes=[0, 0]), "inside"),
        (dict(positions=[0], codes=[0, 1]), "positions but"),
        (dict(positions=[1], codes=[2]), "outside the codebook"),
        (dict(bits=0), "bits=0"),
        (dict(bits=17), "bits=17"),
        (dict(codebook=[0.1, 0.2, 0.3], bits=1), "more than 2\\*\\*bits"),
    ],
)
def test_invalid_parts_raise_named_errors(kwargs, message):
    args = dict(shape=(3, 4), positions=[1, 5], codes=[0, 1], codebook=[0.5, -0.5], bits=2) | kwargs
    with pytest.raises(DeepShrinkError, match=message):
        CompressedTensor(**args)


def test_from_dense_rejects_unshared_tensor():
    with pytest.raises(DeepShrinkError, match="weight-share it first"):
        CompressedTensor.from_dense(torch.randn(300, 300))


def test_fixed_width_bits_counts_escapes():
    t = CompressedTensor((1, 40), [0, 39], [0, 1], [1.0, 2.0], 1)
    # gap 38 at 3-bit indices: 38 // 7 = 5 escapes, then the real gap
    assert t.fixed_width_bits(3) == {"index": (2 + 5) * 3, "codes": 2, "codebook": 64}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), unique=True, max_size=300), st.integers(1, 16))
def test_relative_round_trip(positions, bits):
    positions = np.array(sorted(positions), dtype=np.int64)
    stream = encode_relative(positions, bits)
    assert len(stream) == len(positions) + count_escapes(positions, bits)
    assert stream.max(initial=0) < 1 << bits
    np.testing.assert_array_equal(decode_relative(stream, bits), positions)


def test_relative_rejects_bad_input():
    with pytest.raises(DeepShrinkError, match="index_bits"):
        encode_relative(np.array([1]), 0)
    with pytest.raises(DeepShrinkError, match="strictly increasing"):
        encode_relative(np.array([3, 3]), 4)
    with pytest.raises(DeepShrinkError, match="does not fit"):
        decode_relative(np.array([16]), 4)


def test_a_tensor_kept_whole_stores_no_positions():
    """Every weight kept: positions 0 .. numel - 1 come from the shape, not from memory; the rest is unchanged."""
    import pickle

    rng = np.random.default_rng(0)
    whole = CompressedTensor((30, 40), np.arange(1200), rng.integers(0, 4, 1200), np.arange(4, dtype=np.float32), 2)
    assert whole.whole and whole.nnz == 1200 and whole._positions is None
    np.testing.assert_array_equal(whole.positions, np.arange(1200))
    assert whole.positions.dtype == np.int32
    assert whole.nbytes == whole.codes.nbytes + whole.codebook.nbytes  # no 4 bytes a weight of positions
    pruned = CompressedTensor(
        (30, 40), np.arange(0, 1200, 2), rng.integers(0, 4, 600), np.arange(4, dtype=np.float32), 2
    )
    assert not pruned.whole and pruned.nbytes == 600 * 4 + 600 + 16
    copy = pickle.loads(pickle.dumps(whole))
    assert copy.whole and torch.equal(copy.to_dense(), whole.to_dense())
    rows, cols = whole.rows_cols()
    assert rows[41] == 1 and cols[41] == 1
