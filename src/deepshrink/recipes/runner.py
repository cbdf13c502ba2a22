"""Running a recipe: each stage's compression step and training, in order, then the file.

:func:`run_recipe` builds the model (under the one factory trust policy,
:func:`deepshrink.fileformat.model_io.build_model`), loads the data, runs every
stage of a :class:`~deepshrink.recipes.schema.Recipe` and writes the compressed
file with the recipe's ``encode`` options.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from deepshrink.compress.calibrate import Batch, calibrate
from deepshrink.compress.checkpoint import NO_CHECKPOINT, Checkpointer, NoCheckpoint
from deepshrink.compress.distill import DistillConfig, OutputFn, distill, model_output, output_cosine
from deepshrink.compress.groups import prune_groups_
from deepshrink.compress.int8 import compute_in_int8_
from deepshrink.compress.oneshot import prune_calibrated_, share_calibrated_
from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import share_weights_
from deepshrink.compress.schedules import gradual_prune, iterative_levels
from deepshrink.compress.sensitivity import sensitivity_scan
from deepshrink.compress.ternary import ternarize_
from deepshrink.compress.train import TrainConfig, evaluate, fit, iterative_prune
from deepshrink.data.registry import Data, load_data
from deepshrink.errors import DeepShrinkError
from deepshrink.fileformat.codec import EncodeOptions
from deepshrink.fileformat.model_io import build_model, load_state_dict_file, save
from deepshrink.models.registry import model_factory
from deepshrink.recipes.schema import (
    STAGES,
    DistillStage,
    EncodeStage,
    FinetuneStage,
    PruneStage,
    Recipe,
    SensitivitySpec,
    ShareStage,
    TernaryStage,
    TrainStage,
    load_recipe,
)
from deepshrink.report import layer_table, rows_table

DEFAULT_CHECKPOINT_EVERY = 500  # optimizer steps: a few seconds of LeNet training, a save costs ~20 ms


def train_config(stage: TrainStage, recipe: Recipe) -> TrainConfig:
    """The :class:`TrainConfig` of ``stage`` under ``recipe``'s batch size, seed and step cap."""
    return TrainConfig(
        epochs=stage.epochs,
        lr=stage.lr,
        momentum=stage.momentum,
        weight_decay=stage.weight_decay,
        optimizer=stage.optimizer,
        schedule=stage.lr_schedule,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
        max_steps=recipe.max_steps,
        augment=stage.augment,
    )


@dataclass
class Run:
    """What the stages of one recipe run work on.

    Attributes:
        model: compressed in place, stage by stage.
        recipe: the recipe.
        train: labelled training data; ``None`` for a pretrained model given without labels.
        inputs: unlabelled inputs (calibration of one-shot stages, distillation).
        console: where tables go.
        ckpt: the run's checkpoint (each step a unit).
        teacher: the model before any stage: distillation's target.
        outputs: ``(model, batch) -> tensor`` that distillation matches.
    """

    model: nn.Module
    recipe: Recipe
    train: Data | None
    inputs: list[Batch]
    console: Console
    ckpt: Checkpointer | NoCheckpoint = NO_CHECKPOINT
    teacher: nn.Module | None = None
    outputs: OutputFn = model_output

    def labelled(self, what: str) -> Data:
        """The labelled training data ``what`` needs.

        Raises:
            DeepShrinkError: there is none (a pretrained model): say what to use instead.
        """
        if self.train is None:
            raise DeepShrinkError(
                f"{what} trains on labelled data, and a pretrained model comes without: prune with method "
                "wanda or sparsegpt and epochs 0, share with epochs 0, then recover with a distill stage"
            )
        return self.train


def _train(stage: TrainStage, run: Run) -> None:
    name = type(stage).__name__.removesuffix("Stage").lower()
    fit(run.model, run.labelled(name), train_config(stage, run.recipe), description=name, checkpoint=run.ckpt)


def propose_sparsities(
    spec: SensitivitySpec,
    model: nn.Module,
    train: Data,
    granularity: object,
    layers: list[str] | None,
    console: Console,
) -> dict[str, float]:
    """Scan ``model`` on the tail of ``train`` and return the per-layer sparsities ``spec`` allows."""
    held = (train[0][-spec.samples :], train[1][-spec.samples :])
    scan = sensitivity_scan(model, held, spec.sparsities, granularity=granularity, layers=layers)
    console.print(scan.table())
    if spec.plot:
        scan.plot(spec.plot, spec.max_drop)
    proposal = scan.propose(spec.max_drop)
    console.print(f"sensitivity (max drop {spec.max_drop:g}) proposes: {proposal}")
    return proposal


def _calibrated(run: Run, step: str, fn: Callable[..., list]) -> None:
    """One unit: calibrate the model as it is now (what the layers see after the stages before), then ``fn``."""
    run.ckpt.unit(step, lambda: len(fn(run.model, calibrate(run.model, run.inputs))))


def _prune(stage: PruneStage, run: Run) -> None:
    model, recipe, ckpt = run.model, run.recipe, run.ckpt
    if stage.method != "magnitude":
        prune = functools.partial(prune_calibrated_, sparsity=stage.sparsity, method=stage.method, layers=stage.layers)
        _calibrated(run, f"prune ({stage.method})", prune)
        if stage.epochs > 0:
            fit(model, run.labelled("prune"), train_config(stage, recipe), description="retrain", checkpoint=ckpt)
        return
    train = run.labelled("prune (magnitude)")
    if stage.sensitivity is not None:
        scan = functools.partial(propose_sparsities, stage.sensitivity, model, train, stage.granularity, stage.layers)
        proposal = ckpt.unit("sensitivity scan", lambda: scan(run.console))
        _prune(dataclasses.replace(stage, sensitivity=None, sparsity=proposal), run)
        return
    config = train_config(stage, recipe)
    if stage.schedule == "gradual":
        gradual_prune(
            model,
            stage.sparsity,
            train,
            config,
            every=stage.every,
            granularity=stage.granularity,
            ramp=stage.ramp,
            layers=stage.layers,
            checkpoint=ckpt,
        )
    elif stage.quality is not None:
        iterative_prune(
            model,
            [stage.quality] * stage.steps,
            train,
            config,
            prune_fn=_prune_by_quality,
            checkpoint=ckpt,
            scope=stage.scope,
            layers=stage.layers,
        )
    elif stage.scope == "global":
        levels = iterative_levels(stage.sparsity, stage.steps)
        iterative_prune(model, levels, train, config, checkpoint=ckpt, scope="global", layers=stage.layers)
    else:
        iterative_prune(
            model,
            iterative_levels(stage.sparsity, stage.steps),
            train,
            config,
            prune_fn=prune_groups_,
            checkpoint=ckpt,
            granularity=stage.granularity,
            layers=stage.layers,
        )


def _prune_by_quality(model: nn.Module, quality: object, **kwargs: object) -> list:
    return prune_(model, quality=quality, **kwargs)


def _share(stage: ShareStage, run: Run) -> None:
    model, recipe, ckpt = run.model, run.recipe, run.ckpt
    if stage.method == "calibrated":
        share = functools.partial(share_calibrated_, bits=stage.bits, layers=stage.layers)
        _calibrated(run, "share weights (calibrated)", share)
    else:
        share = functools.partial(
            share_weights_, model, stage.bits, init=stage.init, seed=recipe.seed, layers=stage.layers
        )
        ckpt.unit("share weights", lambda: len(share()))
    if stage.epochs > 0:
        config = train_config(stage, recipe)
        fit(model, run.labelled("share"), config, description="fine-tune centroids", checkpoint=ckpt)


def _ternary(stage: TernaryStage, run: Run) -> None:
    run.ckpt.unit("ternarize", lambda: len(ternarize_(run.model, stage.threshold, layers=stage.layers)))
    if stage.epochs > 0:
        config = train_config(stage, run.recipe)
        fit(run.model, run.labelled("ternary"), config, description="train ternary", checkpoint=run.ckpt)


def _distill(stage: DistillStage, run: Run) -> None:
    config = DistillConfig(
        steps=stage.steps,
        lr=stage.lr,
        quantization_aware=stage.quantization_aware,
        hidden=tuple(stage.hidden or ()),
        hidden_weight=stage.hidden_weight,
        frozen=tuple(stage.frozen or ()),
        int8_inputs=stage.int8_inputs,
        seed=run.recipe.seed,
    )
    distill(run.model, run.teacher, run.inputs, config, outputs=run.outputs, checkpoint=run.ckpt)


# How each stage runs, by its exact class (every training stage derives from TrainStage).
RUNNERS: dict[type, Callable[..., None]] = {
    TrainStage: _train,
    FinetuneStage: _train,
    PruneStage: _prune,
    ShareStage: _share,
    TernaryStage: _ternary,
    DistillStage: _distill,
}


def run_stage(stage: object, run: Run) -> None:
    """Run one (non-encode) stage of ``run.recipe`` on ``run.model``, in place; its steps are units of ``run.ckpt``."""
    RUNNERS[type(stage)](stage, run)


def recipe_data(recipe: Recipe, data_dir: str | None) -> tuple[Data, Data]:
    """``(train, evaluation)`` data of ``recipe``: the test split, or with ``holdout: N``
    the last N training examples, which training then never sees.

    Raises:
        DeepShrinkError: a missing data set, or a holdout that leaves no training data.
    """
    train = load_data(recipe.data, data_dir, "train")
    if not recipe.holdout:
        return train, load_data(recipe.data, data_dir, "test")
    if recipe.holdout >= len(train[1]):
        raise DeepShrinkError(f"holdout={recipe.holdout} must be below the {len(train[1])} training examples")
    n = len(train[1]) - recipe.holdout
    return (train[0][:n], train[1][:n]), (train[0][n:], train[1][n:])


@dataclass
class _Subject:
    """What a run compresses, how it is scored after each stage, and how it is written."""

    model: nn.Module
    train: Data | None
    inputs: list[Batch]
    metric: str  # "accuracy" (labelled test data) or "fidelity" (cosine to the original's outputs)
    score: Callable[[nn.Module], float]
    save: Callable[[nn.Module, str, EncodeStage], int]
    outputs: OutputFn = model_output


def _built_subject(recipe: Recipe, model: nn.Module | None, data_dir: str | None, trust_factory: bool) -> _Subject:
    """A model built by the recipe's factory (or given), trained and scored on its labelled data set."""
    if model is None:
        spec = {"factory": model_factory(recipe.model), "kwargs": recipe.model_kwargs}
        model = build_model(spec, trust_factory, source="the recipe")
        if recipe.state_dict:
            load_state_dict_file(model, recipe.state_dict)
    train, test = recipe_data(recipe, data_dir)
    check_inputs(model, test, f"data set {recipe.data!r}")
    spec = recipe.calibration
    images = train[0][: spec.samples]
    inputs = [images[i : i + spec.batch_size] for i in range(0, len(images), spec.batch_size)]
    return _Subject(model, train, inputs, "accuracy", lambda m: evaluate(m, test),
                    lambda m, out, encode: _save(m, out, recipe, encode))  # fmt: skip


def _pretrained_subject(recipe: Recipe) -> _Subject:
    """A pretrained Hugging Face model, calibrated and distilled on text, scored by fidelity to itself."""
    from deepshrink import huggingface as hf  # the [hf] extra; it says how to install it when missing
    from deepshrink.data import text

    pretrained = hf.load_pretrained(recipe.pretrained)
    spec = recipe.calibration
    texts = hf.read_texts(spec.texts) if spec.texts else text.calibration_texts()
    if len(texts) <= spec.holdout:
        raise DeepShrinkError(f"calibration: {len(texts)} texts leave none after holding out {spec.holdout}")
    held = pretrained.batches(texts[: spec.holdout], spec.batch_size) if spec.holdout else []
    inputs = pretrained.batches(texts[spec.holdout : spec.holdout + spec.samples], spec.batch_size)
    outputs = pretrained.output
    reference = [outputs(pretrained.model, b).detach() for b in held]

    def score(model: nn.Module) -> float:
        return output_cosine(model, held, reference, outputs) if held else float("nan")

    def save(model: nn.Module, out: str, encode: EncodeStage) -> int:
        meta = {"recipe": recipe.name or "pretrained", "seed": recipe.seed}
        return hf.save_pretrained(model, out, pretrained.source_dir, options=EncodeOptions(**encode.options()),
                                  metadata=meta)  # fmt: skip

    return _Subject(pretrained.model, None, inputs, "fidelity", score, save, outputs)


def run_recipe(
    recipe: Recipe | str | Path,
    *,
    data_dir: str | None = None,
    out: str | None = None,
    model: nn.Module | None = None,
    console: Console | None = None,
    trust_factory: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    pretrained: str | None = None,
    texts: str | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Run a recipe's stages in order and write the compressed file if it names one.

    A recipe compresses either a model its factory builds, trained and scored on a
    labelled data set (accuracy after each stage is reported, never used: nothing is
    chosen on the test set), or a pretrained Hugging Face model (``pretrained``),
    compressed from unlabelled text and scored by *fidelity*: the mean cosine between
    its outputs and the original's on held-out text (``calibration.holdout``). A
    pretrained model is written as a folder (``model.dsz`` and the files needed to
    rebuild it; :mod:`deepshrink.huggingface`).

    Args:
        recipe: a :class:`Recipe`, a YAML path or a built-in name.
        data_dir: overrides the recipe's ``data_dir``.
        out: overrides the recipe's ``out``.
        model: start from this model instead of building ``recipe.model``.
        console: where tables go.
        trust_factory: allow a ``model`` factory outside ``deepshrink.models``;
            importing it runs its code, so a recipe from elsewhere cannot do
            that unless you say so (as :func:`deepshrink.load`).
        checkpoint: save the run's progress here (atomically) after every
            step of every stage and every ``checkpoint_every`` optimizer steps;
            removed once the output is written.
        resume: continue from ``checkpoint`` (after a crash or ``kill -9``):
            the finished steps are skipped, the one that was running continues
            from its last save, and the result is the one an uninterrupted run
            gives. Without it, an existing checkpoint is overwritten.
        checkpoint_every: optimizer steps between saves inside a training run.
        pretrained: overrides the recipe's ``pretrained`` (a Hugging Face folder or package).
        texts: overrides ``calibration.texts`` (one text per line).
        device: move the model there first (``"cuda"``); every stage then runs there.

    Returns:
        ``{"model", "metric", "stages": [{"stage", <metric>, "seconds", "cpu_seconds"}],
        "start_<metric>", <metric>, "out", "bytes"}`` where the metric is ``accuracy``
        (on the test split, or the held-out training examples with ``holdout``) or
        ``fidelity``.

    Raises:
        DeepShrinkError: an invalid recipe, a missing data set or model factory,
            an untrusted factory, an output folder that does not exist, a
            checkpoint of another run, a stage that needs labels on a pretrained model.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if pretrained is not None:
        recipe = dataclasses.replace(recipe, pretrained=pretrained, model=None)
    if texts is not None:
        recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, texts=texts))
    console = console or Console()
    out = out or recipe.out
    check_destination(out, folder=recipe.pretrained is not None)
    if resume and checkpoint is None:
        raise DeepShrinkError("resume needs the checkpoint to resume from")
    torch.manual_seed(recipe.seed)
    if recipe.pretrained is not None:
        subject = _pretrained_subject(recipe)
    else:
        subject = _built_subject(recipe, model, data_dir or recipe.data_dir, trust_factory)
    model, metric = subject.model, subject.metric
    if device is not None:
        model.to(check_device(device))
    teacher = copy.deepcopy(model).eval() if any(isinstance(s, DistillStage) for s in recipe.stages) else None
    ckpt = NO_CHECKPOINT
    if checkpoint is not None:
        ckpt = Checkpointer(checkpoint, model, every=checkpoint_every, resume=resume, fingerprint=fingerprint(recipe))
        console.print(f"checkpoint {checkpoint}: {ckpt.describe()}")
    run = Run(model, recipe, subject.train, subject.inputs, console, ckpt, teacher, subject.outputs)
    result: dict = {"model": model, "metric": metric, "stages": [], "out": None, "bytes": None}
    result[f"start_{metric}"] = ckpt.unit("evaluate", lambda: subject.score(model), save=False)
    encode = EncodeStage()
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, EncodeStage):
            encode = stage
            continue
        name = next(k for k, cls in STAGES.items() if type(stage) is cls)
        start, cpu_start = time.perf_counter(), time.process_time()
        run_stage(stage, run)
        stage_row = functools.partial(_stage_row, f"{i}: {name}", metric, subject.score, model, start, cpu_start)
        row = ckpt.unit(f"stage {i} ({name}) done", stage_row)  # a checkpoint at every stage boundary
        result["stages"].append(row)
        console.print(f"after {row['stage']}: {metric} {row[metric]:.4f} ({row['seconds']:.1f} s)")
    ckpt.finish()
    if encode.arithmetic == "int8":  # after every training stage, and again on a resumed run: hooks are not state
        start, cpu_start = time.perf_counter(), time.process_time()
        compute_in_int8_(model)
        result["stages"].append(_stage_row("encode: int8", metric, subject.score, model, start, cpu_start))
        console.print(f"in int8: {metric} {result['stages'][-1][metric]:.4f}")
    result[metric] = result["stages"][-1][metric] if result["stages"] else result[f"start_{metric}"]
    title = f"recipe {recipe.name or recipe.model or recipe.pretrained}: start {metric} {result[f'start_{metric}']:.4f}"
    console.print(rows_table(result["stages"], title))
    console.print(layer_table(model, "compressed layers"))
    if out is not None:
        result["bytes"] = subject.save(model, out, encode)
        result["out"] = out
        console.print(f"wrote {out}: {result['bytes']:,} bytes")
    ckpt.remove()
    return result


def _stage_row(
    stage: str, metric: str, score: Callable[[nn.Module], float], model: nn.Module, start: float, cpu_start: float
) -> dict:
    """A stage's row of the results: its score, its wall and CPU seconds (in this process, when resumed)."""
    return {
        "stage": stage,
        metric: score(model),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,  # all threads of this process; steadier on a busy machine
    }


def fingerprint(recipe: Recipe) -> str:
    """What a checkpoint must match to be resumed: the recipe, less where its data and output live."""
    fields = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("data_dir", "out")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def check_destination(out: str | os.PathLike | None, folder: bool = False) -> None:
    """Fail now, not after hours of training, when the output cannot be written where it is asked.

    Args:
        out: the file (or, with ``folder``, the folder) to write.
        folder: the output is a folder (a pretrained model's); an existing one is replaced.

    Raises:
        DeepShrinkError: its parent folder does not exist, or a file output is a folder
            (a folder output is a file).
    """
    if out is None:
        return
    path = Path(out)
    if not path.parent.is_dir():
        raise DeepShrinkError(f"cannot write {str(out)!r}: folder {str(path.parent)!r} does not exist; create it first")
    if path.is_dir() and not folder:
        raise DeepShrinkError(f"cannot write {str(out)!r}: it is a folder; give a file name")
    if path.is_file() and folder:
        raise DeepShrinkError(f"cannot write the folder {str(out)!r}: a file has that name")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here.

    Raises:
        DeepShrinkError: not a device name, or a CUDA device on a machine without one.
    """
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeepShrinkError(f"device={device!r} is not a device (cpu, cuda, cuda:1, ...): {err}") from None
    if checked.type == "cuda" and not torch.cuda.is_available():
        raise DeepShrinkError(f"device={device!r}: no CUDA device here (torch.cuda.is_available() is False)")
    return checked


def check_inputs(model: nn.Module, data: Data, what: str) -> None:
    """Run two samples through ``model``: a model that cannot take the data fails here, by name.

    Raises:
        DeepShrinkError: the forward pass fails (an input size the model was not built for).
    """
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(data[0][:2])
    except RuntimeError as err:
        raise DeepShrinkError(f"{type(model).__name__} cannot take the inputs of {what} (shape "
                              f"{tuple(data[0].shape[1:])}): {err}; build it for them (for a LeNet-300-100 on "
                              f"digits: --model-kwargs '{{\"in_features\": 64}}')") from err  # fmt: skip
    finally:
        model.train(was_training)


def _save(model: nn.Module, out: str, recipe: Recipe, encode: EncodeStage) -> int:
    return save(
        model,
        out,
        factory=model_factory(recipe.model),
        factory_kwargs=recipe.model_kwargs or None,
        metadata={"recipe": recipe.name or recipe.model, "seed": recipe.seed},
        **encode.options(),
    )
