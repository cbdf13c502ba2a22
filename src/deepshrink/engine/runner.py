"""Run and time a compressed-model file on the engine (the ``deepshrink run`` / ``bench`` commands)."""

from __future__ import annotations

import copy
import io
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from deepshrink.compress.int8 import compute_in_float32_
from deepshrink.compress.parametrization import bake_
from deepshrink.engine.compile import engine_layers, from_file
from deepshrink.errors import DeepShrinkError


def decoded_model(path: str | os.PathLike, trust_factory: bool = False) -> nn.Module:
    """The file's model with every weight decoded once into a plain dense parameter.

    This is dense torch at its best (no parametrization recomputed per call): the
    baseline the engine is measured against.
    """
    from deepshrink.fileformat.model_io import load

    model = load(path, trust_factory=trust_factory)
    if not isinstance(model, nn.Module):
        raise DeepShrinkError(f"{os.fspath(path)} names no model factory, so there is no model to run")
    return bake_(model).eval()


def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model`` over ``inputs`` in batches of ``batch_size``, concatenated."""
    with torch.no_grad():
        return torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def median_seconds(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    block_seconds: float = 0.005,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in blocks of back-to-back calls.

    Each sample is the mean of a block of consecutive calls lasting about
    ``block_seconds`` (at least one call; a block of several follows one untimed
    call), as ``timeit`` does: steady state, so each implementation runs with its
    own data in cache if it fits there (a compressed layer does, a dense one often
    does not: the point of compression). Blocks of the functions are interleaved,
    so that machine load hits all alike. ``clock`` is wall time by default;
    ``time.thread_time`` counts only the calling thread's CPU time (single-threaded
    code on a machine shared with other jobs: the time it waits for a core drops out).
    """
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up: caches, lazy layouts, compilation
        start = clock()
        fn()
        calls[name] = max(1, int(block_seconds / max(clock() - start, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if calls[name] > 1:  # short calls: the previous block (another function's) evicted their data
                fn()
            start = clock()
            for _ in range(calls[name]):
                fn()
            samples[name].append((clock() - start) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def load_inputs(path: str | os.PathLike) -> torch.Tensor:
    """A ``.npy`` array of inputs (first axis = samples) as float32; never unpickles.

    Raises:
        DeepShrinkError: the file is missing, not ``.npy``, or not numeric.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DeepShrinkError(f"cannot read inputs from {os.fspath(path)} (a .npy array is expected): {err}") from err
    if not np.issubdtype(array.dtype, np.number) or array.ndim < 1:
        raise DeepShrinkError(f"{os.fspath(path)} holds {array.dtype} of shape {array.shape}; expected numbers, "
                              "first axis = samples")  # fmt: skip
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` atomically."""
    from deepshrink.atomic import write_atomic

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomic(path, buffer.getvalue())


def bench_file(
    path: str | os.PathLike,
    inputs: torch.Tensor,
    batch_sizes: tuple[int, ...] = (1, 16),
    repeats: int = 5,
    trust_factory: bool = False,
    arithmetic: str | None = None,
) -> list[dict]:
    """Time the engine (in ``arithmetic``, see :func:`~deepshrink.engine.compile_model`) against dense torch on
    ``inputs`` at each batch size.

    Returns:
        One dict per batch size: ``batch``, ``engine_us`` and ``dense_us`` per
        sample (dense torch in float32, its Linear layers declared int8 too), ``speedup``,
        ``first_call_s`` (the engine's first batch, numba compilation or cache load
        included) and ``max_abs_diff`` of the outputs from the file's model's.

    Raises:
        DeepShrinkError: a batch size below 1.
    """
    if any(b < 1 for b in batch_sizes):
        raise DeepShrinkError(f"batch sizes {batch_sizes} must all be >= 1")
    decoded, engine = (
        decoded_model(path, trust_factory),
        from_file(path, trust_factory=trust_factory, arithmetic=arithmetic),
    )
    # timed in float32, as users run dense torch; outputs compared with the file's model (its int8 layers' too)
    dense = compute_in_float32_(copy.deepcopy(decoded))
    if not engine_layers(engine):
        raise DeepShrinkError(f"{os.fspath(path)} has no compressed Linear or Conv2d layer for the engine")
    rows = []
    for batch in batch_sizes:
        chunks = [inputs[i : i + batch] for i in range(0, len(inputs) - batch + 1, batch)] or [inputs[:batch]]
        start = time.perf_counter()
        with torch.no_grad():
            engine(chunks[0])
        first = time.perf_counter() - start

        def run(model: nn.Module) -> Callable[[], None]:
            return lambda: predict(model, torch.cat(chunks), batch)  # noqa: B023 (timed in this iteration)

        times = median_seconds({"engine": run(engine), "dense": run(dense)}, repeats)
        n = sum(len(c) for c in chunks)
        diff = float((predict(engine, chunks[0], batch) - predict(decoded, chunks[0], batch)).abs().max())
        rows.append({"batch": batch, "engine_us": times["engine"] / n * 1e6, "dense_us": times["dense"] / n * 1e6,
                     "speedup": times["dense"] / times["engine"], "first_call_s": first, "max_abs_diff": diff})  # fmt: skip
    return rows
