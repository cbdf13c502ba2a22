"""Models to and from ``.dsz`` files: save, load, load_into, read, and the one factory trust policy.

A model's compressed weights (its :class:`~deepshrink.compress.parametrization.Compression`
parametrizations) are stored as :class:`CompressedTensor`, every other state-dict
entry as a plain array, by :mod:`deepshrink.fileformat.codec`; loading installs the
tensors back as weight sharing. A file may name the factory that builds its
architecture; :func:`build_model` decides whether it may be imported.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import typing
from collections.abc import Callable

import numpy as np
import torch

from deepshrink.atomic import read_bytes, write_atomic
from deepshrink.errors import DeepShrinkError, FileFormatError
from deepshrink.fileformat.codec import (
    DszContents,
    EncodeOptions,
    check_dense,
    decode_file,
    encode_file,
    show_value,
)
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
    array_dtype: str = "float32",
    factory: str | None = None,
    factory_kwargs: dict | None = None,
    metadata: dict | None = None,
    allow_nonfinite: bool = False,
    progress: bool = True,
) -> int:
    """Write a compressed model (or a dict of tensors) to ``path``, atomically.

    Args:
        obj: a model (its deepshrink-compressed weights are stored compressed,
            every other state-dict entry as a plain array) or a dict of
            :class:`CompressedTensor` and plain tensors/arrays.
        path: destination; the old file survives an interrupted save.
        coder, index_bits, layout, codebook_dtype, array_dtype: see :class:`EncodeOptions`
            (``array_dtype="float16"`` halves the plain arrays: biases, normalisation layers).
        factory: ``"module:function"`` that builds the architecture, e.g.
            ``"deepshrink.models:lenet_5"``, so :func:`load` can return a model.
        factory_kwargs: JSON keyword arguments for ``factory``.
        metadata: free JSON data kept in the header.
        allow_nonfinite: store NaN and infinity (refused by default: a model
            holding them is broken, and readers refuse them unless told).
        progress: show progress bars while collecting and encoding (see :mod:`deepshrink.progress`).

    Returns:
        The file size in bytes.

    Raises:
        DeepShrinkError: a bad option (naming the allowed values), a dtype that
            cannot be stored, a NaN or infinity, data that is not JSON, or a
            path that cannot be written.

    Examples:
        >>> import tempfile, os
        >>> t = CompressedTensor.from_dense(torch.tensor([[0.0, 0.5], [0.5, -1.0]]))
        >>> path = os.path.join(tempfile.mkdtemp(), "t.dsz")
        >>> save({"w": t, "b": torch.ones(2)}, path) == os.path.getsize(path)
        True
        >>> load(path).tensors["w"].to_dense().tolist()
        [[0.0, 0.5], [0.5, -1.0]]
    """
    options = EncodeOptions(coder, index_bits, layout, codebook_dtype, array_dtype)
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
        data = encode_file(tensors, arrays, options, spec, metadata, allow_nonfinite=allow_nonfinite)
    write_atomic(path, data)
    return len(data)


def read(
    path: str | os.PathLike,
    progress: bool = True,
    *,
    max_elements: int | None = None,
    allow_nonfinite: bool | None = None,
) -> DszContents:
    """Read and validate a file without building any model (never imports or runs anything).

    Args:
        path: a ``.dsz`` file.
        progress: show a progress bar while decoding (see :mod:`deepshrink.progress`).
        max_elements: the most elements decoding it may allocate (default
            ``2**26``, or :func:`~deepshrink.fileformat.codec.read_limits`'s);
            raise it for a file you trust that needs more.
        allow_nonfinite: accept NaN and infinity in its values (default False).

    Raises:
        FileFormatError: the file is damaged, truncated, of another version,
            over the budget, or holds NaN or infinity.
        DeepShrinkError: it cannot be read at all.
    """
    with quiet(not progress):
        return decode_file(read_bytes(path), max_elements=max_elements, allow_nonfinite=allow_nonfinite)


def load_into(
    model: torch.nn.Module,
    source: str | os.PathLike | DszContents,
    progress: bool = True,
    *,
    max_elements: int | None = None,
    allow_nonfinite: bool | None = None,
) -> torch.nn.Module:
    """Make ``model`` compute with exactly the weights in ``source``: the way to rebuild your own architecture.

    Compressed tensors are installed as weight sharing
    (:func:`deepshrink.compress.quantize.load_compressed_`), the rest with ``load_state_dict``.
    Each compressed tensor's shape is compared with the model's weight before its mask is allocated.

    Args:
        model: your architecture.
        source: a path, or a file already read.
        progress: show progress bars while reading and installing.
        max_elements, allow_nonfinite: for reading a path; see :func:`read`.

    Returns:
        ``model``, changed in place.

    Raises:
        DeepShrinkError: a name in the file is not in the model, a shape differs,
            or the model has state the file does not hold.
    """
    from deepshrink.compress.quantize import load_compressed_

    if isinstance(source, DszContents):
        contents = source
    else:
        contents = read(source, progress, max_elements=max_elements, allow_nonfinite=allow_nonfinite)
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


def load_state_dict_file(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Fill ``model`` from a ``torch.save``-d state dict (read with ``weights_only=True``: no code runs).

    Returns:
        ``model``.

    Raises:
        DeepShrinkError: the file is missing, is not a state dict, or does not fit the model.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise DeepShrinkError(f"cannot read state dict {str(path)!r}: {err.strerror or err}") from err
    except Exception as err:  # torch.load raises many types on files it cannot parse
        first_line = (str(err).splitlines() or [""])[0][:120]
        raise DeepShrinkError(f"{str(path)!r} is not a state dict saved with torch.save ({type(err).__name__}: "
                              f"{first_line})") from err  # fmt: skip
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DeepShrinkError(f"{str(path)!r} holds {type(state).__name__}, not a state dict of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DeepShrinkError(f"state dict {str(path)!r} does not fit {type(model).__name__}: {err}") from err
    return model


def _factory(spec: dict, trust_factory: bool, source: str) -> Callable[..., torch.nn.Module]:
    """The function ``spec`` names, if the trust policy lets it be imported."""
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
    if not callable(factory):
        raise DeepShrinkError(f"factory {spec['factory']!r} is not callable")
    return factory


_KWARG_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def check_kwargs(factory: Callable, kwargs: dict, name: str) -> None:
    """Check ``kwargs`` against ``factory``'s signature and the plain types it annotates, before any call.

    Ranges are the factory's own business (the models of ``deepshrink.models``
    check theirs); it then runs on the meta device first, where a wrong size
    costs nothing.

    Raises:
        DeepShrinkError: an unknown or missing argument, or a value of the wrong type.
    """
    try:
        signature = inspect.signature(factory)
        signature.bind(**kwargs)
    except TypeError as err:
        raise DeepShrinkError(f"factory {name!r} rejects kwargs {show_value(kwargs)}: {err}") from err
    except ValueError:
        return  # no signature to check (a builtin); the call will tell
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # an annotation that does not resolve tells nothing about the values
        hints = {}
    for key, value in kwargs.items():
        allowed = _KWARG_TYPES.get(hints.get(key))
        if allowed and (not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool))):
            raise DeepShrinkError(f"factory {name!r}: {key}={show_value(value)} must be {hints[key].__name__}")


def _call(factory: Callable[..., torch.nn.Module], spec: dict, device: str | None = None) -> torch.nn.Module:
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            model = factory(**spec["kwargs"])
    except DeepShrinkError:
        raise
    except Exception as err:  # a factory raises whatever its layers raise on bad sizes: name it for the user
        raise DeepShrinkError(f"factory {spec['factory']!r} rejects kwargs {show_value(spec['kwargs'])}: "
                              f"{type(err).__name__}: {err}") from err  # fmt: skip
    if not isinstance(model, torch.nn.Module):
        raise DeepShrinkError(f"factory {spec['factory']!r} returned {type(model).__name__}, not an nn.Module")
    return model


def build_model(
    spec: dict,
    trust_factory: bool = False,
    *,
    source: str = "the file",
    fits: DszContents | None = None,
    max_elements: int | None = None,
) -> torch.nn.Module:
    """Call the factory ``spec`` names (``{"factory": "module:function", "kwargs": {...}}``).

    The one trust policy for every model built from a name: a file's factory
    (:func:`load`, the engine, export), a recipe's model and the command line's.
    Importing a module runs its code, so unless ``trust_factory`` only the models
    of ``deepshrink.models`` (its ``__all__``) are built. The kwargs are checked
    against the factory's signature before it is called.

    Args:
        spec: the factory and its JSON keyword arguments.
        trust_factory: allow any importable factory; only for names you trust.
        source: who names the factory, for the error message (``"the recipe"``).
        fits: a file the model is built for. Its kwargs decide how much the
            factory allocates, so nothing is built for real until the factory
            has run on the meta device (no memory), every entry of that model's
            state dict has a tensor of its shape in the file and the other way
            round, and the file's tensors dense are within ``max_elements``.
        max_elements: with ``fits``; default :func:`~deepshrink.fileformat.codec.read_limits`'s.

    Raises:
        DeepShrinkError: the factory is not trusted (naming how to opt in),
            malformed, cannot be imported, rejects the kwargs, or its model
            does not fit ``fits``.
    """
    spec = _check_factory(spec.get("factory"), spec.get("kwargs", {}))
    factory = _factory(spec, trust_factory, source)
    check_kwargs(factory, spec["kwargs"], spec["factory"])
    if fits is not None:
        check_dense(fits, "building the model", max_elements)
        _check_fills(_call(factory, spec, device="meta"), fits, spec["factory"])
    return _call(factory, spec)


def model_from_file(
    contents: DszContents, trust_factory: bool = False, *, max_elements: int | None = None, progress: bool = True
) -> torch.nn.Module:
    """Build the model a file names, once the file is known to fill it (see :func:`build_model`), and fill it.

    Raises:
        FileFormatError: the file names no factory, an untrusted or unknown
            one, kwargs it rejects, a model its tensors do not fill, or one
            over the budget: a crafted file gets this error whatever it claims.
    """
    if contents.model is None:
        raise FileFormatError("the file names no model factory; build the model yourself and use load_into")
    try:
        model = build_model(contents.model, trust_factory, fits=contents, max_elements=max_elements)
        return load_into(model, contents, progress)
    except FileFormatError:
        raise
    except DeepShrinkError as err:
        raise FileFormatError(str(err)) from err


def _check_fills(skeleton: torch.nn.Module, contents: DszContents, name: str) -> None:
    """The file holds a tensor of the right shape for every state-dict entry of ``skeleton``, and no other."""
    wanted = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    held = {n: ct.shape for n, ct in contents.tensors.items()} | {n: tuple(a.shape) for n, a in contents.arrays.items()}
    if wanted != held:
        missing = sorted(set(wanted) - set(held))[:5]
        extra = sorted(set(held) - set(wanted))[:5]
        differ = [f"{k}: file {held[k]}, model {wanted[k]}" for k in wanted if k in held and held[k] != wanted[k]][:5]
        raise FileFormatError(f"the file does not fit the model its factory {name!r} builds: missing {missing}, "
                              f"unexpected {extra}, shapes differ {differ}")  # fmt: skip


def load(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    *,
    trust_factory: bool = False,
    progress: bool = True,
    max_elements: int | None = None,
    allow_nonfinite: bool | None = None,
) -> torch.nn.Module | DszContents:
    """Load a file as a model when possible, else as tensors.

    Args:
        path: a file written by :func:`save`.
        model: your architecture, built by you; it is filled in place
            (:func:`load_into`) and returned.
        trust_factory: allow the file's factory to be imported even outside
            ``deepshrink.models``. Importing runs code: only for files you trust.
        progress: show progress bars while decoding and installing the weights.
        max_elements: the most elements reading the file, and building its
            model, may allocate (default ``2**26``); see :func:`read`.
        allow_nonfinite: accept NaN and infinity (default False).

    Returns:
        The model (given, or built by the file's factory), or the file's
        :class:`DszContents` when the file names no factory.

    Raises:
        FileFormatError: the file is damaged, over the budget, or does not fit
            the model its own factory builds.
        DeepShrinkError: your model does not fit the file, or the factory is not trusted.
    """
    contents = read(path, progress, max_elements=max_elements, allow_nonfinite=allow_nonfinite)
    if model is not None:
        return load_into(model, contents, progress)
    if contents.model is None:
        return contents
    return model_from_file(contents, trust_factory, max_elements=max_elements, progress=progress)
