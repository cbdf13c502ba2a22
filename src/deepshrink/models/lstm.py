"""Recurrent reference models: an LSTM spoken-digit classifier (ESE's case, small).

ESE compresses an LSTM acoustic model; here the same layer type classifies the
spoken digits of FSDD from a log-mel sequence, reading the class off the last
step's hidden state.
"""

from __future__ import annotations

import torch
from torch import nn

from deepshrink.errors import DeepShrinkError


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
        for name, value in (("n_features", n_features), ("hidden", hidden), ("layers", layers),
                            ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeepShrinkError(f"{name}={value!r} must be a positive integer")
        if not 0 <= dropout < 1:
            raise DeepShrinkError(f"dropout={dropout!r} must be in [0, 1)")
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
