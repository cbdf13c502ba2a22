"""Models by name: the names recipes and the command line accept, and the factories they stand for."""

from __future__ import annotations

from deepshrink.errors import DeepShrinkError

MODELS = {"lenet-300-100": "deepshrink.models:lenet_300_100", "lenet-5": "deepshrink.models:lenet_5"}


def model_factory(name: str) -> str:
    """The ``module:factory`` of one of :data:`MODELS`' names, or ``name`` itself when it is one.

    Raises:
        DeepShrinkError: ``name`` is neither.
    """
    factory = MODELS.get(name, name)
    if ":" not in factory:
        raise DeepShrinkError(f"model {name!r} is neither one of {', '.join(MODELS)} nor 'module:factory'")
    return factory
