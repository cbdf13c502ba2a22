"""MNIST from the four standard IDX files (gzipped or not)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from deepshrink.data.common import data_dir
from deepshrink.errors import DeepShrinkError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {0x00000803: 3, 0x00000801: 1}  # unsigned byte data, 3-D images / 1-D labels


def _open_idx(folder: Path, stem: str) -> bytes:
    for name in (stem + ".gz", stem):
        path = folder / name
        if path.is_file():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                return f.read()
    expected = ", ".join(f"{s}[.gz]" for pair in FILES.values() for s in pair)
    raise DeepShrinkError(f"MNIST file {stem}[.gz] not found in {folder}; expected the files {expected}")


def _parse_idx(raw: bytes, stem: str) -> np.ndarray:
    if len(raw) < 8:
        raise DeepShrinkError(f"{stem}: IDX file is truncated")
    magic = int.from_bytes(raw[:4], "big")
    ndim = _IDX_MAGIC.get(magic)
    if ndim is None:
        raise DeepShrinkError(f"{stem}: not an unsigned-byte IDX file (magic {magic:#010x})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) != offset + int(np.prod(dims)):
        raise DeepShrinkError(f"{stem}: IDX header says {dims} but the file holds {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 in [0, 1] and labels ``(N,)`` int64.

    Args:
        root: folder holding the IDX files, or a data root with an ``mnist/``
            subfolder; default ``$DEEPSHRINK_DATA``.
        split: ``"train"`` (60,000) or ``"test"`` (10,000).

    Raises:
        DeepShrinkError: unknown split, missing or malformed files.
    """
    if split not in FILES:
        raise DeepShrinkError(f"split={split!r} must be 'train' or 'test'")
    folder = data_dir(root)
    if (folder / "mnist").is_dir():
        folder = folder / "mnist"
    image_stem, label_stem = FILES[split]
    images = _parse_idx(_open_idx(folder, image_stem), image_stem)
    labels = _parse_idx(_open_idx(folder, label_stem), label_stem)
    if len(images) != len(labels):
        raise DeepShrinkError(f"MNIST {split}: {len(images)} images but {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
