"""Reference models: the Caffe LeNets of Deep Compression (see docs/references.md) and the LSTMs."""

from deepshrink.lazy import lazy_submodules
from deepshrink.models.lenet import LeNet5, LeNet300100, lenet_5, lenet_300_100
from deepshrink.models.lstm import CharLSTM, LSTMClassifier, char_lstm, lstm_classifier

__all__ = [
    "CharLSTM",
    "LSTMClassifier",
    "LeNet300100",
    "LeNet5",
    "char_lstm",
    "lenet_300_100",
    "lenet_5",
    "lstm_classifier",
]

__getattr__, __dir__ = lazy_submodules(__name__, __path__)
