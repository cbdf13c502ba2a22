"""Custom, nested models go through the public API with no change to the library."""

import pytest
import torch
from torch import nn

from deepshrink.compress.prune import prune_, sparsity_report
from deepshrink.compress.quantize import compressed_tensors, distinct_nonzero, share_weights_
from deepshrink.compress.targets import find_targets
from deepshrink.compress.train import TrainConfig, evaluate, fit


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return torch.relu(x + self.body(x))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Residual(8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x):
        return self.head(self.pool(self.block(self.stem(x))).flatten(1))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, 32, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(64, 10)

    def forward(self, x):  # (B, 1, 28, 28): rows as time steps
        seq, _ = self.lstm(x.squeeze(1))
        return self.out(seq[:, -1])


@pytest.mark.parametrize("factory, n_weights", [(SmallResNet, 4), (LSTMClassifier, 9)])
def test_custom_model_prunes_and_shares(factory, n_weights, mnist_train, mnist_test):
    torch.manual_seed(0)
    model = factory()
    train = (mnist_train[0][:4096], mnist_train[1][:4096])
    test = (mnist_test[0][:1000], mnist_test[1][:1000])
    fit(model, train, TrainConfig(epochs=2, lr=3e-3, optimizer="adam", weight_decay=0, progress=False))
    dense = evaluate(model, test)
    assert dense > 0.7  # it learns the real digits
    report = prune_(model, 0.7)
    assert len(report) == n_weights
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not hasattr(m, "parametrizations") for m in norms)  # normalisation untouched
    share_weights_(model, bits=4)
    fit(model, train, TrainConfig(epochs=0.5, lr=1e-3, optimizer="adam", weight_decay=0, progress=False))
    for t in find_targets(model):
        assert distinct_nonzero(t.weight) <= 16
        assert int((t.weight == 0).sum()) >= int(0.7 * t.weight.numel())
    assert evaluate(model, test) > dense - 0.2
    assert set(compressed_tensors(model)) == {r.name for r in sparsity_report(model)}
