"""Running a recipe: each stage's compression step and training, in order, then the file.

:func:`run_recipe` builds the model (under the one factory trust policy,
:func:`deepshrink.fileformat.model_io.build_model`), loads the data, runs every
stage of a :class:`~deepshrink.recipes.schema.Recipe` and writes the compressed
file with the recipe's ``encode`` options.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from deepshrink.compress.checkpoint import NO_CHECKPOINT, Checkpointer
from deepshrink.compress.groups import prune_groups_
from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import share_weights_
from deepshrink.compress.schedules import gradual_prune, iterative_levels
from deepshrink.compress.sensitivity import sensitivity_scan
from deepshrink.compress.ternary import ternarize_
from deepshrink.compress.train import TrainConfig, evaluate, fit, iterative_prune
from deepshrink.data.registry import Data, load_data
from deepshrink.errors import DeepShrinkError
from deepshrink.fileformat.model_io import build_model, load_state_dict_file, save
from deepshrink.models.registry import model_factory
from deepshrink.recipes.schema import (
    STAGES,
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


def _train(
    stage: TrainStage, model: nn.Module, train: Data, recipe: Recipe, console: Console, ckpt: Checkpointer
) -> None:
    name = type(stage).__name__.removesuffix("Stage").lower()
    fit(model, train, train_config(stage, recipe), description=name, checkpoint=ckpt)


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


def _prune(
    stage: PruneStage, model: nn.Module, train: Data, recipe: Recipe, console: Console, ckpt: Checkpointer
) -> None:
    if stage.sensitivity is not None:
        scan = functools.partial(propose_sparsities, stage.sensitivity, model, train, stage.granularity, stage.layers)
        proposal = ckpt.unit("sensitivity scan", lambda: scan(console))
        _prune(dataclasses.replace(stage, sensitivity=None, sparsity=proposal), model, train, recipe, console, ckpt)
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


def _share(
    stage: ShareStage, model: nn.Module, train: Data, recipe: Recipe, console: Console, ckpt: Checkpointer
) -> None:
    share = functools.partial(share_weights_, model, stage.bits, init=stage.init, seed=recipe.seed, layers=stage.layers)
    ckpt.unit("share weights", lambda: len(share()))
    if stage.epochs > 0:
        fit(model, train, train_config(stage, recipe), description="fine-tune centroids", checkpoint=ckpt)


def _ternary(
    stage: TernaryStage, model: nn.Module, train: Data, recipe: Recipe, console: Console, ckpt: Checkpointer
) -> None:
    ckpt.unit("ternarize", lambda: len(ternarize_(model, stage.threshold, layers=stage.layers)))
    if stage.epochs > 0:
        fit(model, train, train_config(stage, recipe), description="train ternary", checkpoint=ckpt)


# How each stage runs, by its exact class (every training stage derives from TrainStage).
RUNNERS: dict[type, Callable[..., None]] = {
    TrainStage: _train,
    FinetuneStage: _train,
    PruneStage: _prune,
    ShareStage: _share,
    TernaryStage: _ternary,
}


def run_stage(
    stage: TrainStage,
    model: nn.Module,
    train: Data,
    recipe: Recipe,
    console: Console,
    checkpoint: Checkpointer | None = None,
) -> None:
    """Run one (non-encode) stage of ``recipe`` on ``model``, in place; its steps are units of ``checkpoint``'s run."""
    RUNNERS[type(stage)](stage, model, train, recipe, console, checkpoint or NO_CHECKPOINT)


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
) -> dict:
    """Run a recipe's stages in order and write the compressed file if it names one.

    Accuracy after each stage is reported, never used: nothing is chosen on the test set.

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

    Returns:
        ``{"model", "stages": [{"stage", "accuracy", "seconds", "cpu_seconds"}],
        "start_accuracy", "accuracy", "out", "bytes"}``; accuracies are on the test
        split, or on the held-out training examples when the recipe sets ``holdout``.

    Raises:
        DeepShrinkError: an invalid recipe, a missing data set or model factory,
            an untrusted factory, an output folder that does not exist, a
            checkpoint of another run.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    console = console or Console()
    data_dir = data_dir or recipe.data_dir
    out = out or recipe.out
    check_destination(out)
    if resume and checkpoint is None:
        raise DeepShrinkError("resume needs the checkpoint to resume from")
    torch.manual_seed(recipe.seed)
    if model is None:
        spec = {"factory": model_factory(recipe.model), "kwargs": recipe.model_kwargs}
        model = build_model(spec, trust_factory, source="the recipe")
        if recipe.state_dict:
            load_state_dict_file(model, recipe.state_dict)
    train, test = recipe_data(recipe, data_dir)
    check_inputs(model, test, f"data set {recipe.data!r}")
    ckpt = NO_CHECKPOINT
    if checkpoint is not None:
        ckpt = Checkpointer(checkpoint, model, every=checkpoint_every, resume=resume, fingerprint=fingerprint(recipe))
        console.print(f"checkpoint {checkpoint}: {ckpt.describe()}")
    result: dict = {"model": model, "stages": [], "out": None, "bytes": None}
    result["start_accuracy"] = ckpt.unit("evaluate", lambda: evaluate(model, test), save=False)
    encode = EncodeStage()
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, EncodeStage):
            encode = stage
            continue
        name = next(k for k, cls in STAGES.items() if type(stage) is cls)
        start, cpu_start = time.perf_counter(), time.process_time()
        run_stage(stage, model, train, recipe, console, ckpt)
        stage_row = functools.partial(_stage_row, f"{i}: {name}", model, test, start, cpu_start)
        row = ckpt.unit(f"stage {i} ({name}) done", stage_row)  # a checkpoint at every stage boundary
        result["stages"].append(row)
        console.print(f"after {row['stage']}: accuracy {row['accuracy']:.4f} ({row['seconds']:.1f} s)")
    ckpt.finish()
    result["accuracy"] = result["stages"][-1]["accuracy"] if result["stages"] else result["start_accuracy"]
    console.print(
        rows_table(
            result["stages"], f"recipe {recipe.name or recipe.model}: start accuracy {result['start_accuracy']:.4f}"
        )
    )
    console.print(layer_table(model, "compressed layers"))
    if out is not None:
        result["bytes"] = _save(model, out, recipe, encode)
        result["out"] = out
        console.print(f"wrote {out}: {result['bytes']:,} bytes")
    ckpt.remove()
    return result


def _stage_row(stage: str, model: nn.Module, test: Data, start: float, cpu_start: float) -> dict:
    """A stage's row of the results: its accuracy, its wall and CPU seconds (in this process, when resumed)."""
    return {
        "stage": stage,
        "accuracy": evaluate(model, test),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,  # all threads of this process; steadier on a busy machine
    }


def fingerprint(recipe: Recipe) -> str:
    """What a checkpoint must match to be resumed: the recipe, less where its data and output live."""
    fields = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("data_dir", "out")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def check_destination(out: str | os.PathLike | None) -> None:
    """Fail now, not after hours of training, when the output file cannot be written where it is asked.

    Raises:
        DeepShrinkError: its folder does not exist, or it is a folder.
    """
    if out is None:
        return
    path = Path(out)
    if not path.parent.is_dir():
        raise DeepShrinkError(f"cannot write {str(out)!r}: folder {str(path.parent)!r} does not exist; create it first")
    if path.is_dir():
        raise DeepShrinkError(f"cannot write {str(out)!r}: it is a folder; give a file name")


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
