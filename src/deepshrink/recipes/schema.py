"""Declarative compression recipes: a YAML file naming the model, data and stages.

A recipe is data, never code: it is read with ``yaml.safe_load`` and checked
against the tables below before anything runs, and every unknown key or bad
value raises :class:`~deepshrink.errors.DeepShrinkError` naming the key (with
its place in the file, e.g. ``stages[1].prune.granularity``) and the allowed
values. The schema is documented in ``docs/recipes.md``; examples ship in
``deepshrink/recipes/builtin/*.yaml`` and can be named without their path.

Examples:
    >>> recipe = parse_recipe({"model": "lenet-300-100", "data": "digits",
    ...     "stages": [{"prune": {"sparsity": 0.9, "steps": 2}}, {"share": {"bits": 4}}]})
    >>> [type(s).__name__ for s in recipe.stages]
    ['PruneStage', 'ShareStage']
    >>> parse_recipe({"model": "lenet-5", "stages": [{"prune": {"sparsty": 0.9}}]})
    Traceback (most recent call last):
    ...
    deepshrink.errors.DeepShrinkError: stages[0].prune: unknown key 'sparsty'; allowed: ...
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch
import yaml
from rich.console import Console
from torch import nn

from deepshrink.errors import DeepShrinkError
from deepshrink.fileformat.codec import SAFE_FACTORY_MODULE
from deepshrink.compress.groups import GRANULARITIES, prune_groups_
from deepshrink.compress.prune import check_sparsity, prune_
from deepshrink.compress.quantize import INITS, check_bits, share_weights_
from deepshrink.report import layer_table, rows_table
from deepshrink.compress.schedules import check_ramp, gradual_prune, iterative_levels
from deepshrink.compress.sensitivity import DEFAULT_SPARSITIES, check_sparsities, sensitivity_scan
from deepshrink.compress.ternary import DEFAULT_THRESHOLD, check_threshold, ternarize_
from deepshrink.compress.train import OPTIMIZERS, SCHEDULES, TrainConfig, evaluate, fit, iterative_prune

MODELS = {"lenet-300-100": "deepshrink.models:lenet_300_100", "lenet-5": "deepshrink.models:lenet_5"}
DATASETS = ("mnist", "digits")
PRUNE_SCHEDULES = ("iterative", "gradual")
SCOPES = ("layer", "global")
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

Data = tuple[torch.Tensor, torch.Tensor]


# -- value checks: each names the key and what it accepts --------------------------------------

def _coerce(value: object) -> object:
    """Numeric strings such as ``"1e-3"`` (YAML 1.1 reads them as text) become floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _number(value: object, key: str, low: float | None = None, high: float | None = None,
            integer: bool = False, low_open: bool = False) -> float | int:
    """A number in range, else an error naming ``key``, the value and the range."""
    value = _coerce(value)
    kind = "an integer" if integer else "a number"
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
        raise DeepShrinkError(f"{key}={value!r} must be {kind} {' and '.join(b for b in bounds if b)}".rstrip())
    return int(value) if integer else float(value)


def _choice(value: object, key: str, choices: tuple) -> object:
    if value not in choices:
        raise DeepShrinkError(f"{key}={value!r} must be one of {', '.join(map(str, choices))}")
    return value


def _per_layer(value: object, key: str, check) -> object:
    """A scalar, or ``{pattern: scalar}``, each scalar passed through ``check(v, key)``."""
    if isinstance(value, dict):
        if not value:
            raise DeepShrinkError(f"{key} is an empty mapping; give a value or {{layer pattern: value}}")
        out = {}
        for pattern, v in value.items():
            if not isinstance(pattern, str):
                raise DeepShrinkError(f"{key}: layer pattern {pattern!r} must be a string")
            out[pattern] = check(v, f"{key}[{pattern}]")
        return out
    return check(value, key)


def _patterns(value: object, key: str) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(p, str) for p in items):
        raise DeepShrinkError(f"{key}={value!r} must be a layer pattern or a non-empty list of them")
    return items


def _text(value: object, key: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise DeepShrinkError(f"{key}={value!r} must be a non-empty string")
    return value


def _sparsity(v: object, key: str) -> float:
    return check_sparsity(_coerce(v), key)


# -- stages ---------------------------------------------------------------------------------------

@dataclass
class TrainStage:
    """Train (the dense model, or any model as it is): ``train:`` in a recipe."""

    epochs: float = 1.0
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4  # L2 was best after retraining in Deep Compression
    lr_schedule: str | None = None  # None, cosine or step
    skippable: ClassVar[bool] = False  # may epochs be 0 (the stage's transform without training)?

    def __post_init__(self) -> None:
        self.epochs = _number(self.epochs, "epochs", 0, low_open=not self.skippable)
        self.lr = _number(self.lr, "lr", 0, low_open=True)
        self.momentum = _number(self.momentum, "momentum", 0)
        self.weight_decay = _number(self.weight_decay, "weight_decay", 0)
        _choice(self.optimizer, "optimizer", OPTIMIZERS)
        _choice(self.lr_schedule, "lr_schedule", SCHEDULES)

    def config(self, recipe: "Recipe") -> TrainConfig:
        """The :class:`TrainConfig` of this stage under ``recipe``'s batch size, seed and step cap."""
        return TrainConfig(epochs=self.epochs, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, optimizer=self.optimizer, schedule=self.lr_schedule,
                           batch_size=recipe.batch_size, seed=recipe.seed, max_steps=recipe.max_steps)

    def run(self, model: nn.Module, train: Data, recipe: "Recipe", console: Console) -> None:
        fit(model, train, self.config(recipe), description=type(self).__name__.removesuffix("Stage").lower())


@dataclass
class FinetuneStage(TrainStage):
    """Fine-tune with whatever masks and codebooks are installed: ``finetune:``."""

    lr: float = 0.001  # the paper retrains at 1/10 of the original rate


@dataclass
class SensitivitySpec:
    """``prune: {sensitivity: {...}}``: choose per-layer sparsities by a sensitivity scan."""

    max_drop: float = 0.01  # accuracy (not percent) each layer may lose when pruned alone
    sparsities: list[float] = field(default_factory=lambda: list(DEFAULT_SPARSITIES))
    samples: int = 5000  # measured on the last `samples` training examples, never the test set
    plot: str | None = None  # PNG of the curves

    def __post_init__(self) -> None:
        self.max_drop = _number(self.max_drop, "max_drop", 0, 1)
        if not isinstance(self.sparsities, list):
            raise DeepShrinkError(f"sparsities={self.sparsities!r} must be a list of sparsities in [0, 1)")
        self.sparsities = list(check_sparsities(_coerce(s) for s in self.sparsities))
        self.samples = _number(self.samples, "samples", 1, integer=True)
        _text(self.plot, "plot")

    def propose(self, model: nn.Module, train: Data, granularity: object, layers: list[str] | None,
                console: Console) -> dict[str, float]:
        """Scan ``model`` on the tail of ``train`` and return the per-layer sparsities."""
        held = (train[0][-self.samples:], train[1][-self.samples:])
        scan = sensitivity_scan(model, held, self.sparsities, granularity=granularity, layers=layers)
        console.print(scan.table())
        if self.plot:
            scan.plot(self.plot, self.max_drop)
        proposal = scan.propose(self.max_drop)
        console.print(f"sensitivity (max drop {self.max_drop:g}) proposes: {proposal}")
        return proposal


@dataclass
class PruneStage(TrainStage):
    """Prune, with retraining: ``prune:``.

    ``epochs`` is the retraining after each round (iterative) or the length of
    the one run the sparsity ramps over (gradual).
    """

    lr: float = 0.001
    sparsity: float | dict[str, float] | None = None
    quality: float | dict[str, float] | None = None  # the paper's |w| <= quality * std rule instead
    sensitivity: SensitivitySpec | None = None  # or per-layer sparsities from a sensitivity scan
    schedule: str = "iterative"
    steps: int = 3  # iterative rounds
    every: int = 50  # gradual: optimizer steps between prunings
    ramp: float = 0.75  # gradual: share of the run over which sparsity rises
    granularity: str | dict[str, str] = "fine"
    scope: str = "layer"
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [k for k in ("sparsity", "quality", "sensitivity") if getattr(self, k) is not None]
        if len(given) != 1:
            raise DeepShrinkError(f"give exactly one of sparsity (fraction removed), quality (x std threshold) or "
                                  f"sensitivity (scan settings); got {', '.join(given) or 'none'}")
        if self.sparsity is not None:
            self.sparsity = _per_layer(self.sparsity, "sparsity", _sparsity)
        elif self.quality is not None:
            self.quality = _per_layer(self.quality, "quality", lambda v, k: _number(v, k, 0))
        elif not isinstance(self.sensitivity, SensitivitySpec):
            self.sensitivity = _build(SensitivitySpec, self.sensitivity, "sensitivity")
        _choice(self.schedule, "schedule", PRUNE_SCHEDULES)
        self.steps = _number(self.steps, "steps", 1, integer=True)
        self.every = _number(self.every, "every", 1, integer=True)
        self.ramp = check_ramp(_number(self.ramp, "ramp", 0, 1, low_open=True))
        self.granularity = _per_layer(self.granularity, "granularity", lambda v, k: _choice(v, k, GRANULARITIES))
        _choice(self.scope, "scope", SCOPES)
        self.layers = _patterns(self.layers, "layers")
        coarse = self.granularity != "fine"
        if self.quality is not None and (coarse or self.schedule != "iterative"):
            raise DeepShrinkError("quality works with schedule: iterative and granularity: fine; "
                                  "use sparsity for gradual or coarse-grained pruning")
        if self.scope == "global" and (coarse or self.sensitivity or isinstance(self.sparsity or self.quality, dict)):
            raise DeepShrinkError("scope: global needs granularity: fine and one scalar sparsity or quality")

    def run(self, model: nn.Module, train: Data, recipe: "Recipe", console: Console) -> None:
        if self.sensitivity is not None:
            proposal = self.sensitivity.propose(model, train, self.granularity, self.layers, console)
            dataclasses.replace(self, sensitivity=None, sparsity=proposal).run(model, train, recipe, console)
        elif self.schedule == "gradual":
            gradual_prune(model, self.sparsity, train, self.config(recipe), every=self.every,
                          granularity=self.granularity, ramp=self.ramp, layers=self.layers)
        elif self.quality is not None:
            iterative_prune(model, [self.quality] * self.steps, train, self.config(recipe),
                            prune_fn=_prune_by_quality, scope=self.scope, layers=self.layers)
        elif self.scope == "global":
            iterative_prune(model, iterative_levels(self.sparsity, self.steps), train, self.config(recipe),
                            scope="global", layers=self.layers)
        else:
            iterative_prune(model, iterative_levels(self.sparsity, self.steps), train, self.config(recipe),
                            prune_fn=prune_groups_, granularity=self.granularity, layers=self.layers)


def _prune_by_quality(model: nn.Module, quality: object, **kwargs: object) -> list:
    return prune_(model, quality=quality, **kwargs)


@dataclass
class ShareStage(TrainStage):
    """k-means weight sharing, then centroid fine-tuning: ``share:``."""

    lr: float = 0.001
    skippable: ClassVar[bool] = True
    bits: int | dict[str, int] | None = None  # None: 8 for conv, 5 for fully connected
    init: str = "linear"  # the paper's choice among random, density, linear
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits is not None:
            self.bits = _per_layer(self.bits, "bits", lambda v, k: check_bits(_number(v, k, 1, 16, integer=True), k))
        _choice(self.init, "init", INITS)
        self.layers = _patterns(self.layers, "layers")

    def run(self, model: nn.Module, train: Data, recipe: "Recipe", console: Console) -> None:
        share_weights_(model, self.bits, init=self.init, seed=recipe.seed, layers=self.layers)
        if self.epochs > 0:
            fit(model, train, self.config(recipe), description="fine-tune centroids")


@dataclass
class TernaryStage(TrainStage):
    """Trained ternary quantization, then training of scales and latent weights: ``ternary:``."""

    lr: float = 0.001
    skippable: ClassVar[bool] = True
    optimizer: str = "adam"  # Wp/Wn get sums of ~all gradients of a layer; SGD's fixed step makes them explode
    threshold: float = DEFAULT_THRESHOLD  # t: |w| <= t * max|w| becomes 0
    layers: list[str] | None = None  # the paper keeps the first and last layers in full precision

    def __post_init__(self) -> None:
        super().__post_init__()
        self.threshold = check_threshold(_coerce(self.threshold))
        self.layers = _patterns(self.layers, "layers")

    def run(self, model: nn.Module, train: Data, recipe: "Recipe", console: Console) -> None:
        ternarize_(model, self.threshold, layers=self.layers)
        if self.epochs > 0:
            fit(model, train, self.config(recipe), description="train ternary")


@dataclass
class EncodeStage:
    """How the output file is written: ``encode:`` (options of ``deepshrink.fileformat.codec.save``)."""

    coder: str = "huffman"
    index_bits: int | dict[str, int] | None = None  # None: 8 for conv, 5 for fully connected
    layout: str = "auto"
    codebook_dtype: str = "float32"

    def __post_init__(self) -> None:
        from deepshrink.fileformat.codec import EncodeOptions  # it checks the values and names the allowed ones

        if self.index_bits is not None:
            self.index_bits = _per_layer(self.index_bits, "index_bits", lambda v, k: _number(v, k, 1, 16, integer=True))
        EncodeOptions(coder=self.coder, index_bits=self.index_bits, layout=self.layout,
                      codebook_dtype=self.codebook_dtype)

    def options(self) -> dict:
        return dataclasses.asdict(self)


STAGES: dict[str, type] = {
    "train": TrainStage,
    "prune": PruneStage,
    "share": ShareStage,
    "ternary": TernaryStage,
    "finetune": FinetuneStage,
    "encode": EncodeStage,
}


@dataclass
class Recipe:
    """A whole recipe: what to compress, on which data, and the stages in order."""

    model: str
    stages: list = field(default_factory=list)
    model_kwargs: dict = field(default_factory=dict)
    state_dict: str | None = None  # trained weights (torch.save of a state_dict) to start from
    data: str = "mnist"
    data_dir: str | None = None  # default $DEEPSHRINK_DATA
    out: str | None = None  # the compressed file to write
    seed: int = 0
    batch_size: int = 64
    max_steps: int | None = None  # cap every training stage (quick runs, tests)
    name: str | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        _text(self.model, "model", optional=False)
        if not isinstance(self.model_kwargs, dict):
            raise DeepShrinkError(f"model_kwargs={self.model_kwargs!r} must be a mapping of keyword arguments")
        for key in ("state_dict", "data_dir", "out", "name", "description"):
            _text(getattr(self, key), key)
        _choice(self.data, "data", DATASETS)
        self.seed = _number(self.seed, "seed", 0, integer=True)
        self.batch_size = _number(self.batch_size, "batch_size", 1, integer=True)
        if self.max_steps is not None:
            self.max_steps = _number(self.max_steps, "max_steps", 1, integer=True)
        if not isinstance(self.stages, list) or not self.stages:
            raise DeepShrinkError(f"stages must be a non-empty list of {{stage: settings}}; stages: {', '.join(STAGES)}")
        self.stages = [s if isinstance(s, tuple(STAGES.values())) else _parse_stage(s, i)
                       for i, s in enumerate(self.stages)]
        encodes = [i for i, s in enumerate(self.stages) if isinstance(s, EncodeStage)]
        if encodes and encodes != [len(self.stages) - 1]:
            raise DeepShrinkError("encode must be the last stage, and appear once")


def _build(cls: type, raw: object, where: str) -> object:
    """``cls(**raw)`` with unknown keys and bad values reported at ``where`` ("" for the top level)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DeepShrinkError(f"{where} must be a mapping of settings, not {type(raw).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in allowed:
            raise DeepShrinkError(f"{where or 'recipe'}: unknown key {key!r}; allowed: {', '.join(allowed)}")
    if not where:
        return cls(**raw)
    try:
        return cls(**raw)
    except DeepShrinkError as err:
        raise DeepShrinkError(f"{where}: {err}") from None


def _parse_stage(raw: object, index: int) -> object:
    where = f"stages[{index}]"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise DeepShrinkError(f"{where} must be a mapping with one key, the stage: one of {', '.join(STAGES)}")
    (kind, settings), = raw.items()
    if kind not in STAGES:
        raise DeepShrinkError(f"{where}: unknown stage {kind!r}; allowed: {', '.join(STAGES)}")
    return _build(STAGES[kind], settings, f"{where}.{kind}")


def parse_recipe(raw: object) -> Recipe:
    """Check a recipe already read as data (a mapping) and build its stages.

    Raises:
        DeepShrinkError: an unknown key or stage, or a bad value, named with its place.
    """
    if not isinstance(raw, dict):
        raise DeepShrinkError(f"a recipe must be a mapping with keys {', '.join(f.name for f in dataclasses.fields(Recipe))}")
    for key in ("model", "stages"):
        if key not in raw:
            raise DeepShrinkError(f"recipe: missing key {key!r}")
    return _build(Recipe, raw, "")


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with deepshrink (usable in place of a path)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_recipe(source: str | Path) -> Recipe:
    """Read and check a recipe: a YAML file path, or the name of a built-in recipe.

    Raises:
        DeepShrinkError: no such file or built-in, the YAML does not parse, or the
            recipe is invalid.
    """
    path = Path(source)
    if not path.is_file():
        builtin = BUILTIN_DIR / f"{source}.yaml"
        if not builtin.is_file():
            raise DeepShrinkError(f"recipe {str(source)!r} is neither a file nor a built-in recipe; "
                                  f"built-ins: {', '.join(builtin_recipes())}")
        path = builtin
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DeepShrinkError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_recipe(raw)
    except DeepShrinkError as err:
        raise DeepShrinkError(f"{path}: {err}") from None


# -- running ------------------------------------------------------------------------------------

def build_model(spec: str, kwargs: dict | None = None) -> nn.Module:
    """A model from one of :data:`MODELS`' names or a user's ``module:factory``.

    Raises:
        DeepShrinkError: neither, or the factory cannot be imported.
    """
    target = MODELS.get(spec, spec)
    if ":" not in target:
        raise DeepShrinkError(f"model {spec!r} is neither one of {', '.join(MODELS)} nor 'module:factory'")
    module_name, factory = target.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), factory)
    except (ImportError, AttributeError) as err:
        raise DeepShrinkError(f"cannot import model factory {target!r}: {err}") from err
    return fn(**(kwargs or {}))


def load_data(name: str, data_dir: str | None, split: str) -> Data:
    """``(inputs, labels)`` of one of :data:`DATASETS`.

    Raises:
        DeepShrinkError: an unknown data set, or its files are missing.
    """
    if name == "digits":
        from deepshrink.data.digits import load_digits
        return load_digits(split)
    if name == "mnist":
        from deepshrink.data.mnist import load_mnist
        return load_mnist(data_dir, split)
    raise DeepShrinkError(f"data set {name!r} must be one of {', '.join(DATASETS)}")


def run_recipe(
    recipe: Recipe | str | Path,
    *,
    data_dir: str | None = None,
    out: str | None = None,
    model: nn.Module | None = None,
    console: Console | None = None,
    trust_factory: bool = False,
) -> dict:
    """Run a recipe's stages in order and write the compressed file if it names one.

    Args:
        recipe: a :class:`Recipe`, a YAML path or a built-in name.
        data_dir: overrides the recipe's ``data_dir``.
        out: overrides the recipe's ``out``.
        model: start from this model instead of building ``recipe.model``.
        console: where tables go.
        trust_factory: allow a ``model`` factory outside ``deepshrink.models``;
            importing it runs its code, so a recipe from elsewhere cannot do
            that unless you say so (as :func:`deepshrink.fileformat.codec.load`).

    Returns:
        ``{"model", "stages": [{"stage", "accuracy", "seconds"}], "start_accuracy",
        "accuracy", "out", "bytes"}``.

    Raises:
        DeepShrinkError: an invalid recipe, a missing data set or model factory,
            an untrusted factory.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    console = console or Console()
    data_dir = data_dir or recipe.data_dir
    out = out or recipe.out
    torch.manual_seed(recipe.seed)
    if model is None:
        factory = MODELS.get(recipe.model, recipe.model)
        if not trust_factory and factory.split(":", 1)[0] != SAFE_FACTORY_MODULE:
            raise DeepShrinkError(f"the recipe names model factory {recipe.model!r}; importing it runs its code, so "
                                  f"only {', '.join(MODELS)} are built unless you trust the recipe "
                                  f"(--trust-factory, trust_factory=True) or pass model=")
        model = build_model(recipe.model, recipe.model_kwargs)
        if recipe.state_dict:
            model.load_state_dict(torch.load(recipe.state_dict, map_location="cpu", weights_only=True))
    train, test = load_data(recipe.data, data_dir, "train"), load_data(recipe.data, data_dir, "test")
    result: dict = {"model": model, "stages": [], "start_accuracy": evaluate(model, test), "out": None, "bytes": None}
    encode = EncodeStage()
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, EncodeStage):
            encode = stage
            continue
        name = next(k for k, cls in STAGES.items() if type(stage) is cls)
        start = time.perf_counter()
        stage.run(model, train, recipe, console)
        row = {"stage": f"{i}: {name}", "accuracy": evaluate(model, test), "seconds": time.perf_counter() - start}
        result["stages"].append(row)
        console.print(f"after {row['stage']}: accuracy {row['accuracy']:.4f} ({row['seconds']:.1f} s)")
    result["accuracy"] = result["stages"][-1]["accuracy"] if result["stages"] else result["start_accuracy"]
    console.print(rows_table(result["stages"], f"recipe {recipe.name or recipe.model}: start accuracy "
                                               f"{result['start_accuracy']:.4f}"))
    console.print(layer_table(model, "compressed layers"))
    if out is not None:
        result["bytes"] = _save(model, out, recipe, encode)
        result["out"] = out
        console.print(f"wrote {out}: {result['bytes']:,} bytes")
    return result


def _save(model: nn.Module, out: str, recipe: Recipe, encode: EncodeStage) -> int:
    from deepshrink.fileformat.codec import save

    factory = MODELS.get(recipe.model, recipe.model)
    return save(model, out, factory=factory, factory_kwargs=recipe.model_kwargs or None,
                metadata={"recipe": recipe.name or recipe.model}, **encode.options())
