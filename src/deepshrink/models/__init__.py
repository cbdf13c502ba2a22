"""Reference models: the Caffe LeNets of Deep Compression (see docs/reference.md) and an LSTM digit classifier."""

from deepshrink.models.lenet import LeNet5, LeNet300100, lenet_5, lenet_300_100
from deepshrink.models.lstm import LSTMClassifier, lstm_classifier

__all__ = ["LSTMClassifier", "LeNet300100", "LeNet5", "lenet_300_100", "lenet_5", "lstm_classifier"]
