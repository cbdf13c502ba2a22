"""LeNet-300-100 and LeNet-5 as defined in Caffe's MNIST examples."""

from __future__ import annotations

import torch
from torch import nn

from deepshrink.models.checks import check_dropout, check_sizes


class LeNet300100(nn.Module):
    """784-300-100-10 fully connected with ReLU (``in_features`` for other image sizes).

    Raises:
        DeepShrinkError: a size below 1 or a dropout outside [0, 1).
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        check_sizes(in_features=in_features, num_classes=num_classes)
        check_dropout(dropout)
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        # Dropout is off by default as in Caffe's LeNet; retraining adjusts it when used.
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        x = self.drop1(torch.relu(self.fc1(x)))
        x = self.drop2(torch.relu(self.fc2(x)))
        return self.fc3(x)


class LeNet5(nn.Module):
    """conv 5x5x20, max-pool 2, conv 5x5x50, max-pool 2, fc 800-500, ReLU, fc 500-10.

    Raises:
        DeepShrinkError: a size below 1 or a dropout outside [0, 1).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        check_sizes(in_channels=in_channels, num_classes=num_classes)
        check_dropout(dropout)
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(self.conv1(x), 2)  # (B, 20, 12, 12) for 28x28 input
        x = torch.max_pool2d(self.conv2(x), 2)  # (B, 50, 4, 4)
        x = self.drop(torch.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


def lenet_300_100(in_features: int = 784, num_classes: int = 10, dropout: float = 0.0) -> LeNet300100:
    return LeNet300100(in_features, num_classes, dropout)


def lenet_5(in_channels: int = 1, num_classes: int = 10, dropout: float = 0.0) -> LeNet5:
    return LeNet5(in_channels, num_classes, dropout)
