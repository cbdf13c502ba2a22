"""Argument checks the models share: a file or a recipe names their kwargs, so bad values get a named error."""

from __future__ import annotations

from deepshrink.errors import DeepShrinkError


def check_sizes(**sizes: object) -> None:
    """Every value a positive integer (a layer size, a count).

    Raises:
        DeepShrinkError: naming the first that is not.
    """
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DeepShrinkError(f"{name}={value!r} must be a positive integer")


def check_dropout(dropout: object) -> float:
    """A dropout rate in [0, 1).

    Raises:
        DeepShrinkError: naming the value otherwise.
    """
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise DeepShrinkError(f"dropout={dropout!r} must be a number in [0, 1)")
    return float(dropout)
