"""scikit-learn's bundled 8x8 digits: the demo's data, no download needed."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits as _sk_load_digits


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 8, 8)`` float32 in [0, 1] and labels ``(N,)`` int64, split by a fixed permutation."""
    bunch = _sk_load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    idx = order[:n_test] if split == "test" else order[n_test:]
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
