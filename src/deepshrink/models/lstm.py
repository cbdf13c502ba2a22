"""Recurrent reference models: an LSTM spoken-digit classifier (ESE's case, small) and a character LSTM.

ESE compresses an LSTM acoustic model; here the same layer type classifies the
spoken digits of FSDD from a log-mel sequence, reading the class off the last
step's hidden state.
"""

from __future__ import annotations

import torch
from torch import nn

from deepshrink.errors import DeepShrinkError
from deepshrink.models.checks import check_dropout, check_sizes


class LSTMClassifier(nn.Module):
    """``nn.LSTM`` over a ``(batch, frames, features)`` sequence, then a linear head on the last step.

    Args:
        n_features: features per frame (40 log-mel energies by default).
        hidden: LSTM hidden size (the gate matrices have ``4 * hidden`` rows).
        layers: stacked LSTM layers.
        num_classes: output classes.
        dropout: dropout before the head (and between layers when ``layers > 1``).

    Raises:
        DeepShrinkError: a size below 1 or a dropout outside [0, 1).

    Examples:
        >>> net = LSTMClassifier(n_features=8, hidden=16)
        >>> net(torch.zeros(2, 5, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, n_features: int = 40, hidden: int = 256, layers: int = 1, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_sizes(n_features=n_features, hidden=hidden, layers=layers, num_classes=num_classes)
        check_dropout(dropout)
        self.lstm = nn.LSTM(n_features, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)  # (B, T, hidden)
        return self.fc(self.drop(out[:, -1]))  # (B, num_classes)


def lstm_classifier(
    n_features: int = 40, hidden: int = 256, layers: int = 1, num_classes: int = 10, dropout: float = 0.0
) -> LSTMClassifier:
    """The FSDD digit classifier; see :class:`LSTMClassifier`."""
    return LSTMClassifier(n_features, hidden, layers, num_classes, dropout)


class CharLSTM(nn.Module):
    """Character-level language model: embedding, ``nn.LSTM``, linear read-out of the next character.

    ``forward`` returns ``(batch, vocab, steps)`` logits, the layout
    ``nn.functional.cross_entropy`` takes with ``(batch, steps)`` targets, so
    :func:`deepshrink.compress.train.fit` trains it as it is.

    Examples:
        >>> net = CharLSTM(vocab=65, embed=8, hidden=16)
        >>> net(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 65, 5])
    """

    def __init__(self, vocab: int = 65, embed: int = 64, hidden: int = 256, layers: int = 1) -> None:
        super().__init__()
        check_sizes(vocab=vocab, embed=embed, hidden=hidden, layers=layers)
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.fc = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids), state)  # (B, T, hidden)
        return self.fc(out).transpose(1, 2)  # (B, vocab, T)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, length: int, temperature: float = 0.8, seed: int = 0) -> list[int]:
        """Sample ``length`` characters after the ``(steps,)`` int64 ``prompt``.

        Raises:
            DeepShrinkError: an empty prompt or a temperature <= 0.
        """
        if prompt.numel() == 0 or temperature <= 0:
            raise DeepShrinkError("generate needs a non-empty prompt and a temperature > 0")
        generator = torch.Generator().manual_seed(seed)
        out, state = self.lstm(self.embed(prompt[None]))  # (1, T, hidden)
        ids = []
        for _ in range(length):
            probs = torch.softmax(self.fc(out[:, -1]) / temperature, dim=-1)  # (1, vocab)
            ids.append(int(torch.multinomial(probs, 1, generator=generator)))
            out, state = self.lstm(self.embed(torch.tensor([[ids[-1]]])), state)
        return ids


def char_lstm(vocab: int = 65, embed: int = 64, hidden: int = 256, layers: int = 1) -> CharLSTM:
    """The tinyshakespeare character model; see :class:`CharLSTM`."""
    return CharLSTM(vocab, embed, hidden, layers)
