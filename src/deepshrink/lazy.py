"""Submodules on attribute access: ``import deepshrink`` then ``deepshrink.fileformat.export`` works.

A package's ``__init__`` imports only what it re-exports, so that ``import deepshrink``
stays light; its other submodules are imported the first time they are named, as
``import deepshrink.fileformat.export`` would.
"""

from __future__ import annotations

import importlib
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
    names = frozenset(m.name for m in pkgutil.iter_modules(list(path)))

    def __getattr__(name: str) -> ModuleType:
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | names)

    return __getattr__, __dir__
