"""Models to and from ``.dsz`` files: save, load, load_into, read, and the one factory trust policy.

A model's compressed weights (its :class:`~deepshrink.compress.parametrization.Compression`
parametrizations) are stored as :class:`CompressedTensor`, every other state-dict
entry as a plain array, by :mod:`deepshrink.fileformat.codec`; loading installs the
tensors back as weight sharing. A file may name the factory that builds its
architecture; :func:`build_model` decides whether it may be imported.
"""

from __future__ import annotations

import importlib
import os
import re

import numpy as np
import torch

from deepshrink.atomic import read_bytes, write_atomic
from deepshrink.errors import DeepShrinkError
from deepshrink.fileformat.codec import DszContents, EncodeOptions, decode_file, encode_file
from deepshrink.progress import quiet
from deepshrink.tensor import CompressedTensor

_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
SAFE_FACTORY_MODULE = "deepshrink.models"  # the only factories a file may name without trust_factory=True


def _parametrization_prefix(name: str) -> str:
    """State-dict prefix of the parametrization internals of parameter ``name``."""
    module, _, param = name.rpartition(".")
    return f"{module}.parametrizations.{param}." if module else f"parametrizations.{param}."


def split_model(model: torch.nn.Module) -> tuple[dict[str, CompressedTensor], dict[str, torch.Tensor]]:
    """A model's compressed weights, and the rest of its state dict (parametrization internals left out)."""
    from deepshrink.compress.quantize import compressed_tensors  # here, so `import deepshrink` loads no stage

    tensors = compressed_tensors(model)
    internal = tuple(_parametrization_prefix(n) for n in tensors)
    arrays = {k: v for k, v in model.state_dict().items() if not (internal and k.startswith(internal))}
    return tensors, arrays


def _check_factory(factory: str, kwargs: object) -> dict:
    if not isinstance(factory, str) or not _FACTORY.match(factory):
        raise DeepShrinkError(f"factory={factory!r} must look like 'package.module:function'")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise DeepShrinkError(f"factory kwargs {kwargs!r} must be a dict with string keys")
    return {"factory": factory, "kwargs": kwargs}


def save(
    obj: torch.nn.Module | dict[str, CompressedTensor | torch.Tensor | np.ndarray],
    path: str | os.PathLike,
    *,
    coder: str = "huffman",
    index_bits: int | dict[str, int] | None = None,
    layout: str = "auto",
    codebook_dtype: str = "float32",
    factory: str | None = None,
    factory_kwargs: dict | None = None,
    metadata: dict | None = None,
    progress: bool = True,
) -> int:
    """Write a compressed model (or a dict of tensors) to ``path``, atomically.

    Args:
        obj: a model (its deepshrink-compressed weights are stored compressed,
            every other state-dict entry as a plain array) or a dict of
            :class:`CompressedTensor` and plain tensors/arrays.
        path: destination; the old file survives an interrupted save.
        coder, index_bits, layout, codebook_dtype: see :class:`EncodeOptions`.
        factory: ``"module:function"`` that builds the architecture, e.g.
            ``"deepshrink.models:lenet_5"``, so :func:`load` can return a model.
        factory_kwargs: JSON keyword arguments for ``factory``.
        metadata: free JSON data kept in the header.
        progress: show progress bars while collecting and encoding (see :mod:`deepshrink.progress`).

    Returns:
        The file size in bytes.

    Raises:
        DeepShrinkError: a bad option (naming the allowed values), a dtype that
            cannot be stored, or data that is not JSON.

    Examples:
        >>> import tempfile, os
        >>> t = CompressedTensor.from_dense(torch.tensor([[0.0, 0.5], [0.5, -1.0]]))
        >>> path = os.path.join(tempfile.mkdtemp(), "t.dsz")
        >>> save({"w": t, "b": torch.ones(2)}, path) == os.path.getsize(path)
        True
        >>> load(path).tensors["w"].to_dense().tolist()
        [[0.0, 0.5], [0.5, -1.0]]
    """
    options = EncodeOptions(coder, index_bits, layout, codebook_dtype)
    spec = _check_factory(factory, factory_kwargs or {}) if factory is not None else None
    if isinstance(obj, torch.nn.Module):
        with quiet(not progress):
            tensors, arrays = split_model(obj)
    elif isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, CompressedTensor)}
        arrays = {k: v for k, v in obj.items() if not isinstance(v, CompressedTensor)}
    else:
        raise DeepShrinkError(f"save() takes an nn.Module or a dict of tensors, not {type(obj).__name__}")
    with quiet(not progress):
        data = encode_file(tensors, arrays, options, spec, metadata)
    write_atomic(path, data)
    return len(data)


def read(path: str | os.PathLike, progress: bool = True) -> DszContents:
    """Read and validate a file without building any model (never imports or runs anything).

    ``progress`` shows a progress bar while decoding (see :mod:`deepshrink.progress`).

    Raises:
        FileFormatError: the file is damaged, truncated or of another version.
        DeepShrinkError: it cannot be read at all.
    """
    with quiet(not progress):
        return decode_file(read_bytes(path))


def load_into(
    model: torch.nn.Module, source: str | os.PathLike | DszContents, progress: bool = True
) -> torch.nn.Module:
    """Make ``model`` compute with exactly the weights in ``source``: the way to rebuild your own architecture.

    Compressed tensors are installed as weight sharing
    (:func:`deepshrink.compress.quantize.load_compressed_`), the rest with ``load_state_dict``;
    ``progress`` shows progress bars while reading and installing.

    Returns:
        ``model``, changed in place.

    Raises:
        DeepShrinkError: a name in the file is not in the model, a shape differs,
            or the model has state the file does not hold.
    """
    from deepshrink.compress.quantize import load_compressed_

    contents = source if isinstance(source, DszContents) else read(source, progress)
    with quiet(not progress):
        load_compressed_(model, contents.tensors)
    internal = tuple(_parametrization_prefix(n) for n in contents.tensors)
    try:
        result = model.load_state_dict(contents.arrays, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise DeepShrinkError(f"the file does not fit {type(model).__name__}: {err}") from err
    missing = [k for k in result.missing_keys if not (internal and k.startswith(internal))]
    if missing or result.unexpected_keys:
        raise DeepShrinkError(f"the file does not fit {type(model).__name__}: missing {missing}, "
                              f"unexpected {result.unexpected_keys}")  # fmt: skip
    return model


def build_model(spec: dict, trust_factory: bool = False, *, source: str = "the file") -> torch.nn.Module:
    """Call the factory ``spec`` names (``{"factory": "module:function", "kwargs": {...}}``).

    The one trust policy for every model built from a name: a file's factory
    (:func:`load`, the engine, export), a recipe's model and the command line's.
    Importing a module runs its code, so unless ``trust_factory`` only the models
    of ``deepshrink.models`` (its ``__all__``) are built.

    Args:
        spec: the factory and its JSON keyword arguments.
        trust_factory: allow any importable factory; only for names you trust.
        source: who names the factory, for the error message (``"the recipe"``).

    Raises:
        DeepShrinkError: the factory is not trusted (naming how to opt in),
            malformed, cannot be imported, or rejects the kwargs.
    """
    spec = _check_factory(spec.get("factory"), spec.get("kwargs", {}))
    module_name, name = spec["factory"].split(":")
    if not trust_factory:
        if module_name != SAFE_FACTORY_MODULE:
            raise DeepShrinkError(f"{source} names factory {spec['factory']!r}; importing it runs its code, so only "
                                  f"{SAFE_FACTORY_MODULE} factories are built unless you pass trust_factory=True "
                                  "(--trust-factory), or pass model= your own instance")  # fmt: skip
        allowed = getattr(importlib.import_module(SAFE_FACTORY_MODULE), "__all__", [])
        if name not in allowed:
            raise DeepShrinkError(f"{name!r} is not one of {SAFE_FACTORY_MODULE}'s models: {', '.join(allowed)}")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise DeepShrinkError(f"cannot import factory {spec['factory']!r}: {err}") from err
    try:
        return factory(**spec["kwargs"])
    except TypeError as err:
        raise DeepShrinkError(f"factory {spec['factory']!r} rejects kwargs {spec['kwargs']}: {err}") from err


def load(
    path: str | os.PathLike, model: torch.nn.Module | None = None, *, trust_factory: bool = False, progress: bool = True
) -> torch.nn.Module | DszContents:
    """Load a file as a model when possible, else as tensors.

    Args:
        path: a file written by :func:`save`.
        model: your architecture, built by you; it is filled in place
            (:func:`load_into`) and returned.
        trust_factory: allow the file's factory to be imported even outside
            ``deepshrink.models``. Importing runs code: only for files you trust.
        progress: show progress bars while decoding and installing the weights.

    Returns:
        The model (given, or built by the file's factory), or the file's
        :class:`DszContents` when the file names no factory.

    Raises:
        FileFormatError: the file is damaged.
        DeepShrinkError: the model does not fit the file, or the factory is not trusted.
    """
    contents = read(path, progress)
    if model is not None:
        return load_into(model, contents, progress)
    if contents.model is None:
        return contents
    return load_into(build_model(contents.model, trust_factory), contents, progress)
