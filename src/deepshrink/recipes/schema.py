"""The recipe schema: a YAML file naming the model, data and stages, checked as data.

A recipe is data, never code: it is read with ``yaml.safe_load`` and checked
against the tables below before anything runs, and every unknown key or bad
value raises :class:`~deepshrink.errors.DeepShrinkError` naming the key (with
its place in the file, e.g. ``stages[1].prune.granularity``) and the allowed
values. The schema is documented in ``docs/recipes.md``; examples ship in
``deepshrink/recipes/builtin/*.yaml`` and can be named without their path.
:mod:`deepshrink.recipes.runner` runs a checked recipe.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from deepshrink.compress.groups import GRANULARITIES
from deepshrink.compress.oneshot import METHODS
from deepshrink.compress.prune import check_sparsity
from deepshrink.compress.quantize import INITS, check_bits
from deepshrink.compress.schedules import check_ramp
from deepshrink.compress.sensitivity import DEFAULT_SPARSITIES, check_sparsities
from deepshrink.compress.ternary import DEFAULT_THRESHOLD, check_threshold
from deepshrink.compress.train import OPTIMIZERS, SCHEDULES
from deepshrink.data.augment import RandomAffine
from deepshrink.data.registry import DATASETS
from deepshrink.errors import DeepShrinkError
from deepshrink.fileformat.codec import EncodeOptions
from deepshrink.tensor import ARITHMETICS

PRUNE_SCHEDULES = ("iterative", "gradual")
PRUNE_METHODS = ("magnitude", *METHODS)
SHARE_METHODS = ("kmeans", "calibrated")
SCOPES = ("layer", "global")
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


# -- value checks: each names the key and what it accepts --------------------------------------


def _coerce(value: object) -> object:
    """Numeric strings such as ``"1e-3"`` (YAML 1.1 reads them as text) become floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _number(
    value: object,
    key: str,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
    low_open: bool = False,
) -> float | int:
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
        bounds = [
            f"{'>' if low_open else '>='} {low}" if low is not None else "",
            f"<= {high}" if high is not None else "",
        ]
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
    augment: RandomAffine | None = None  # random shift / rotate / scale of each training image
    skippable: ClassVar[bool] = False  # may epochs be 0 (the stage's transform without training)?

    def __post_init__(self) -> None:
        if self.augment is not None and not isinstance(self.augment, RandomAffine):
            self.augment = _build(RandomAffine, self.augment, "augment")
        self.epochs = _number(self.epochs, "epochs", 0, low_open=not self.epochs_optional())
        self.lr = _number(self.lr, "lr", 0, low_open=True)
        self.momentum = _number(self.momentum, "momentum", 0)
        self.weight_decay = _number(self.weight_decay, "weight_decay", 0)
        _choice(self.optimizer, "optimizer", OPTIMIZERS)
        _choice(self.lr_schedule, "lr_schedule", SCHEDULES)

    def epochs_optional(self) -> bool:
        return self.skippable


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
    method: str = "magnitude"  # or wanda / sparsegpt: one shot from calibration inputs, no labels
    layers: list[str] | None = None

    def epochs_optional(self) -> bool:
        return self.method != "magnitude"  # one-shot pruning needs no retraining

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice(self.method, "method", PRUNE_METHODS)
        if self.method != "magnitude" and (
            self.sparsity is None or self.scope != "layer" or self.granularity != "fine" or self.schedule != "iterative"
        ):
            raise DeepShrinkError(
                f"method: {self.method} prunes once, per layer, weight by weight: give sparsity (a number or "
                "{pattern: sparsity}), with the default scope, granularity and schedule"
            )
        given = [k for k in ("sparsity", "quality", "sensitivity") if getattr(self, k) is not None]
        if len(given) != 1:
            raise DeepShrinkError(
                f"give exactly one of sparsity (fraction removed), quality (x std threshold) or "
                f"sensitivity (scan settings); got {', '.join(given) or 'none'}"
            )
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
            raise DeepShrinkError(
                "quality works with schedule: iterative and granularity: fine; "
                "use sparsity for gradual or coarse-grained pruning"
            )
        if self.scope == "global" and (coarse or self.sensitivity or isinstance(self.sparsity or self.quality, dict)):
            raise DeepShrinkError("scope: global needs granularity: fine and one scalar sparsity or quality")


@dataclass
class ShareStage(TrainStage):
    """k-means weight sharing, then centroid fine-tuning: ``share:``."""

    lr: float = 0.001
    skippable: ClassVar[bool] = True
    bits: int | dict[str, int] | None = None  # None: 8 for conv, 5 for fully connected
    init: str = "linear"  # the paper's choice among random, density, linear
    method: str = "kmeans"  # or calibrated: importance-weighted k-means and GPTQ's error feedback
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits is not None:
            self.bits = _per_layer(self.bits, "bits", lambda v, k: check_bits(_number(v, k, 1, 16, integer=True), k))
        _choice(self.init, "init", INITS)
        _choice(self.method, "method", SHARE_METHODS)
        self.layers = _patterns(self.layers, "layers")


@dataclass
class DistillStage:
    """Fine-tuning without labels against the original model: ``distill:`` (see ``compress.distill``)."""

    steps: int = 200
    lr: float = 2e-5
    quantization_aware: bool = True
    hidden: list[str] | None = None  # module names (globs) whose outputs are matched too
    hidden_weight: float = 0.1
    frozen: list[str] | None = None  # module names (globs) that do not train
    int8_inputs: bool = False  # Linear inputs rounded to int8 per token while training (for encode: arithmetic: int8)

    def __post_init__(self) -> None:
        self.steps = _number(self.steps, "steps", 1, integer=True)
        self.lr = _number(self.lr, "lr", 0, low_open=True)
        for key in ("quantization_aware", "int8_inputs"):
            if not isinstance(getattr(self, key), bool):
                raise DeepShrinkError(f"{key}={getattr(self, key)!r} must be true or false")
        self.hidden = _patterns(self.hidden, "hidden")
        self.hidden_weight = _number(self.hidden_weight, "hidden_weight", 0)
        self.frozen = _patterns(self.frozen, "frozen")


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


@dataclass
class EncodeStage:
    """How the output file is written: ``encode:`` (options of :func:`deepshrink.save`, and ``arithmetic``)."""

    coder: str = "huffman"
    index_bits: int | dict[str, int] | None = None  # None: 8 for conv, 5 for fully connected
    layout: str = "auto"
    codebook_dtype: str = "float32"
    array_dtype: str = "float32"  # float16: plain arrays (biases, LayerNorm, ...) at half their bytes
    # int8: the compressed Linear / Conv layers declared to compute in int8 (deepshrink.compress.int8), scored so
    arithmetic: str = "float32"

    def __post_init__(self) -> None:
        if self.index_bits is not None:
            self.index_bits = _per_layer(self.index_bits, "index_bits", lambda v, k: _number(v, k, 1, 16, integer=True))
        if self.arithmetic not in ARITHMETICS:
            raise DeepShrinkError(f"encode: arithmetic {self.arithmetic!r} is not one of {', '.join(ARITHMETICS)}")
        # EncodeOptions checks the values and names the allowed ones
        EncodeOptions(**self.options())

    def options(self) -> dict:
        """The options of :func:`deepshrink.save`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "arithmetic"}


STAGES: dict[str, type] = {
    "train": TrainStage,
    "prune": PruneStage,
    "share": ShareStage,
    "ternary": TernaryStage,
    "finetune": FinetuneStage,
    "distill": DistillStage,
    "encode": EncodeStage,
}


@dataclass
class CalibrationSpec:
    """``calibration:``: the unlabelled inputs of one-shot stages and distillation.

    For a recipe on a data set, its first ``samples`` training inputs; for a pretrained
    text model, the lines of ``texts`` (default: the calibration text shipped with
    deepshrink), tokenized in batches.
    """

    samples: int = 2048
    batch_size: int = 32
    texts: str | None = None
    holdout: int = 128  # texts kept out of calibration and training: the fidelity reported after each stage

    def __post_init__(self) -> None:
        for key in ("samples", "batch_size"):
            setattr(self, key, _number(getattr(self, key), key, 1, integer=True))
        self.holdout = _number(self.holdout, "holdout", 0, integer=True)
        _text(self.texts, "texts")


@dataclass
class Recipe:
    """A whole recipe: what to compress, on which data, and the stages in order."""

    model: str | None = None
    stages: list = field(default_factory=list)
    pretrained: str | None = None  # a pretrained model (Hugging Face folder or package) instead of `model`
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    model_kwargs: dict = field(default_factory=dict)
    state_dict: str | None = None  # trained weights (torch.save of a state_dict) to start from
    data: str = "mnist"
    data_dir: str | None = None  # default $DEEPSHRINK_DATA
    out: str | None = None  # the compressed file to write
    seed: int = 0
    batch_size: int = 64
    max_steps: int | None = None  # cap every training stage (quick runs, tests)
    holdout: int = 0  # train on all but the last `holdout` training examples and report on those, not the test set
    name: str | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.pretrained is None):
            raise DeepShrinkError("give exactly one of model (a factory to build) or pretrained (a model to load)")
        _text(self.model, "model")
        _text(self.pretrained, "pretrained")
        if not isinstance(self.calibration, CalibrationSpec):
            self.calibration = _build(CalibrationSpec, self.calibration, "calibration")
        if not isinstance(self.model_kwargs, dict):
            raise DeepShrinkError(f"model_kwargs={self.model_kwargs!r} must be a mapping of keyword arguments")
        for key in ("state_dict", "data_dir", "out", "name", "description"):
            _text(getattr(self, key), key)
        _choice(self.data, "data", DATASETS)
        self.seed = _number(self.seed, "seed", 0, integer=True)
        self.batch_size = _number(self.batch_size, "batch_size", 1, integer=True)
        if self.max_steps is not None:
            self.max_steps = _number(self.max_steps, "max_steps", 1, integer=True)
        self.holdout = _number(self.holdout, "holdout", 0, integer=True)
        if not isinstance(self.stages, list) or not self.stages:
            raise DeepShrinkError(
                f"stages must be a non-empty list of {{stage: settings}}; stages: {', '.join(STAGES)}"
            )
        self.stages = [
            s if isinstance(s, tuple(STAGES.values())) else _parse_stage(s, i) for i, s in enumerate(self.stages)
        ]
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
    ((kind, settings),) = raw.items()
    if kind not in STAGES:
        raise DeepShrinkError(f"{where}: unknown stage {kind!r}; allowed: {', '.join(STAGES)}")
    return _build(STAGES[kind], settings, f"{where}.{kind}")


def parse_recipe(raw: object) -> Recipe:
    """Check a recipe already read as data (a mapping) and build its stages.

    Raises:
        DeepShrinkError: an unknown key or stage, or a bad value, named with its place.
    """
    if not isinstance(raw, dict):
        raise DeepShrinkError(
            f"a recipe must be a mapping with keys {', '.join(f.name for f in dataclasses.fields(Recipe))}"
        )
    if "stages" not in raw:
        raise DeepShrinkError("recipe: missing key 'stages'")
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
            raise DeepShrinkError(
                f"recipe {str(source)!r} is neither a file nor a built-in recipe; "
                f"built-ins: {', '.join(builtin_recipes())}"
            )
        path = builtin
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DeepShrinkError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_recipe(raw)
    except DeepShrinkError as err:
        raise DeepShrinkError(f"{path}: {err}") from None
