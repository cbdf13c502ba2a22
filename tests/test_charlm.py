"""Character corpus windows on the real tinyshakespeare text, and the character LSTM's generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepshrink.compress.prune import prune_
from deepshrink.compress.train import TrainConfig, fit
from deepshrink.data.text import CharCorpus, char_windows, load_corpus
from deepshrink.errors import DeepShrinkError
from deepshrink.models import CharLSTM, char_lstm


def test_tinyshakespeare_windows(text_root: Path) -> None:
    corpus = load_corpus(text_root)
    assert len(corpus.text) == 1_115_394 and len(corpus.vocab) == 65
    x, y = char_windows(corpus, "train", length=100)
    xv, _ = char_windows(corpus, "val", length=100)
    assert x.shape == (10_038, 100) and xv.shape == (1_115, 100)
    assert corpus.decode(x[0, :14]) == "First Citizen:"
    assert torch.equal(x[0, 1:], y[0, :-1]) and torch.equal(x[1, 0], y[0, -1])  # y is x shifted by one


def test_encode_decode_round_trip_and_errors() -> None:
    corpus = CharCorpus("to be or not", "".join(sorted(set("to be or not"))))
    assert corpus.decode(corpus.encode("not to be")) == "not to be"
    with pytest.raises(DeepShrinkError, match="not in the corpus vocabulary"):
        corpus.encode("xyz")
    with pytest.raises(DeepShrinkError, match="split='test' must be 'train' or 'val'"):
        char_windows(corpus, "test")
    with pytest.raises(DeepShrinkError, match="length=0 must be >= 1"):
        char_windows(corpus, length=0)


@pytest.fixture
def one_thread():
    """Tiny LSTMs: a second thread only waits for a core on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_char_lstm_learns_a_pattern_and_keeps_it_pruned(one_thread: None) -> None:
    corpus = CharCorpus("abcd" * 100, "abcd")
    x, y = char_windows(corpus, "train", length=16)
    torch.manual_seed(0)
    model = char_lstm(vocab=4, embed=8, hidden=32)
    fit(model, (x, y), TrainConfig(epochs=25, lr=0.03, optimizer="adam", weight_decay=0, batch_size=16, progress=False))
    prune_(model, 0.5)
    fit(model, (x, y), TrainConfig(epochs=8, lr=0.01, optimizer="adam", weight_decay=0, batch_size=16, progress=False))
    assert corpus.decode(model.generate(torch.tensor([0, 1]), 12, temperature=0.1)) == "cdabcdabcdab"
    assert float((model.lstm.weight_hh_l0 == 0).float().mean()) >= 0.5
    with pytest.raises(DeepShrinkError, match="non-empty prompt"):
        model.generate(torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(DeepShrinkError, match="hidden=0"):
        CharLSTM(hidden=0)
