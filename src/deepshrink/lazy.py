"""Submodules on attribute access: ``import deepshrink`` then ``deepshrink.fileformat.export`` works.

A package's ``__init__`` imports only what it re-exports, so that ``import deepshrink``
stays light; its other submodules are imported the first time they are named, as
``import deepshrink.fileformat.export`` would.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable, Iterable
from types import ModuleType


def lazy_submodules(package: str, path: Iterable[str]) -> tuple[Callable[[str], ModuleType], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` a package's ``__init__`` assigns to reach its submodules lazily.

    Args:
        package: the package's ``__name__``.
        path: its ``__path__`` (where the submodules are found).

    Returns:
        ``(__getattr__, __dir__)`` for the package module.

    Examples:
        >>> import deepshrink
        >>> deepshrink.fileformat.export.__name__
        'deepshrink.fileformat.export'
    """
    path = list(path)
    names = frozenset(m.name for m in pkgutil.iter_modules(path))

    def __getattr__(name: str) -> ModuleType:
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        hint = _one_level_down(package, path, name) if not name.startswith("_") else None
        raise AttributeError(
            f"module {package!r} has no attribute {name!r}" + (f"; did you mean {hint}?" if hint else "")
        )

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | names)

    return __getattr__, __dir__


def _one_level_down(package: str, path: list[str], name: str) -> str | None:
    """``package.sub.name`` if a subpackage holds a module ``name`` (``deepshrink.export`` moved into ``fileformat``)."""
    for sub in pkgutil.iter_modules(path):
        if sub.ispkg and any(m.name == name for m in pkgutil.iter_modules([os.path.join(p, sub.name) for p in path])):
            return f"{package}.{sub.name}.{name}"
    return None
