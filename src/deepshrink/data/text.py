"""Text: character-level corpora (tinyshakespeare) as windows of character indices, and files of one text a line."""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepshrink.data.common import data_dir
from deepshrink.errors import DeepShrinkError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class CharCorpus:
    """A text and its character vocabulary (sorted distinct characters)."""

    text: str
    vocab: str

    def encode(self, text: str) -> np.ndarray:
        """Character indices (int64) of ``text``.

        Raises:
            DeepShrinkError: a character outside the vocabulary.
        """
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise DeepShrinkError(f"characters {unknown!r} are not in the corpus vocabulary")
        return np.array([index[c] for c in text], dtype=np.int64)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def load_corpus(root: str | os.PathLike | None = None, name: str = "tinyshakespeare") -> CharCorpus:
    """Read ``<root>/<name>/input.txt`` (or ``root`` itself when it holds ``input.txt``).

    Raises:
        DeepShrinkError: the file is missing or empty.
    """
    folder = data_dir(root)
    path = folder / "input.txt" if (folder / "input.txt").is_file() else folder / name / "input.txt"
    if not path.is_file():
        raise DeepShrinkError(f"no {name}/input.txt under {folder}")
    text = path.read_text(encoding="utf-8")
    if not text:
        raise DeepShrinkError(f"{path} is empty")
    return CharCorpus(text, "".join(sorted(set(text))))


def char_windows(
    corpus: CharCorpus, split: str = "train", length: int = 128, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``(input, next-character target)`` windows of one split.

    The first ``1 - val_fraction`` of the text is ``"train"``, the rest ``"val"``.

    Returns:
        ``(x, y)``, both ``(windows, length)`` int64, ``y`` being ``x`` shifted by one.

    Raises:
        DeepShrinkError: unknown split, ``length < 1`` or a fraction outside (0, 1).

    Examples:
        >>> c = CharCorpus("abcabcabc", "abc")
        >>> x, y = char_windows(c, "train", length=2, val_fraction=0.2)
        >>> x.tolist(), y.tolist()
        ([[0, 1], [2, 0], [1, 2]], [[1, 2], [0, 1], [2, 0]])
    """
    if split not in SPLITS:
        raise DeepShrinkError(f"split={split!r} must be 'train' or 'val'")
    if length < 1 or not 0 < val_fraction < 1:
        raise DeepShrinkError(f"length={length} must be >= 1 and val_fraction={val_fraction} in (0, 1)")
    ids = corpus.encode(corpus.text)
    cut = int(len(ids) * (1 - val_fraction))
    part = ids[:cut] if split == "train" else ids[cut:]
    n = (len(part) - 1) // length
    x = part[: n * length].reshape(n, length)
    y = part[1 : n * length + 1].reshape(n, length)
    return torch.from_numpy(x), torch.from_numpy(y)


def read_texts(path: str | os.PathLike) -> list[str]:
    """The texts of a file: one per non-empty line, stripped (calibration sentences, a corpus to embed).

    Raises:
        DeepShrinkError: the file is missing, unreadable, not UTF-8, or holds no text.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DeepShrinkError(f"cannot read texts from {str(path)!r}: {getattr(err, 'strerror', None) or err}") from err
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DeepShrinkError(f"{str(path)!r} holds no text: give one text per line")
    return texts


#: The shipped calibration text's first sentences, which recipes hold out (``calibration.holdout``)
#: to measure fidelity on: no passage takes a sentence from them.
HELD_SENTENCES = 128
PASSAGE_SENTENCES = 6


def calibration_texts() -> list[str]:
    """deepshrink's own calibration text: 1,500 English sentences shipped with the package, then
    228 passages of six of them joined.

    The sentences were written for this project (everyday speech, questions, news headlines,
    instructions, technical and scientific statements, software talk), and are disjoint from
    the sentences ``benchmarks/bench_minilm.py`` evaluates on: the default unlabelled inputs
    for calibrating and distilling a pretrained text model, offline. The passages (90 tokens
    or so, in a fixed shuffled order, none with one of the first :data:`HELD_SENTENCES`) are
    there because a model calibrated on single sentences alone serves paragraphs worse:
    all-MiniLM-L6-v2 compressed by the ``minilm`` recipe kept a mean cosine of 0.969 on six
    evaluation sentences joined, 0.979 with passages in its calibration.

    Examples:
        >>> texts = calibration_texts()
        >>> len(texts), all(texts)
        (1728, True)
    """
    with importlib.resources.as_file(
        importlib.resources.files("deepshrink.data") / "sentences" / "calibration.txt"
    ) as path:
        sentences = read_texts(path)
    order = HELD_SENTENCES + np.random.default_rng(0).permutation(len(sentences) - HELD_SENTENCES)
    groups = len(order) // PASSAGE_SENTENCES
    passages = [" ".join(sentences[i] for i in order[g * PASSAGE_SENTENCES : (g + 1) * PASSAGE_SENTENCES])
                for g in range(groups)]  # fmt: skip
    return sentences + passages
