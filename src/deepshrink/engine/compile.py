"""Turn a compressed model (in memory or in a file) into one that runs on the engine.

Every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Embedding`` whose weight is
compressed is swapped for :class:`~deepshrink.engine.layers.SparseLinear` /
:class:`~deepshrink.engine.layers.SparseConv1d` /
:class:`~deepshrink.engine.layers.SparseConv2d` /
:class:`~deepshrink.engine.layers.SparseEmbedding`, and every unidirectional ``nn.LSTM``
whose gate matrices are all compressed for :class:`~deepshrink.engine.lstm.EngineLSTM`
(fp32 only); every other module keeps computing as before, with its weights decoded
once, and a warning names each compressed one that does.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.compress.int8 import check_int8_layer
from deepshrink.compress.parametrization import bake_
from deepshrink.engine.layers import SparseConv1d, SparseConv2d, SparseEmbedding, SparseLinear
from deepshrink.engine.matrix import check_arithmetic
from deepshrink.errors import DeepShrinkError, UnsupportedLayerError
from deepshrink.tensor import CompressedTensor

#: PyTorch modules whose forward reads their child layers' ``weight`` (attention's
#: out_proj; the transformer layers' fused fast path): their children stay dense.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _replacement(module: nn.Module, name: str, weight: CompressedTensor, **options: object) -> nn.Module | None:
    """The engine module for ``module`` with ``weight``, or ``None`` when there is none."""
    if _shape(module, "weight") != weight.shape:
        raise DeepShrinkError(f"{name}.weight: compressed shape {weight.shape} differs from the model's "
                              f"{_shape(module, 'weight')}")  # fmt: skip
    if isinstance(module, nn.Linear):
        return SparseLinear(weight, module.bias, **options)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or len(weight.codebook) >= 256:
            reason = "max_norm renormalises the table" if module.max_norm is not None else "over 255 shared values"
            warnings.warn(f"{name} stays dense: {reason}", stacklevel=3)
            return None
        return SparseEmbedding(weight)
    kind = SparseConv1d if isinstance(module, nn.Conv1d) else SparseConv2d if isinstance(module, nn.Conv2d) else None
    if kind is None:
        layer = parametrize.type_before_parametrizations(module).__name__
        warnings.warn(f"{name} stays dense: the engine has no kernel for {layer}", stacklevel=3)
        return None
    try:
        return kind.from_conv(module, weight, **options)
    except UnsupportedLayerError as err:
        warnings.warn(f"{name} stays dense: {err}", stacklevel=3)
    return None


def _shape(module: nn.Module, param: str) -> tuple[int, ...] | None:
    """The shape of ``module.<param>``, None if it has no such tensor, without computing a parametrized one.

    A compression parametrization decodes the whole weight at each access: for a
    30k-word embedding table a third of a second, only to read a shape.
    """
    if parametrize.is_parametrized(module, param):
        return tuple(getattr(module.parametrizations, param).original.shape)
    tensor = getattr(module, param, None)
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None


def _lstm_replacement(
    module: nn.LSTM, name: str, tensors: dict[str, CompressedTensor], arithmetic: str
) -> nn.Module | None:
    """An :class:`EngineLSTM` for ``module`` from its compressed gate matrices, or ``None`` (with a warning)."""
    from deepshrink.engine.lstm import EngineLSTM, SparseLSTM

    own = {k.rpartition(".")[2]: t for k, t in tensors.items() if k.rpartition(".")[0] == name}
    needed = [f"weight_{kind}_l{k}" for k in range(module.num_layers) for kind in ("ih", "hh")]
    reason = (
        "the engine's LSTM runs in float32 only"
        if arithmetic != "float32"
        else "bidirectional or proj_size LSTMs have no engine kernel"
        if module.bidirectional or module.proj_size
        else "not every gate matrix is compressed"
        if not all(n in own for n in needed)
        else None
    )
    if reason is not None:
        warnings.warn(f"{name} stays dense: {reason}", stacklevel=3)
        return None
    biases = {n: p for n, p in module.named_parameters() if n.startswith("bias_")}
    return EngineLSTM(SparseLSTM.from_tensors(own, biases), module.batch_first)


def compile_model(
    model: nn.Module,
    tensors: dict[str, CompressedTensor] | None = None,
    *,
    workers: int | None = None,
    arithmetic: str | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose compressed Linear and Conv2d layers run on the engine.

    Args:
        model: a model compressed by deepshrink (or any model, with ``tensors``).
        tensors: compressed weights by parameter name (``"fc1.weight"``); default
            :func:`deepshrink.compress.quantize.compressed_tensors` of ``model``.
        workers: rows interleaved over this many workers (default: numba's threads).
        arithmetic: ``None`` (default): each tensor's own, ``"float32"`` unless declared
            ``"int8"`` (:mod:`deepshrink.compress.int8`: then the decoded model's outputs,
            bit for bit); or for every layer ``"float32"`` (the decoded weights' products up
            to float rounding), ``"fixed16"`` (EIE's 16-bit fixed point) or ``"int8"`` (every
            token's activations and each codebook rounded to int8, VNNI products: the
            speed of dense int8, fidelity measured in docs/results/peers.md); see
            :class:`~deepshrink.engine.matrix.SparseMatrix`.
        inplace: swap the modules in ``model`` itself instead of a deep copy.

    Returns:
        The model, in eval mode, for inference only.

    Raises:
        DeepShrinkError: a name in ``tensors`` is not a weight of ``model``, a
            shape differs, ``arithmetic`` is unknown or cannot run here, or a tensor
            declared int8 is not an ``nn.Linear``'s.

    Examples:
        >>> w = CompressedTensor.from_dense(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
        >>> fast = compile_model(nn.Sequential(nn.Linear(2, 2)), {"0.weight": w})
        >>> type(fast[0]).__name__
        'SparseLinear'
    """
    if arithmetic is not None:
        check_arithmetic(arithmetic)
    if tensors is None:
        from deepshrink.compress.quantize import compressed_tensors

        tensors = compressed_tensors(model)
    if not tensors:
        warnings.warn("the model has no compressed weights: nothing runs on the engine", stacklevel=2)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    lstms_done: set[str] = set()
    for name, weight in tensors.items():
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        if module is None or _shape(module, param) is None:
            raise DeepShrinkError(f"{name!r} is not a weight of {type(model).__name__}")
        if weight.arithmetic == "int8":
            check_int8_layer(name, module, param)
        own = weight.arithmetic if arithmetic is None else arithmetic
        if isinstance(module, nn.LSTM):
            done = module_name in lstms_done
            replacement = None if done else _lstm_replacement(module, module_name, tensors, own)
            lstms_done.add(module_name)
        elif param != "weight":  # a recurrent layer's weight_hh_l0, attention's in_proj_weight, ...
            layer = parametrize.type_before_parametrizations(module).__name__
            warnings.warn(f"{name} stays dense: the engine has no kernel for {layer}.{param}", stacklevel=2)
            continue
        elif isinstance(parent := modules.get(module_name.rpartition(".")[0]), _READS_CHILD_WEIGHTS):
            warnings.warn(f"{name} stays dense: {type(parent).__name__} reads it directly instead of calling "
                          "the layer", stacklevel=2)  # fmt: skip
            continue
        else:
            replacement = _replacement(module, name, weight, workers=workers, arithmetic=own)
        if replacement is None:
            continue
        if not module_name:  # the model is itself the layer
            return replacement.eval()
        target.set_submodule(module_name, replacement)
    # what stays dense computes from its weights decoded once: a compression parametrization recomputes
    # its weight at every access (a 30k-word embedding table: a third of a second per forward)
    bake_(target)
    return target.eval()


def from_file(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    trust_factory: bool = False,
    workers: int | None = None,
    arithmetic: str | None = None,
) -> nn.Module:
    """Build an engine model from a file written by :func:`deepshrink.save`.

    Args:
        path: the compressed-model file.
        model: your architecture, when the file names no factory (filled in place).
        trust_factory: allow a factory outside ``deepshrink.models`` (runs code).
        workers, arithmetic: as in :func:`compile_model`.

    Returns:
        The model with its compressed Linear / Conv2d layers on the engine.

    Raises:
        FileFormatError: the file is damaged, or does not fit the model its factory builds.
        DeepShrinkError: the file names no model and ``model`` is not given, or
            your model does not fit the file.
    """
    from deepshrink.fileformat.model_io import load_into, model_from_file, read

    contents = read(path)
    if model is not None:
        load_into(model, contents)
    elif contents.model is None:
        raise DeepShrinkError(f"{os.fspath(path)} names no model factory; pass model= your architecture")
    else:
        model = model_from_file(contents, trust_factory)
    return compile_model(model, contents.tensors, workers=workers, arithmetic=arithmetic, inplace=True)


def engine_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that run on the engine."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d, SparseEmbedding))]
