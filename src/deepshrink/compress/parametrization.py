"""The parametrization protocol every compression method implements, and its registry.

A compressed weight is a ``torch.nn.utils.parametrize`` re-parametrization of
the layer's weight: :class:`~deepshrink.compress.prune.Mask` (pruning),
:class:`~deepshrink.compress.quantize.SharedWeight` (weight sharing) and
:class:`~deepshrink.compress.ternary.TernaryWeight` (ternary). Each is a
:class:`Compression`: it computes the weight the model uses, holds the mask of
the weights that survive, names the state it keeps (so :func:`restore_` can
rebuild it from a state dict) and turns itself into a
:class:`~deepshrink.tensor.CompressedTensor`, which the file format, the engine
and the simulator take from there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.compress.targets import Target
from deepshrink.errors import DeepShrinkError
from deepshrink.tensor import CompressedTensor


class Compression(nn.Module, ABC):
    """A deepshrink parametrization of one weight: ``forward(latent weight) -> weight used``.

    Attributes:
        state_keys: the names of its buffers, parameters and ``_extra_state``
            in ``state_dict``; together they identify the class (:func:`restore_`).
        ignores_input: True when ``forward`` computes the weight from the
            compression's own state (a codebook and codes) and not from the latent
            weight it receives; :func:`reparametrize_` then freezes the latent weight.
        mask: a bool buffer of the weight's shape, True where a weight survives
            (read it with :func:`current_mask`).
    """

    state_keys: ClassVar[tuple[str, ...]]
    ignores_input: ClassVar[bool] = False
    mask: torch.Tensor

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Compression:
        """Rebuild from the ``state_keys`` entries of a state dict."""

    @abstractmethod
    def to_compressed(self, weight: torch.Tensor) -> CompressedTensor:
        """The weight this computes (``weight``, as the model uses it) as a CompressedTensor."""


# Compression classes by the state_dict entries they own, so a state dict saved
# from a compressed model can be loaded into a fresh one (`restore_`).
# A new method registers its class here with `register_compression`.
COMPRESSIONS: dict[frozenset[str], type[Compression]] = {}


def register_compression(cls: type[Compression]) -> type[Compression]:
    """Class decorator: make ``cls`` restorable from its ``state_keys`` (see :class:`Compression`)."""
    COMPRESSIONS[frozenset(cls.state_keys)] = cls
    return cls


def restore_(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a state dict saved from a compressed model into a fresh ``model``.

    Installs the parametrizations the keys describe
    (``<module>.parametrizations.<param>.0.<key>``), then loads everything.

    Raises:
        DeepShrinkError: keys describe no known compression, or a module is missing.
    """
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        head, sep, tail = key.partition("parametrizations.")
        if not sep:
            continue
        param, index, attr = tail.split(".", 2) if tail.count(".") >= 2 else (tail.split(".")[0], "", "")
        if index == "0":
            groups.setdefault((head.rstrip("."), param), {})[attr] = value
    for (module_name, param), state in groups.items():
        cls = COMPRESSIONS.get(frozenset(state))
        if cls is None:
            raise DeepShrinkError(f"{module_name}.{param}: state keys {sorted(state)} match no known compression")
        try:
            module = model.get_submodule(module_name)
        except AttributeError as err:
            raise DeepShrinkError(f"state dict names module {module_name!r}, which the model lacks") from err
        reparametrize_(module, param, cls.from_state(state))
    model.load_state_dict(state_dict)


def compression_of(module: nn.Module, param: str) -> nn.Module | None:
    """The parametrization on ``module.<param>``, if any (a :class:`Compression` when deepshrink installed it)."""
    if not parametrize.is_parametrized(module, param):
        return None
    return getattr(module.parametrizations, param)[0]


def current_mask(target: Target) -> torch.Tensor:
    """The bool mask a target computes with (all True if it was never pruned)."""
    comp = compression_of(target.module, target.param)
    mask = getattr(comp, "mask", None)
    return mask if mask is not None else torch.ones_like(target.weight, dtype=torch.bool)


def reparametrize_(module: nn.Module, param: str, parametrization: Compression) -> None:
    """Make ``parametrization`` the only one on ``module.<param>``.

    A previous one is baked in first (``leave_parametrized=True``), so the
    latent weight the new one receives is the weight the model computed with.
    ``unsafe=True`` because a parametrization may ignore its input (weight
    sharing computes from codebook and codes) and skips the consistency check
    that would otherwise call it once more. Such a parametrization sets
    ``ignores_input = True``: its latent weight is then frozen, so optimizers do
    not decay it and DDP does not wait for a gradient that never comes.
    """
    if parametrize.is_parametrized(module, param):
        unparametrize_(module, param)
    parametrize.register_parametrization(module, param, parametrization, unsafe=True)
    if getattr(parametrization, "ignores_input", False):
        getattr(module.parametrizations, param).original.requires_grad_(False)


def unparametrize_(module: nn.Module, param: str) -> None:
    """Replace the parametrization of ``module.<param>`` by a plain, trainable parameter holding the weight it computes.

    ``parametrize.remove_parametrizations`` deletes the weight's property from the
    module's parametrized class, and a deep copy shares that class with its
    original (``copy.deepcopy`` copies instances, not classes): removing it from
    a copy would leave the original without its weight. So the module first gets
    a class of its own, equal to the shared one. The weight is made trainable
    again, since a parametrization that ignores its input froze it.

    Examples:
        >>> import copy
        >>> from deepshrink.compress.prune import prune_
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> _ = prune_(net, 0.5)
        >>> twin = copy.deepcopy(net)
        >>> unparametrize_(twin[0], "weight")
        >>> parametrize.is_parametrized(twin[0]), tuple(net(torch.ones(1, 4)).shape)
        (False, (1, 4))
    """
    shared = type(module)
    own = {k: v for k, v in vars(shared).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(shared.__name__, shared.__bases__, own)
    parametrize.remove_parametrizations(module, param, leave_parametrized=True)
    weight = getattr(module, param)
    if isinstance(weight, nn.Parameter):
        weight.requires_grad_(True)


def bake_(model: nn.Module) -> nn.Module:
    """Replace every parametrization in ``model`` by the plain weight it computes (see :func:`unparametrize_`).

    Safe on a deep copy: the original keeps its parametrizations.

    Returns:
        ``model``, changed in place.
    """
    for module in model.modules():
        for param in list(getattr(module, "parametrizations", {})):
            unparametrize_(module, param)
    return model
