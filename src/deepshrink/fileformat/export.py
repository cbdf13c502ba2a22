"""Export of the decoded dense model to safetensors and ONNX, for runtimes that know neither.

Both exports write the weights the compressed model computes with (codebook
values at the kept positions, exact zeros elsewhere), so they are as accurate as
the ``.dsz`` file but dense-sized.
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings

import torch

from deepshrink.atomic import write_atomic
from deepshrink.compress.int8 import compute_in_float32_, computes_in_int8
from deepshrink.compress.parametrization import bake_
from deepshrink.errors import DeepShrinkError
from deepshrink.fileformat.codec import DszContents, check_dense


def dense_state_dict(source: torch.nn.Module | DszContents) -> dict[str, torch.Tensor]:
    """Plain state dict with every compressed weight decoded to a dense tensor.

    Args:
        source: a (possibly compressed) model, or a file's contents from
            :func:`deepshrink.read`.

    Returns:
        ``{name: tensor}`` without parametrization internals: ``fc1.weight``,
        not ``fc1.parametrizations.weight.original``.
    """
    if isinstance(source, DszContents):
        state = {name: ct.to_dense() for name, ct in source.tensors.items()}
        state.update(source.arrays)
        return state
    return {name: t.detach().cpu().contiguous() for name, t in _dense_copy(source).state_dict().items()}


def _dense_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every parametrization baked into a plain weight; ``model`` is untouched."""
    return bake_(copy.deepcopy(model))


def export_safetensors(source: torch.nn.Module | DszContents, path: str | os.PathLike) -> None:
    """Write :func:`dense_state_dict` as a safetensors file (atomically).

    Examples:
        >>> import tempfile, os
        >>> from safetensors.torch import load_file
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> export_safetensors(torch.nn.Linear(2, 3), path)
        >>> sorted(load_file(path))
        ['bias', 'weight']
    """
    from safetensors.torch import save

    write_atomic(path, save(dense_state_dict(source)))


def export_onnx(model: torch.nn.Module, example_input: torch.Tensor, path: str | os.PathLike, opset: int = 17) -> None:
    """Trace ``model`` with its decoded dense weights baked in and write ONNX (atomically).

    The model is not changed: a copy has its parametrizations removed
    (``leave_parametrized=True``) so the graph holds plain weights, which every
    ONNX runtime can run. Layers declared int8 (:mod:`deepshrink.compress.int8`) are
    exported computing in float32, with a warning.

    Args:
        model: a compressed (or plain) model.
        example_input: one batch of the model's input; the batch dimension is
            exported as dynamic.
        path: the ``.onnx`` file to write.
        opset: ONNX opset version.

    Raises:
        DeepShrinkError: the exporter cannot trace the model.
    """
    dense = _dense_copy(model).eval()
    if any(computes_in_int8(m) for m in dense.modules()):  # their hooks compute in NumPy, which no trace records
        warnings.warn("layers declared int8 are exported computing in float32 from their decoded weights: the "
                      "ONNX graph holds no int8 declaration", stacklevel=2)  # fmt: skip
        compute_in_float32_(dense)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter needs no onnxscript (not a dependency of ours); its deprecation
            # notice is noise for our users.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(dense, (example_input,), buffer, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})  # fmt: skip
    except Exception as err:  # the exporter raises many types; name the cause for the user
        raise DeepShrinkError(f"ONNX export of {type(model).__name__} failed: {err}") from err
    write_atomic(path, buffer.getvalue())


MAX_INPUT_ELEMENTS = 1 << 28  # the example input ONNX tracing runs: an input shape beyond this is a typo


def check_input_shape(shape: object) -> tuple[int, ...]:
    """Validate an ONNX example input shape: positive integers, not absurdly many elements.

    Raises:
        DeepShrinkError: naming the value.
    """
    if shape is None:
        raise DeepShrinkError("ONNX export needs an example input shape (--input-shape), e.g. 1,1,28,28")
    if (
        not isinstance(shape, tuple)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        or math.prod(shape) > MAX_INPUT_ELEMENTS
    ):
        raise DeepShrinkError(
            f"input shape {shape!r} must be positive integers such as 1,1,28,28 (at most {MAX_INPUT_ELEMENTS:,} "
            "elements); ONNX export needs one"
        )
    return shape


def export_file(
    path: str | os.PathLike,
    out: str | os.PathLike,
    input_shape: tuple[int, ...] | None = None,
    trust_factory: bool = False,
    max_elements: int | None = None,
) -> None:
    """Export a ``.dsz`` file to ``out``: ``.safetensors``, or ``.onnx`` (needs the file's model factory).

    Args:
        path, out: the file and the export.
        input_shape: ONNX: the example input's shape.
        trust_factory: ONNX: allow a factory outside ``deepshrink.models``.
        max_elements: the most elements the file may decode to, dense (both
            exports hold every tensor dense); see :func:`deepshrink.read`.

    Raises:
        DeepShrinkError: an unknown extension, ONNX without a valid ``input_shape``,
            or a file that names no (trusted) factory for ONNX.
        FileFormatError: the file is damaged or over the budget.
    """
    from deepshrink.fileformat.model_io import model_from_file, read

    suffix = os.path.splitext(str(out))[1].lower()
    if suffix not in (".safetensors", ".onnx"):
        raise DeepShrinkError(f"output {str(out)!r} must end in .safetensors or .onnx")
    if suffix == ".onnx":
        check_input_shape(input_shape)
    contents = read(path, max_elements=max_elements)
    if any(t.arithmetic == "int8" for t in contents.tensors.values()):
        warnings.warn(f"{os.fspath(path)} declares layers int8; {suffix} holds their decoded float32 weights only",
                      stacklevel=2)  # fmt: skip
    if suffix == ".safetensors":
        check_dense(contents, "export", max_elements)
        export_safetensors(contents, out)
    else:
        if contents.model is None:
            raise DeepShrinkError("ONNX export needs a file saved with a model factory")
        model = model_from_file(contents, trust_factory, max_elements=max_elements)
        export_onnx(model, torch.zeros(input_shape), out)
