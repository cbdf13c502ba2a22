"""Sparse LSTM inference from compressed gate matrices, one step at a time (ESE's data flow).

At every step ``t`` of every layer the four stacked gates come from two sparse
matrix-vector products, ``W_ih x_t + W_hh h_{t-1} + b``, computed by the
engine's batch-1 kernel (:func:`deepshrink.engine.kernels.csc_matvec`) on the
compressed layout of :class:`~deepshrink.engine.matrix.SparseMatrix`: relative
row indices and codebook indices, values looked up in the codebook on the fly,
zero activations skipped. The dense matrices are never built.

The whole sequence of one layer runs inside one compiled loop, so a step costs
the two products and the gate arithmetic, not a Python round trip: at batch 1
that overhead, not arithmetic, is what makes ``torch.nn.LSTM`` slow.

Gate order is PyTorch's ``(input, forget, cell, output)``; ``c_t = f * c_{t-1}
+ i * g`` and ``h_t = o * tanh(c_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from torch import nn

from deepshrink.engine import kernels
from deepshrink.engine.matrix import SparseMatrix
from deepshrink.errors import DeepShrinkError, UnsupportedLayerError
from deepshrink.targets import compression_of
from deepshrink.tensor import CompressedTensor


@njit(cache=True, fastmath=True)
def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + np.exp(-v))


@njit(cache=True, fastmath=True)
def lstm_layer_kernel(
    x: np.ndarray,  # (T, input) float32 input sequence
    ih_ptr: np.ndarray, ih_gaps: np.ndarray, ih_codes: np.ndarray, ih_codebook: np.ndarray,  # W_ih (4H x input)
    hh_ptr: np.ndarray, hh_gaps: np.ndarray, hh_codes: np.ndarray, hh_codebook: np.ndarray,  # W_hh (4H x H)
    bias: np.ndarray,  # (4H,) float32, b_ih + b_hh
    h: np.ndarray,  # (H,) float32 initial hidden state, updated in place
    c: np.ndarray,  # (H,) float32 initial cell state, updated in place
    out: np.ndarray,  # (T, H) float32, receives h_t
) -> None:
    """Run one LSTM layer over a sequence from single-worker CSC layouts.

    The matrices are laid out by ``SparseMatrix(tensor, workers=1)``, so the
    accumulator of :func:`~deepshrink.engine.kernels.csc_matvec` is ``(1, 4H)``
    and row ``i`` is gate ``i // H``, unit ``i % H``.
    """
    n_hidden = h.shape[0]
    gates = np.empty((1, 4 * n_hidden), dtype=np.float32)
    for t in range(x.shape[0]):
        gates[0, :] = bias
        kernels.csc_matvec(ih_ptr, ih_gaps, ih_codes, ih_codebook, x[t], gates)
        kernels.csc_matvec(hh_ptr, hh_gaps, hh_codes, hh_codebook, h, gates)
        for j in range(n_hidden):
            i_gate = _sigmoid(gates[0, j])
            f_gate = _sigmoid(gates[0, n_hidden + j])
            g_gate = np.tanh(gates[0, 2 * n_hidden + j])
            o_gate = _sigmoid(gates[0, 3 * n_hidden + j])
            c[j] = f_gate * c[j] + i_gate * g_gate
            h[j] = o_gate * np.tanh(c[j])
            out[t, j] = h[j]


@dataclass
class SparseLSTMLayer:
    """One layer's compressed gate matrices and summed bias."""

    weight_ih: SparseMatrix  # (4H, input)
    weight_hh: SparseMatrix  # (4H, H)
    bias: np.ndarray  # (4H,) float32

    @property
    def hidden_size(self) -> int:
        return self.weight_hh.shape[1]

    @property
    def input_size(self) -> int:
        return self.weight_ih.shape[1]


def _compressed_weight(lstm: nn.LSTM, name: str) -> CompressedTensor:
    comp = compression_of(lstm, name)
    if comp is None or not hasattr(comp, "to_compressed"):
        raise DeepShrinkError(
            f"LSTM weight {name} is not compressed; prune and weight-share it first "
            "(deepshrink.prune_ / share_weights_) or use SparseLSTM.from_tensors"
        )
    return comp.to_compressed(getattr(lstm, name).detach())


class SparseLSTM:
    """A (stacked, unidirectional) LSTM that computes from :class:`CompressedTensor` gate matrices.

    Args:
        layers: one :class:`SparseLSTMLayer` per stacked layer.

    Raises:
        DeepShrinkError: layers whose sizes do not chain.

    Examples:
        >>> lstm = nn.LSTM(3, 4)
        >>> with torch.no_grad():
        ...     for w in (lstm.weight_ih_l0, lstm.weight_hh_l0):
        ...         _ = w.copy_(torch.round(w * 4) / 4)  # few distinct values: losslessly compressible
        >>> tensors = {n: CompressedTensor.from_dense(getattr(lstm, n)) for n in ("weight_ih_l0", "weight_hh_l0")}
        >>> engine = SparseLSTM.from_tensors(tensors, {n: p for n, p in lstm.named_parameters() if "bias" in n})
        >>> x = torch.randn(5, 3)
        >>> out, _ = engine.forward(x.numpy())
        >>> bool(np.allclose(out, lstm(x)[0].detach().numpy(), atol=1e-5))
        True
    """

    def __init__(self, layers: list[SparseLSTMLayer]) -> None:
        if not layers:
            raise DeepShrinkError("a SparseLSTM needs at least one layer")
        for k, layer in enumerate(layers):
            h = layer.hidden_size
            if layer.weight_ih.shape[0] != 4 * h or layer.weight_hh.shape[0] != 4 * h or layer.bias.shape != (4 * h,):
                raise DeepShrinkError(f"layer {k}: gate matrices and bias must have 4 * hidden = {4 * h} rows")
            if k and layer.input_size != layers[k - 1].hidden_size:
                raise DeepShrinkError(
                    f"layer {k} takes {layer.input_size} inputs but layer {k - 1} has {layers[k - 1].hidden_size} units"
                )
        self.layers = layers

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, CompressedTensor], biases: dict[str, torch.Tensor | np.ndarray] | None = None
    ) -> "SparseLSTM":
        """Build from PyTorch-named tensors: ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``.

        Names may carry a module prefix (``"lstm.weight_ih_l0"``); missing biases count as zero.

        Raises:
            DeepShrinkError: no ``weight_ih_l0``, or a layer without both matrices.
        """
        def strip(d: dict) -> dict:
            return {k.rsplit(".", 1)[-1]: v for k, v in d.items()}

        weights, bias_parts = strip(tensors), strip(biases or {})
        layers = []
        k = 0
        while f"weight_ih_l{k}" in weights:
            if f"weight_hh_l{k}" not in weights:
                raise DeepShrinkError(f"layer {k} has weight_ih_l{k} but no weight_hh_l{k}")
            ih, hh = weights[f"weight_ih_l{k}"], weights[f"weight_hh_l{k}"]
            bias = np.zeros(ih.shape[0], dtype=np.float32)
            for part in (f"bias_ih_l{k}", f"bias_hh_l{k}"):
                if part in bias_parts:
                    bias += torch.as_tensor(bias_parts[part]).detach().cpu().float().numpy()
            layers.append(SparseLSTMLayer(SparseMatrix(ih, workers=1), SparseMatrix(hh, workers=1), bias))
            k += 1
        if not layers:
            raise DeepShrinkError(f"no weight_ih_l0 among {sorted(weights)}; expected nn.LSTM parameter names")
        return cls(layers)

    @classmethod
    def from_module(cls, lstm: nn.LSTM) -> "SparseLSTM":
        """Build from a pruned and weight-shared ``nn.LSTM`` (its parametrizations give the tensors).

        Raises:
            UnsupportedLayerError: a bidirectional LSTM or one with ``proj_size``.
            DeepShrinkError: a gate matrix that is not compressed.
        """
        if not isinstance(lstm, nn.LSTM):
            raise UnsupportedLayerError(f"SparseLSTM.from_module takes an nn.LSTM, not {type(lstm).__name__}")
        if lstm.bidirectional or lstm.proj_size:
            raise UnsupportedLayerError("SparseLSTM supports unidirectional LSTMs without proj_size")
        tensors = {}
        for k in range(lstm.num_layers):
            for name in (f"weight_ih_l{k}", f"weight_hh_l{k}"):
                tensors[name] = _compressed_weight(lstm, name)
        biases = {n: p for n, p in lstm.named_parameters() if n.startswith("bias_")}
        return cls.from_tensors(tensors, biases)

    @property
    def hidden_size(self) -> int:
        return self.layers[-1].hidden_size

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        width = self.layers[0].input_size
        if x.ndim != 2 or x.shape[1] != width:
            raise DeepShrinkError(f"input of shape {x.shape} must be (steps, {width}): one utterance, batch 1")
        if x.dtype != np.float32:
            raise DeepShrinkError(f"input dtype {x.dtype} is not supported; the engine takes float32")
        return np.ascontiguousarray(x)

    def run_layers(self, x: np.ndarray) -> list[np.ndarray]:
        """Every layer's output sequence for one utterance from zero state.

        Args:
            x: ``(steps, input_size)`` float32.

        Returns:
            One ``(steps, hidden)`` float32 array per layer.

        Raises:
            DeepShrinkError: a wrong shape or dtype.
        """
        seq = self._check_input(x)
        outputs = []
        for layer in self.layers:
            h = np.zeros(layer.hidden_size, dtype=np.float32)
            c = np.zeros(layer.hidden_size, dtype=np.float32)
            out = np.empty((seq.shape[0], layer.hidden_size), dtype=np.float32)
            ih, hh = layer.weight_ih, layer.weight_hh
            lstm_layer_kernel(seq, ih.col_ptr, ih.col_gaps, ih.col_codes, ih.codebook,
                              hh.col_ptr, hh.col_gaps, hh.col_codes, hh.codebook, layer.bias, h, c, out)
            outputs.append(out)
            seq = out
        return outputs

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The last layer's output sequence and the final hidden state of each layer.

        Args:
            x: ``(steps, input_size)`` float32, one utterance.

        Returns:
            ``(outputs (steps, hidden), h_n (layers, hidden))``, as ``nn.LSTM``
            returns them for an unbatched input (``c_n`` is not returned).

        Raises:
            DeepShrinkError: a wrong shape or dtype.
        """
        outputs = self.run_layers(x)
        return outputs[-1], np.stack([o[-1] for o in outputs])

    def activations(self, x: np.ndarray, prefix: str = "") -> dict[str, np.ndarray]:
        """The input vectors each gate matrix multiplies, for the hardware simulator.

        ``weight_ih_l{k}`` sees the layer's input ``x_t``; ``weight_hh_l{k}``
        sees ``h_{t-1}`` (zero at ``t = 0``, so its first step does no work).

        Returns:
            ``{prefix + name: (steps, cols) float32}``, ready for
            :func:`deepshrink.hardware.simulate_network`.
        """
        seq = self._check_input(x)
        acts = {}
        for k, out in enumerate(self.run_layers(seq)):
            acts[f"{prefix}weight_ih_l{k}"] = seq
            acts[f"{prefix}weight_hh_l{k}"] = np.vstack([np.zeros((1, out.shape[1]), dtype=np.float32), out[:-1]])
            seq = out
        return acts

    def __repr__(self) -> str:
        sizes = ", ".join(f"{layer.input_size}->{layer.hidden_size}" for layer in self.layers)
        nnz = sum(layer.weight_ih.tensor.nnz + layer.weight_hh.tensor.nnz for layer in self.layers)
        return f"SparseLSTM({sizes}, nnz={nnz})"
