"""Sparse LSTM engine against torch.nn.LSTM on the decoded weights, its kernel against NumPy, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import compressed_tensors, share_weights_
from deepshrink.engine.lstm import EngineLSTM, SparseLSTM, fast_sigmoid, fast_tanh, lstm_layer_kernel
from deepshrink.engine.matrix import SparseMatrix
from deepshrink.errors import DeepShrinkError, UnsupportedLayerError
from deepshrink.fileformat.model_io import load, save
from deepshrink.models import LSTMClassifier, lstm_classifier
from deepshrink.tensor import CompressedTensor


def compressed_lstm(input_size: int, hidden: int, layers: int, sparsity: float, seed: int = 0) -> nn.LSTM:
    torch.manual_seed(seed)
    lstm = nn.LSTM(input_size, hidden, layers)
    prune_(lstm, sparsity)
    share_weights_(lstm, bits=4)
    return lstm.eval()


def reference_layer(x: np.ndarray, w_ih: np.ndarray, w_hh: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The LSTM equations in float64 NumPy, one step at a time."""
    hidden = w_hh.shape[1]
    h, c = np.zeros(hidden), np.zeros(hidden)
    out = []
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for x_t in x.astype(np.float64):
        g = w_ih @ x_t + w_hh @ h + bias
        i, f, gg, o = (
            sig(g[:hidden]),
            sig(g[hidden : 2 * hidden]),
            np.tanh(g[2 * hidden : 3 * hidden]),
            sig(g[3 * hidden :]),
        )
        c = f * c + i * gg
        h = o * np.tanh(c)
        out.append(h)
    return np.array(out).reshape(len(x), hidden)


@pytest.mark.parametrize(
    "input_size, hidden, layers, sparsity, steps",
    [
        (13, 32, 1, 0.9, 20),
        (7, 24, 2, 0.7, 9),
        (5, 8, 1, 0.0, 3),
        (40, 256, 1, 0.95, 5),
    ],
)
def test_engine_matches_torch_on_decoded_weights(
    input_size: int, hidden: int, layers: int, sparsity: float, steps: int
) -> None:
    lstm = compressed_lstm(input_size, hidden, layers, sparsity)
    engine = SparseLSTM.from_module(lstm)
    x = torch.randn(steps, input_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, (h_n, _) = lstm(x)
    out, h_last = engine.forward(x.numpy())
    np.testing.assert_allclose(out, expected.numpy(), atol=2e-5)
    np.testing.assert_allclose(h_last, h_n.numpy(), atol=2e-5)


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("use_table", [True, False], ids=["table", "gather"])
def test_layer_kernel_against_numpy_reference(density: float, use_table: bool) -> None:
    rng = np.random.default_rng(int(density * 10))
    hidden, inputs, steps = 6, 4, 7
    codebook = rng.standard_normal(16).astype(np.float32)

    def tensor(rows: int, cols: int) -> CompressedTensor:
        positions = np.flatnonzero(rng.random(rows * cols) < density)
        return CompressedTensor((rows, cols), positions, rng.integers(0, 16, len(positions)), codebook, 4)

    w_ih, w_hh = tensor(4 * hidden, inputs), tensor(4 * hidden, hidden)
    bias = rng.standard_normal(4 * hidden).astype(np.float32)
    x = rng.standard_normal((steps, inputs)).astype(np.float32)
    ih, hh = SparseMatrix(w_ih, workers=1), SparseMatrix(w_hh, workers=1)
    h, c = np.zeros(hidden, np.float32), np.zeros(hidden, np.float32)
    out = np.empty((steps, hidden), np.float32)
    lstm_layer_kernel(np.ascontiguousarray(x.T), *ih.row_major(), ih.codebook, bias, *hh.sliced(), hh.centroids,
                      use_table, h, c, out)  # fmt: skip
    expected = reference_layer(x, w_ih.to_dense().numpy(), w_hh.to_dense().numpy(), bias)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_array_equal(h, out[-1])


def test_empty_sequence_and_all_zero_weights() -> None:
    zeros = {
        "weight_ih_l0": CompressedTensor.from_dense(torch.zeros(8, 3)),
        "weight_hh_l0": CompressedTensor.from_dense(torch.zeros(8, 2)),
    }
    engine = SparseLSTM.from_tensors(zeros, {"bias_ih_l0": torch.ones(8)})
    out, h_n = engine.forward(np.ones((4, 3), np.float32))
    # gates = bias = 1: c_t = s(1) c_{t-1} + s(1) tanh(1), h_t = s(1) tanh(c_t)
    c, expected = 0.0, []
    s = 1 / (1 + np.exp(-1.0))
    for _ in range(4):
        c = s * c + s * np.tanh(1.0)
        expected.append(s * np.tanh(c))
    np.testing.assert_allclose(out[:, 0], expected, atol=1e-6)
    with pytest.raises(DeepShrinkError, match="at least one step"):
        engine.forward(np.zeros((0, 3), np.float32))


def test_fast_activations_against_numpy() -> None:
    v = np.linspace(-30, 30, 20001)
    assert np.abs(np.array([fast_tanh(a) for a in v]) - np.tanh(v)).max() < 5e-7
    assert np.abs(np.array([fast_sigmoid(a) for a in v]) - 1 / (1 + np.exp(-v))).max() < 5e-7


def test_activations_feed_the_simulator_what_each_matrix_sees() -> None:
    lstm = compressed_lstm(5, 8, 2, 0.5)
    engine = SparseLSTM.from_module(lstm)
    x = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    acts = engine.activations(x, prefix="lstm.")
    layer_outputs = engine.run_layers(x)
    assert list(acts) == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1"]
    np.testing.assert_array_equal(acts["lstm.weight_ih_l0"], x)
    np.testing.assert_array_equal(acts["lstm.weight_ih_l1"], layer_outputs[0])
    assert not acts["lstm.weight_hh_l1"][0].any()  # h_{-1} = 0
    np.testing.assert_array_equal(acts["lstm.weight_hh_l1"][1:], layer_outputs[1][:-1])


def test_classifier_file_round_trip_runs_on_the_engine(tmp_path) -> None:
    torch.manual_seed(0)
    model = lstm_classifier(n_features=6, hidden=16)
    prune_(model, 0.8)
    share_weights_(model, bits=4)
    model.eval()
    path = tmp_path / "lstm.dsz"
    save(model, path, factory="deepshrink.models:lstm_classifier", factory_kwargs={"n_features": 6, "hidden": 16})
    loaded = load(path).eval()
    assert isinstance(loaded, LSTMClassifier)
    x = torch.randn(3, 10, 6)
    engine = SparseLSTM.from_module(loaded.lstm)
    head = SparseMatrix(compressed_tensors(loaded)["fc.weight"], workers=1)
    logits = np.stack([head.matvec(engine.forward(u)[1][-1]) + loaded.fc.bias.detach().numpy() for u in x.numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=2e-5)


def test_errors() -> None:
    with pytest.raises(DeepShrinkError, match="not compressed; prune and weight-share it first"):
        SparseLSTM.from_module(nn.LSTM(3, 4))
    with pytest.raises(UnsupportedLayerError, match="unidirectional"):
        SparseLSTM.from_module(nn.LSTM(3, 4, bidirectional=True))
    with pytest.raises(UnsupportedLayerError, match="takes an nn.LSTM, not GRU"):
        SparseLSTM.from_module(nn.GRU(3, 4))
    with pytest.raises(DeepShrinkError, match="no weight_ih_l0"):
        SparseLSTM.from_tensors({"fc.weight": CompressedTensor.from_dense(torch.eye(2))})
    with pytest.raises(DeepShrinkError, match="4 \\* hidden"):
        SparseLSTM.from_tensors(
            {
                "weight_ih_l0": CompressedTensor.from_dense(torch.eye(6)),
                "weight_hh_l0": CompressedTensor.from_dense(torch.eye(6)),
            }
        )
    engine = SparseLSTM.from_module(compressed_lstm(3, 4, 1, 0.5))
    with pytest.raises(DeepShrinkError, match=r"must be \(steps, 3\)"):
        engine.forward(np.zeros((2, 5), np.float32))
    with pytest.raises(DeepShrinkError, match="dtype float64 is not supported"):
        engine.forward(np.zeros((2, 3)))
    with pytest.raises(DeepShrinkError, match="hidden=0 must be a positive integer"):
        LSTMClassifier(hidden=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_engine_module_replaces_nn_lstm(batch_first: bool) -> None:
    torch.manual_seed(1)
    lstm = nn.LSTM(6, 12, num_layers=2, batch_first=batch_first)
    prune_(lstm, 0.8)
    share_weights_(lstm, bits=4)
    fast = EngineLSTM.from_module(lstm)
    x = torch.randn(3, 7, 6)
    with torch.no_grad():
        expected, (h_n, c_n) = lstm(x)
        out, (h, c) = fast(x)
        np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=2e-5)
        np.testing.assert_allclose(h.numpy(), h_n.numpy(), atol=2e-5)
        np.testing.assert_allclose(c.numpy(), c_n.numpy(), atol=2e-5)
        single, (h1, _) = fast(x[0] if batch_first else x[:, 0])  # unbatched input
        np.testing.assert_allclose(single.numpy(), (expected[0] if batch_first else expected[:, 0]).numpy(), atol=2e-5)
    with pytest.raises(DeepShrinkError, match="zero state"):
        fast(x, (h_n, c_n))


class _Classifier(nn.Module):
    def __init__(self, bidirectional: bool = False) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(16 if bidirectional else 8, 3)

    def forward(self, x):
        seq, _ = self.lstm(x)
        return self.out(seq[:, -1])


def test_compile_model_runs_compressed_lstms_on_the_engine():
    from deepshrink.engine import compile_model

    torch.manual_seed(0)
    model = _Classifier()
    prune_(model, 0.7)
    share_weights_(model, bits=4)
    fast = compile_model(model)
    assert isinstance(fast.lstm, EngineLSTM)
    x = torch.randn(3, 5, 6)
    torch.testing.assert_close(fast(x), model(x).detach(), atol=1e-5, rtol=1e-5)

    bidirectional = _Classifier(bidirectional=True)
    prune_(bidirectional, 0.7)
    share_weights_(bidirectional, bits=4)
    with pytest.warns(UserWarning, match="lstm stays dense: bidirectional"):
        assert isinstance(compile_model(bidirectional).lstm, nn.LSTM)
