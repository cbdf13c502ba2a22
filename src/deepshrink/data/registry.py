"""Data sets by name: the names recipes and the command line accept."""

from __future__ import annotations

import torch

from deepshrink.errors import DeepShrinkError

DATASETS = ("mnist", "digits")

Data = tuple[torch.Tensor, torch.Tensor]


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
