"""Which weights of a model are compressed: discovery, filtering, and reporting.

A *target* is one weight parameter of one module (``fc1.weight``,
``lstm.weight_hh_l0``). Every stage (pruning, weight sharing, ternary) selects
its targets here, so all of them agree on names and on what is unsupported.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.errors import DeepShrinkError, UnsupportedLayerError

# Layer types whose weights we know how to compress, and their kind: the kind picks
# defaults such as bits (8 for conv, 5 for fully connected in Deep Compression).
SUPPORTED: dict[type[nn.Module], str] = {
    nn.Linear: "fc",
    nn.Bilinear: "fc",
    nn.Embedding: "fc",
    nn.RNN: "fc",
    nn.LSTM: "fc",
    nn.GRU: "fc",
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv",
    nn.ConvTranspose2d: "conv",
    nn.ConvTranspose3d: "conv",
}

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class Target:
    """One compressible weight: ``module.<param>`` at fully qualified ``name``."""

    name: str
    module_name: str
    module: nn.Module
    param: str
    kind: str  # "fc" or "conv"

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the model computes with it (parametrizations applied)."""
        return getattr(self.module, self.param)

    @property
    def type_name(self) -> str:
        """The layer's own class name (``Linear``), not the parametrized subclass torch puts in its place."""
        return parametrize.type_before_parametrizations(self.module).__name__


def _kind(module: nn.Module) -> str | None:
    for cls, kind in SUPPORTED.items():
        if isinstance(module, cls):
            return kind
    return None


def _weight_params(module: nn.Module) -> list[str]:
    if isinstance(module, nn.RNNBase):
        return [n for n in module._flat_weights_names if n.startswith("weight_")]
    return ["weight"] if getattr(module, "weight", None) is not None else []


def _own_matrices(module: nn.Module) -> list[str]:
    """Names of a module's own (not its children's) parameters with 2+ dimensions."""
    names = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if parametrize.is_parametrized(module):
        names += [n for n in module.parametrizations if getattr(module, n).dim() >= 2]
    return names


def _matches(target: Target, patterns: Iterable[str]) -> bool:
    return any(
        fnmatch.fnmatchcase(target.name, p)
        or fnmatch.fnmatchcase(target.module_name, p)
        or p in (target.type_name, target.kind)
        for p in patterns
    )


def find_targets(
    model: nn.Module,
    layers: Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
    warn_unsupported: bool = True,
) -> list[Target]:
    """List the weights to compress, in module registration order.

    Args:
        model: any ``nn.Module``, nested or custom.
        layers: patterns that select targets: a glob over the parameter name
            (``"fc*"``, ``"lstm.weight_hh_*"``) or module name, a layer type name
            (``"Conv2d"``), or a kind (``"fc"``, ``"conv"``). ``None`` selects all.
        filter_fn: ``(module, module_name) -> bool``, applied after ``layers``.
        warn_unsupported: warn, naming them, about modules whose own 2-D+
            parameters no handler covers (they are left as they are).

    Raises:
        DeepShrinkError: a pattern in ``layers`` matches nothing (names the
            available targets).
        UnsupportedLayerError: a pattern names a module of an unsupported type.
    """
    patterns = [layers] if isinstance(layers, str) else (list(layers) if layers is not None else None)
    found: list[Target] = []
    unsupported: list[str] = []
    for module_name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # holds the original of a weight we already compress
        kind = _kind(module)
        if kind is None:
            unsupported += [
                f"{module_name}.{p}".lstrip(".") + f" ({parametrize.type_before_parametrizations(module).__name__})"
                for p in _own_matrices(module)
            ]
            continue
        for param in _weight_params(module):
            name = f"{module_name}.{param}" if module_name else param
            found.append(Target(name, module_name, module, param, kind))
    if patterns is not None:
        for p in patterns:
            if not any(_matches(t, [p]) for t in found):
                bad = [
                    u
                    for u in unsupported
                    if fnmatch.fnmatchcase(u.split(" ")[0], p) or u.split(" ")[0].startswith(p + ".")
                ]
                if bad:
                    raise UnsupportedLayerError(
                        f"layer pattern {p!r} selects {', '.join(bad)}: no compression handler for "
                        f"that type; supported types: {', '.join(c.__name__ for c in SUPPORTED)}"
                    )
                raise DeepShrinkError(
                    f"layer pattern {p!r} matches no compressible weight; available: "
                    f"{', '.join(t.name for t in found) or 'none'}"
                )
        found = [t for t in found if _matches(t, patterns)]
    if filter_fn is not None:
        found = [t for t in found if filter_fn(t.module, t.module_name)]
    if warn_unsupported and unsupported and patterns is None:
        warnings.warn("not compressed, unsupported layer type: " + ", ".join(unsupported), stacklevel=3)
    return found


def resolve_per_layer(value: object, targets: list[Target], what: str) -> dict[str, object]:
    """Expand a scalar or a ``{pattern: value}`` mapping to one value per target.

    Later patterns override earlier ones; a target no pattern matches gets the
    ``"*"`` entry or ``None``.

    Raises:
        DeepShrinkError: a pattern matches no target.
    """
    if not isinstance(value, dict):
        return {t.name: value for t in targets}
    out: dict[str, object] = {t.name: value.get("*") for t in targets}
    for pattern, v in value.items():
        if pattern == "*":
            continue
        hit = [t for t in targets if _matches(t, [pattern])]
        if not hit:
            raise DeepShrinkError(f"{what} pattern {pattern!r} matches no target; targets: {', '.join(out)}")
        out.update({t.name: v for t in hit})
    return out
