"""Simulate a compressed-model file, and render simulator results as rich tables."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from deepshrink.errors import DeepShrinkError
from deepshrink.fileformat.codec import check_dense
from deepshrink.hardware.eie import EIEConfig, LayerResult, NetworkResult, simulate_network
from deepshrink.tables import NameTable


def simulate_file(
    path: str | os.PathLike,
    *,
    config: EIEConfig | None = None,
    act_density: float | None = None,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    images: int = 100,
    seed: int = 0,
) -> NetworkResult:
    """Simulate every compressed matrix of a ``.dsz`` file on EIE.

    Args:
        path: a file written by :func:`deepshrink.save`.
        config: the hardware.
        act_density: fraction of non-zero inputs assumed for every layer; with neither
            this nor ``data``, every input is non-zero.
        data: ``"mnist"`` to run the file's model on real test images and simulate the
            activations it really produces (the file must name a ``deepshrink.models``
            factory).
        data_dir: data root for ``data`` (default ``$DEEPSHRINK_DATA``).
        images: test images to run with ``data``.
        seed: random seed for ``act_density``.

    Returns:
        The per-layer results.

    Raises:
        DeepShrinkError: both ``act_density`` and ``data``, an unknown data set, a file
            without a model factory when ``data`` is given, or a damaged file.
    """
    from deepshrink.fileformat import model_io

    if data is None:
        contents = model_io.read(path)
        check_dense(contents, "the simulator")  # it holds every layer's input activations and column pointers
        return simulate_network(contents.tensors, act_density=act_density, config=config, seed=seed)
    if act_density is not None:
        raise DeepShrinkError("give either an activation density or a data set, not both")
    if data != "mnist":
        raise DeepShrinkError(f"data set {data!r} must be 'mnist'")
    if not isinstance(images, int) or images < 1:
        raise DeepShrinkError(f"images={images!r} must be a positive integer")
    from deepshrink.compress.quantize import compressed_tensors
    from deepshrink.data.mnist import load_mnist
    from deepshrink.hardware.activations import layer_inputs

    model = model_io.load(path)
    if not isinstance(model, torch.nn.Module):
        raise DeepShrinkError(f"{path} names no model factory; simulate it with an activation density instead")
    tensors = compressed_tensors(model)
    x, _ = load_mnist(data_dir, "test")
    x = x[:images]
    result = simulate_network(tensors, layer_inputs(model, tensors, x), config=config)
    result.samples = len(x)
    return result


def results_table(
    layers: Sequence[LayerResult], samples: int | None = None, title: str = "EIE simulation"
) -> NameTable:
    """Per-layer table with a total row; layer names are never cut (:class:`~deepshrink.tables.NameTable`).

    Args:
        layers: simulated layers, on the same hardware.
        samples: report figures per model input (e.g. per image: a convolution runs one
            vector per output position); by default per input vector of each layer.
        title: table title.

    Returns:
        A table (a rich renderable) to print.

    Raises:
        DeepShrinkError: if there is no layer.
    """
    if not layers:
        raise DeepShrinkError("no layer to report: the file holds no compressed tensor")
    config = layers[0].config
    unit = "input vector" if samples is None else f"sample (mean of {samples})"
    notes = [f"figures per {unit}", "PE util: mean busy fraction (load efficiency)", "min PE: least busy PE"]
    if not all(r.fits_on_chip for r in layers):
        notes.append("uJ*: includes DRAM traffic (the layer does not fit in the PEs' SRAM)")
    table = NameTable(
        ["matrix", "act nz", "cycles", "us", "PE util", "min PE", "uJ"],
        f"{title}: {config.n_pe} PEs, {config.clock_hz / 1e6:g} MHz, FIFO depth {config.fifo_depth}",
        caption="; ".join(notes),
    )
    per = [samples or max(r.vectors, 1) for r in layers]
    for r, n in zip(layers, per):
        rows, cols = r.matrix_shape
        table.add_row(
            r.name,
            f"{rows}x{cols}",
            f"{r.active_columns / (max(r.vectors, 1) * cols):.1%}" if cols else "-",
            f"{r.cycles / n:,.0f}",
            f"{r.time_s / n * 1e6:.2f}",
            f"{r.load_efficiency:.1%}",
            f"{r.pe_utilisation.min():.1%}",
            f"{r.energy_total_pj * 1e-6 / n:.3f}" + ("" if r.fits_on_chip else "*"),
        )
    if len(layers) > 1:
        cycles = sum(r.cycles / n for r, n in zip(layers, per))
        energy = sum(r.energy_total_pj / n for r, n in zip(layers, per))
        table.add_row(
            "total",
            "",
            "",
            f"{cycles:,.0f}",
            f"{cycles / config.clock_hz * 1e6:.2f}",
            "",
            "",
            f"{energy * 1e-6:.3f}" + ("" if all(r.fits_on_chip for r in layers) else "*"),
            style="bold",
        )
    return table
