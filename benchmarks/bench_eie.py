"""EIE simulator benchmark: the nine benchmark layers, FIFO-depth and PE-count sweeps.

Reproduces EIE's published Alex-7 time from the hardware rules, compares every layer with
the published CPU / GPU times, sweeps queue depth (1..256) and PEs (1..256) as the EIE
paper's figures do, simulates a LeNet-300-100 compressed on real MNIST with its real
activations, and times the simulator against a plain-Python cycle-stepped scheduler
measured in the same run.

    python benchmarks/bench_eie.py              # results/eie.{json,md} and two PNGs
    python benchmarks/bench_eie.py --publish    # also docs/results/eie.md and the PNGs

Outputs: eie.json, eie.md, eie_fifo_depth.png and eie_pe_scaling.png in results/ (not
committed); with --publish the page and PNGs in docs/results/ too.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from deepshrink.hardware import EIE_BENCHMARK_LAYERS, EIEConfig, pe_layout, simulate_layer, synthetic_layer  # noqa: E402
from deepshrink.hardware.kernels import queue_schedule  # noqa: E402
from deepshrink.hardware.layers import synthetic_activations  # noqa: E402

from common import ROOT, add_data_dir, add_output, write_results  # noqa: E402

ALEX7_PUBLISHED_US = 12.2  # EIE (Han et al., ISCA 2016), Alex-7 on 64 PEs at 800 MHz
HEADLINE_SPEEDUP = {"CPU dense": 189.0, "GPU dense": 13.0}  # EIE abstract, against uncompressed DNNs
# Published wall-clock time per layer at batch 1, us (docs/references.md; i7-5930K + MKL, Titan X + cuBLAS/cuSPARSE).
PUBLISHED_US = {
    "Alex-6": (7516.2, 3066.5, 541.5, 134.8),
    "Alex-7": (6187.1, 1282.1, 243.0, 65.8),
    "Alex-8": (1134.9, 890.5, 80.5, 54.6),
    "VGG-6": (35022.8, 3774.3, 1467.8, 167.0),
    "VGG-7": (5372.8, 545.1, 243.0, 39.8),
    "VGG-8": (774.2, 777.3, 80.5, 48.0),
    "NT-We": (605.0, 261.2, 65.0, 17.7),
    "NT-Wd": (1361.4, 437.4, 90.1, 41.1),
    "NT-LSTM": (470.5, 260.0, 51.9, 18.5),
}
PLATFORMS = ("CPU dense", "CPU sparse", "GPU dense", "GPU sparse")
SWEEP = [1 << i for i in range(9)]  # 1 .. 256


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def reference_scheduler():
    """The plain-Python cycle-stepped scheduler the kernel tests use as gold reference."""
    spec = importlib.util.spec_from_file_location("ref", ROOT / "tests" / "test_hardware_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_schedule


def save_png(fig: plt.Figure, path: Path) -> None:
    """Write a figure atomically (temp file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    plt.close(fig)


def run_layers(tensors: dict, console: Console) -> list[dict]:
    rows = []
    for layer in EIE_BENCHMARK_LAYERS:
        ct = tensors[layer.name]
        start = time.perf_counter()
        r = simulate_layer(ct, act_density=layer.act_density, name=layer.name)
        wall = time.perf_counter() - start
        us = r.time_per_vector_s * 1e6
        row = r.as_dict() | {
            "sim_wall_s": wall,
            "weight_density": ct.density,
            "us": us,
            "padding_fraction": r.padding_macs / max(r.macs + r.padding_macs, 1),
            "ideal_us": r.ideal_cycles / r.config.clock_hz * 1e6,
        }
        row["speedup"] = {p: t / us for p, t in zip(PLATFORMS, PUBLISHED_US[layer.name])}
        rows.append(row)
        console.log(f"{layer.name}: {us:.2f} us, simulated in {wall:.2f} s")
    return rows


def sweep(tensors: dict, field: str, console: Console) -> dict[str, list[float]]:
    """Load efficiency over FIFO depths, or cycles over PE counts, per layer."""
    out = {}
    for layer in EIE_BENCHMARK_LAYERS:
        values = []
        for n in SWEEP:
            config = EIEConfig(fifo_depth=n) if field == "fifo_depth" else EIEConfig(n_pe=n)
            r = simulate_layer(tensors[layer.name], act_density=layer.act_density, config=config)
            values.append(r.load_efficiency if field == "fifo_depth" else r.cycles)
        out[layer.name] = values
        console.log(f"{field} sweep: {layer.name} done")
    return out


def scheduler_speed(ct, console: Console) -> dict[str, float]:
    """Time the numba queue recurrence against the Python cycle-stepped reference on Alex-7."""
    layout = pe_layout(ct, 64, 4)
    active = np.flatnonzero(synthetic_activations(ct.matrix_shape[1], 0.353))
    cost = np.ascontiguousarray(np.maximum(layout.entries[:, active], 1).T)
    queue_schedule(cost, np.int64(8))  # compiled or loaded from cache before timing
    start = time.perf_counter()
    finish, _ = queue_schedule(cost, np.int64(8))
    fast = time.perf_counter() - start
    start = time.perf_counter()
    ref_finish, _ = reference_scheduler()(cost, 8)
    slow = time.perf_counter() - start
    if not np.array_equal(finish, ref_finish):
        raise RuntimeError("numba schedule disagrees with the reference")
    console.log(f"scheduler: numba {fast * 1e3:.2f} ms, python reference {slow:.2f} s")
    return {"numba_s": fast, "python_reference_s": slow, "ratio": slow / fast}


def real_lenet(data_dir: str | None, console: Console) -> dict:
    """LeNet-300-100 compressed on real MNIST (EIE's 4-bit codes), simulated on its real activations."""
    import torch

    from deepshrink.compress.prune import prune_
    from deepshrink.compress.quantize import compressed_tensors, share_weights_
    from deepshrink.compress.train import TrainConfig, evaluate, fit
    from deepshrink.data.mnist import load_mnist
    from deepshrink.hardware import simulate_network
    from deepshrink.hardware.activations import layer_inputs
    from deepshrink.models import lenet_300_100

    torch.set_num_threads(1)  # a small MLP on a shared 2-core machine trains fastest on one thread
    torch.manual_seed(0)
    train, test = load_mnist(data_dir, "train"), load_mnist(data_dir, "test")
    model = lenet_300_100()
    fit(model, train, TrainConfig(lr=0.05, batch_size=128, progress=False))
    dense_accuracy = evaluate(model, test)
    # Deep Compression's LeNet-300-100 keeps 8% / 9% / 26% of the three layers (docs/references.md).
    prune_(model, {"fc1.weight": 0.92, "fc2.weight": 0.91, "fc3.weight": 0.74})
    fit(model, train, TrainConfig(lr=0.005, batch_size=128, progress=False))
    share_weights_(model, bits=4)
    fit(model, train, TrainConfig(lr=0.005, batch_size=128, progress=False))
    accuracy = evaluate(model, test)
    tensors = compressed_tensors(model)
    images = test[0][:1000]
    real = simulate_network(tensors, layer_inputs(model, tensors, images))
    dense_inputs = simulate_network(tensors)  # the same weights, every input assumed non-zero
    console.log(f"LeNet-300-100: accuracy {dense_accuracy:.2%} dense -> {accuracy:.2%} compressed")
    layers = [
        {
            "name": r.name,
            "rows": r.matrix_shape[0],
            "cols": r.matrix_shape[1],
            "kept": tensors[r.name].density,
            "act": r.active_columns / (r.vectors * r.matrix_shape[1]),
            "cycles": r.cycles / r.vectors,
            "us": r.time_per_vector_s * 1e6,
            "load_efficiency": r.load_efficiency,
            "uj": r.energy_total_pj * 1e-6 / r.vectors,
            "dense_input_us": d.time_s * 1e6,
        }
        for r, d in zip(real.layers, dense_inputs.layers)
    ]
    return {
        "dense_accuracy": dense_accuracy,
        "accuracy": accuracy,
        "images": len(images),
        "layers": layers,
        "us": real.time_s / len(images) * 1e6,
        "uj": real.energy_total_pj * 1e-6 / len(images),
        "dense_input_us": dense_inputs.time_s * 1e6,
    }


def plots(fifo: dict, pes: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in fifo.items():
        ax.plot(SWEEP, [100 * v for v in values], marker="o", label=name)
    ax.set(
        xscale="log",
        xlabel="FIFO depth",
        ylabel="load-balance efficiency (%)",
        title="EIE simulator: load balance against activation-queue depth (64 PEs)",
    )
    ax.set_xticks(SWEEP, [str(n) for n in SWEEP])
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    save_png(fig, out / "eie_fifo_depth.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cycles in pes.items():
        ax.plot(SWEEP, [cycles[0] / c for c in cycles], marker="o", label=name)
    ax.plot(SWEEP, SWEEP, "k--", linewidth=1, label="linear")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="processing elements",
        ylabel="speed-up over 1 PE",
        title="EIE simulator: scalability (FIFO depth 8)",
    )
    ax.set_xticks(SWEEP, [str(n) for n in SWEEP])
    ax.grid(alpha=0.3, which="both")
    ax.legend(ncol=3, fontsize=8)
    save_png(fig, out / "eie_pe_scaling.png")


def markdown(result: dict) -> str:
    rows, fifo, pes, speed, lenet = (result[k] for k in ("layers", "fifo_sweep", "pe_sweep", "scheduler", "lenet"))
    total_s = result["seconds"]
    alex7 = next(r for r in rows if r["name"] == "Alex-7")
    lines = [
        "# EIE simulator: benchmark layers",
        "",
        "Produced by `python benchmarks/bench_eie.py` (synthetic layers of the published size and",
        "density, seed 0; 64 PEs, 800 MHz, FIFO depth 8, 4-bit codes and relative indices).",
        "Timings of the simulator itself were taken on a shared 2-core machine.",
        "",
        f"**Alex-7: {alex7['us']:.2f} us per layer** ({1e6 / alex7['us']:,.0f} layers/s) against the published "
        f"{ALEX7_PUBLISHED_US} us (81,967 layers/s): {alex7['us'] / ALEX7_PUBLISHED_US - 1:+.1%}, "
        f"simulated in {alex7['sim_wall_s']:.2f} s.",
        "",
        "| layer | matrix (out x in) | weights | act. | cycles | time (us) | ideal (us) | load eff. | padding |"
        " energy (uJ) | power (W) | on chip | vs CPU dense | vs GPU dense | vs GPU sparse | sim (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['rows']}x{r['cols']} | {r['weight_density']:.1%} | "
            f"{r['active_columns'] / r['cols']:.1%} | {r['cycles']:,} | {r['us']:.2f} | {r['ideal_us']:.2f} | "
            f"{r['load_efficiency']:.1%} | {r['padding_fraction']:.1%} | {r['energy_per_vector_uj']:.2f} | "
            f"{r['power_w']:.2f} | {'yes' if r['fits_on_chip'] else 'no'} | {r['speedup']['CPU dense']:.0f}x | "
            f"{r['speedup']['GPU dense']:.1f}x | {r['speedup']['GPU sparse']:.1f}x | {r['sim_wall_s']:.2f} |"
        )
    lines += [
        "",
        "Geometric-mean speed-up over the nine layers (published CPU / GPU times of docs/references.md):",
        "",
        "| against | simulated | EIE paper |",
        "|---|---|---|",
    ]
    for platform in PLATFORMS:
        published = HEADLINE_SPEEDUP.get(platform)
        lines.append(
            f"| {platform} | {geomean([r['speedup'][platform] for r in rows]):.0f}x | "
            f"{f'{published:.0f}x' if published else '-'} |"
        )
    lines += [
        "",
        "Load-balance efficiency against FIFO depth (64 PEs), `eie_fifo_depth.png`:",
        "",
        "| layer | " + " | ".join(str(d) for d in SWEEP) + " |",
        "|---|" + "---|" * len(SWEEP),
    ]
    for name, values in fifo.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.0f}%" for v in values) + " |")
    lines += [
        "",
        "Speed-up over one PE (FIFO depth 8), `eie_pe_scaling.png`:",
        "",
        "| layer | " + " | ".join(str(n) for n in SWEEP) + " |",
        "|---|" + "---|" * len(SWEEP),
    ]
    for name, cycles in pes.items():
        lines.append(f"| {name} | " + " | ".join(f"{cycles[0] / c:.1f}" for c in cycles) + " |")
    lines += [
        "",
        "## A real compressed model: LeNet-300-100 on MNIST",
        "",
        f"Trained 1 epoch, pruned to 8/9/26% (Deep Compression's per-layer figures), 4-bit weight sharing "
        f"(EIE's codebook), retrained; test accuracy {lenet['dense_accuracy']:.2%} dense -> "
        f"{lenet['accuracy']:.2%} compressed (10,000 images). Simulated on the real inputs of "
        f"{lenet['images']} test images (ReLU and background zeros skipped), per image:",
        "",
        "| layer | matrix | kept | act. non-zero | cycles | time (us) | load eff. | energy (uJ) |"
        " time with every input non-zero (us) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lenet["layers"]:
        lines.append(
            f"| {r['name']} | {r['rows']}x{r['cols']} | {r['kept']:.1%} | {r['act']:.1%} | "
            f"{r['cycles']:,.0f} | {r['us']:.2f} | {r['load_efficiency']:.1%} | {r['uj']:.3f} | "
            f"{r['dense_input_us']:.2f} |"
        )
    lines += [
        f"| total | | | | | {lenet['us']:.2f} | | {lenet['uj']:.3f} | {lenet['dense_input_us']:.2f} |",
        "",
        f"Skipping zero activations makes the network {lenet['dense_input_us'] / lenet['us']:.1f}x faster than "
        "the same weights with dense inputs (baseline simulated in the same run).",
    ]
    lines += [
        "",
        f"Scheduler speed on Alex-7 (same cost matrix, same result): numba "
        f"{speed['numba_s'] * 1e3:.2f} ms, plain-Python cycle stepping {speed['python_reference_s']:.2f} s "
        f"({speed['ratio']:,.0f}x). Whole benchmark: {total_s:.0f} s.",
        "",
        "![FIFO depth](eie_fifo_depth.png)",
        "",
        "![PE scaling](eie_pe_scaling.png)",
        "",
    ]
    return "\n".join(lines)


def console_table(rows: list[dict]) -> Table:
    table = Table(title="EIE simulator, benchmark layers (64 PEs, 800 MHz, FIFO 8)")
    for header in ("layer", "us", "load eff.", "energy uJ", "vs CPU dense", "vs GPU dense", "sim s"):
        table.add_column(header, justify="left" if header == "layer" else "right")
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['us']:.2f}",
            f"{r['load_efficiency']:.1%}",
            f"{r['energy_per_vector_uj']:.2f}",
            f"{r['speedup']['CPU dense']:.0f}x",
            f"{r['speedup']['GPU dense']:.1f}x",
            f"{r['sim_wall_s']:.2f}",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    add_output(parser, publish=True)
    args = parser.parse_args()
    console = Console()
    began = time.perf_counter()
    tensors = {
        layer.name: synthetic_layer(layer.outputs, layer.inputs, layer.weight_density, seed=0)
        for layer in EIE_BENCHMARK_LAYERS
    }
    rows = run_layers(tensors, console)
    speed = scheduler_speed(tensors["Alex-7"], console)
    fifo = sweep(tensors, "fifo_depth", console)
    pes = sweep(tensors, "n_pe", console)
    lenet = real_lenet(args.data_dir, console)
    console.print(console_table(rows))
    for platform in PLATFORMS:
        console.print(f"geo-mean speed-up vs {platform}: {geomean([r['speedup'][platform] for r in rows]):.0f}x")
    result = {
        "layers": rows,
        "fifo_sweep": fifo,
        "pe_sweep": pes,
        "scheduler": speed,
        "lenet": lenet,
        "seconds": time.perf_counter() - began,
    }
    for folder in write_results(args, "eie", result, markdown):
        plots(fifo, pes, folder)
        console.print(f"wrote {folder / 'eie.md'} and the plots")


if __name__ == "__main__":
    main()
