"""Sparse LSTM inference from compressed gate matrices, one step at a time (ESE's data flow).

At every step ``t`` of every layer the four stacked gates come from two sparse
matrix-vector products, ``W_ih x_t + W_hh h_{t-1} + b``, computed by the
engine's kernels (:mod:`deepshrink.engine.kernels`) on the compressed layouts of
:class:`~deepshrink.engine.matrix.SparseMatrix`: relative indices and codebook
indices, values looked up in the codebook on the fly. The dense matrices are
never built. ``W_ih x_t`` does not depend on the recurrence, so it is computed for
all steps at once (the batched CSR kernel); ``W_hh h_{t-1}`` runs step by step on
the dense-activation batch-1 kernel (``h`` has no zeros to skip). Both run in one
compiled call per layer, so a step costs the product and the gate arithmetic,
not a Python round trip.

Gate order is PyTorch's ``(input, forget, cell, output)``; ``c_t = f * c_{t-1}
+ i * g`` and ``h_t = o * tanh(c_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from torch import nn

from deepshrink.compress.parametrization import Compression, compression_of
from deepshrink.engine import kernels
from deepshrink.engine.matrix import SparseMatrix
from deepshrink.errors import DeepShrinkError, UnsupportedLayerError
from deepshrink.tensor import CompressedTensor

# Eigen's rational approximation of tanh for float32 (Eigen/src/Core/MathFunctionsImpl.h,
# generic_fast_tanh_float): a 13/6-degree odd/even polynomial ratio on [-7.905, 7.905],
# outside which float32 tanh is +-1. Max abs error 2.4e-7 against float64 tanh, and much
# cheaper than numba's np.tanh here (no libm call, and a loop over it vectorises), which
# matters at 5 calls per unit per step. float32 constants keep the arithmetic in float32.
_TANH_CLAMP = np.float32(7.90531110763549805)
_TANH_P = tuple(np.float32(a) for a in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                                        5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                                        4.89352455891786e-03))  # fmt: skip
_TANH_Q = tuple(np.float32(b) for b in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                                        4.89352518554385e-03))  # fmt: skip
_HALF = np.float32(0.5)


# error_model="numpy": no ZeroDivisionError check on the division (q > 0 anyway), so loops vectorise
@njit(cache=True, fastmath=True, error_model="numpy")
def fast_tanh(v: float) -> float:
    """tanh to within 2.4e-7 (see the constants above); straight-line, so loops over it vectorise."""
    v = np.float32(v)
    v = v if v < _TANH_CLAMP else _TANH_CLAMP  # not min/max: their NaN handling is a branch
    v = v if v > -_TANH_CLAMP else -_TANH_CLAMP
    v2 = v * v
    p = _TANH_P[0]
    p = p * v2 + _TANH_P[1]
    p = p * v2 + _TANH_P[2]
    p = p * v2 + _TANH_P[3]
    p = p * v2 + _TANH_P[4]
    p = p * v2 + _TANH_P[5]
    p = p * v2 + _TANH_P[6]
    q = _TANH_Q[0]
    q = q * v2 + _TANH_Q[1]
    q = q * v2 + _TANH_Q[2]
    q = q * v2 + _TANH_Q[3]
    return v * p / q


@njit(cache=True, fastmath=True, error_model="numpy")
def fast_sigmoid(v: float) -> float:
    """The logistic function as ``(1 + tanh(v / 2)) / 2``."""
    return _HALF * fast_tanh(_HALF * v) + _HALF


@njit(cache=True, fastmath=True, error_model="numpy")
def lstm_layer_kernel(
    xt: np.ndarray,  # (input, T) float32: the sequence, step t in column t
    ih_ptr: np.ndarray,  # W_ih (4H x input) in the row-major layout (SparseMatrix.row_major): row offsets,
    ih_gaps: np.ndarray,  # relative column indices,
    ih_codes: np.ndarray,  # codebook indices,
    ih_codebook: np.ndarray,  # and the extended codebook (SparseMatrix.codebook)
    bias: np.ndarray,  # (4H,) float32: b_ih + b_hh
    hh_ptr: np.ndarray,  # W_hh (4H x H) in the sliced layout (SparseMatrix.sliced): slice offsets,
    hh_packed: np.ndarray,  # packed column and codebook indices,
    hh_rows: np.ndarray,  # each lane's row,
    hh_col_bits: int,  # and the column field's width
    hh_codebook: np.ndarray,  # (k,) float32 centroids
    use_table: bool,  # index a product table (SparseMatrix.use_table)
    h: np.ndarray,  # (H,) float32 initial hidden state, updated in place
    c: np.ndarray,  # (H,) float32 initial cell state, updated in place
    out: np.ndarray,  # (T, H) float32, receives h_t
) -> None:
    """Run one LSTM layer over a sequence.

    ``W_ih x_t`` does not depend on the recurrence: it is computed for every step
    at once, by the engine's batched kernel. Row ``i`` of ``W_hh`` is gate
    ``i // H``, unit ``i % H``. ``h_{t-1}`` is dense (no zero to skip), so each
    step runs the engine's dense-activation kernel
    (:func:`~deepshrink.engine.kernels.sliced_worker`): the product table of
    ``h_{t-1}`` and the codebook, then eight gate rows summed at a time.
    """
    n_hidden = h.shape[0]
    pre = np.zeros((4 * n_hidden, xt.shape[1]), dtype=np.float32)  # W_ih x_t in column t
    kernels.csr_matmul_serial(ih_ptr, ih_gaps, ih_codes, ih_codebook, xt, pre)
    gates = np.zeros(hh_rows.shape[0], dtype=np.float32)  # i, f, g, o, then the padding lanes' places
    values = kernels.slice_values(hh_codebook, h, hh_col_bits, use_table, gates[:1])
    # unsigned indices: no wrap-around checks, so the gate loops vectorise (and no signed
    # operand anywhere: int64 with uint64 would promote to float64)
    n, n2, n3, n4 = np.uint64(n_hidden), np.uint64(2 * n_hidden), np.uint64(3 * n_hidden), np.uint64(4 * n_hidden)
    for t in range(pre.shape[1]):
        for k in range(n4):  # a strided read: cheaper than transposing pre (the matmul kernel's layout)
            gates[k] = pre[k, t] + bias[k]
        kernels.fill_slice_values(hh_codebook, h, hh_col_bits, use_table, values)
        kernels.sliced_worker(hh_ptr, hh_packed, hh_rows, hh_col_bits, hh_codebook, values, use_table, 0, 1, gates)
        # Gate by gate over the flat (4H,) accumulator, then the state update.
        for k in range(n2):
            gates[k] = fast_sigmoid(gates[k])
        for k in range(n2, n3):
            gates[k] = fast_tanh(gates[k])
        for k in range(n3, n4):
            gates[k] = fast_sigmoid(gates[k])
        for j in range(n):
            c[j] = gates[n + j] * c[j] + gates[j] * gates[n2 + j]
            h[j] = gates[n3 + j] * fast_tanh(c[j])
        out[t] = h


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
    if not isinstance(comp, Compression):
        raise DeepShrinkError(
            f"LSTM weight {name} is not compressed; prune and weight-share it first "
            "(deepshrink.compress.prune_ / share_weights_) or use SparseLSTM.from_tensors"
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
    ) -> SparseLSTM:
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
    def from_module(cls, lstm: nn.LSTM) -> SparseLSTM:
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
        if x.shape[0] == 0:
            raise DeepShrinkError("an utterance needs at least one step; got an empty (0, features) input")
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
        return self._run(x)[0]

    def _run(self, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each layer's output sequence and final cell state."""
        seq = self._check_input(x)
        outputs, cells = [], []
        for layer in self.layers:
            h = np.zeros(layer.hidden_size, dtype=np.float32)
            c = np.zeros(layer.hidden_size, dtype=np.float32)
            out = np.empty((seq.shape[0], layer.hidden_size), dtype=np.float32)
            ih, hh = layer.weight_ih, layer.weight_hh
            lstm_layer_kernel(np.ascontiguousarray(seq.T), *ih.row_major(), ih.codebook, layer.bias, *hh.sliced(),
                              hh.centroids, hh.use_table, h, c, out)  # fmt: skip
            outputs.append(out)
            cells.append(c)
            seq = out
        return outputs, cells

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


class EngineLSTM(nn.Module):
    """Inference-only stand-in for an ``nn.LSTM``, computing on :class:`SparseLSTM`.

    Takes what the replaced LSTM took, ``(steps, features)`` unbatched or a batch
    (``batch_first`` as the original), zero initial state only, and returns
    ``(output, (h_n, c_n))`` like ``nn.LSTM``; each sequence of a batch runs at batch 1.

    Args:
        engine: the sparse LSTM.
        batch_first: as the replaced module's.

    Examples:
        >>> lstm = nn.LSTM(3, 4, batch_first=True)
        >>> with torch.no_grad():
        ...     for w in (lstm.weight_ih_l0, lstm.weight_hh_l0):
        ...         _ = w.copy_(torch.round(w * 4) / 4)
        >>> tensors = {n: CompressedTensor.from_dense(getattr(lstm, n)) for n in ("weight_ih_l0", "weight_hh_l0")}
        >>> fast = EngineLSTM(SparseLSTM.from_tensors(tensors, dict(lstm.named_parameters())), batch_first=True)
        >>> x = torch.randn(2, 5, 3)
        >>> bool(torch.allclose(fast(x)[0], lstm(x)[0], atol=1e-5))
        True
    """

    def __init__(self, engine: SparseLSTM, batch_first: bool = False) -> None:
        super().__init__()
        self.engine = engine
        self.batch_first = batch_first

    @classmethod
    def from_module(cls, lstm: nn.LSTM) -> EngineLSTM:
        """Replace a pruned and weight-shared ``nn.LSTM`` (see :meth:`SparseLSTM.from_module`)."""
        return cls(SparseLSTM.from_module(lstm), lstm.batch_first)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if state is not None:
            raise DeepShrinkError("EngineLSTM starts from zero state; pass no (h_0, c_0)")
        array = x.detach().cpu().to(torch.float32).numpy()
        if array.ndim == 2:  # unbatched (steps, features)
            outputs, cells = self.engine._run(array)
            h_n = np.stack([o[-1] for o in outputs])
            return torch.from_numpy(outputs[-1]), (torch.from_numpy(h_n), torch.from_numpy(np.stack(cells)))
        sequences = array if self.batch_first else array.transpose(1, 0, 2)  # (B, T, F)
        runs = [self.engine._run(seq) for seq in sequences]
        out = np.stack([outputs[-1] for outputs, _ in runs])  # (B, T, H)
        h_n = np.stack([np.stack([o[-1] for o in outputs]) for outputs, _ in runs], axis=1)  # (layers, B, H)
        c_n = np.stack([np.stack(cells) for _, cells in runs], axis=1)
        out = out if self.batch_first else out.transpose(1, 0, 2)
        return torch.from_numpy(np.ascontiguousarray(out)), (torch.from_numpy(h_n), torch.from_numpy(c_n))
