"""Reference models: the Caffe LeNets of Deep Compression (see docs/reference.md)."""

from deepshrink.models.lenet import LeNet5, LeNet300100, lenet_5, lenet_300_100

__all__ = ["LeNet300100", "LeNet5", "lenet_300_100", "lenet_5"]
