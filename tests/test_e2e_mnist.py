"""End to end on real MNIST: LeNet-300-100 pruned to 90%, shared at 5 bits, fine-tuned."""

import torch

from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import compressed_tensors, distinct_nonzero, share_weights_
from deepshrink.compress.targets import find_targets
from deepshrink.compress.train import TrainConfig, evaluate, fit, scale_dropout_


def test_lenet300_prune_share_finetune_on_mnist(trained_lenet300, mnist_train, mnist_test):
    model = trained_lenet300
    assert evaluate(model, mnist_test) > 0.95
    prune_(model, 0.9)
    scale_dropout_(model)
    fit(model, mnist_train, TrainConfig(epochs=0.5, lr=0.01, batch_size=128, progress=False))
    zero_pattern = {t.name: (t.weight == 0).clone() for t in find_targets(model)}
    share_weights_(model, bits=5)
    fit(model, mnist_train, TrainConfig(epochs=0.25, lr=0.005, batch_size=128, progress=False))
    accuracy = evaluate(model, mnist_test)
    assert accuracy > 0.95, accuracy
    for t in find_targets(model):
        assert torch.equal(t.weight == 0, zero_pattern[t.name]), t.name
        assert distinct_nonzero(t.weight) <= 32, t.name
        kept = int((t.weight != 0).sum())
        assert 0.09 * t.weight.numel() <= kept <= 0.1 * t.weight.numel() + 1, t.name
    tensors = compressed_tensors(model)
    assert all(t.bits == 5 and len(t.codebook) <= 32 for t in tensors.values())
