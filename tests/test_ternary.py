"""Trained ternary quantization: the paper's forward and gradient rules, storage, and real MNIST accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.compress.parametrization import restore_
from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import compressed_tensors, distinct_nonzero, share_weights_
from deepshrink.compress.targets import find_targets
from deepshrink.compress.ternary import TernaryWeight, ternarize_
from deepshrink.compress.train import TrainConfig, evaluate, fit
from deepshrink.errors import DeepShrinkError
from deepshrink.fileformat.model_io import load, read, save

pytestmark = pytest.mark.usefixtures("one_thread")


def test_forward_and_gradients_follow_the_paper():
    torch.manual_seed(0)
    latent = torch.randn(6, 5)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0] = False
    tw = TernaryWeight(0.7, 0.4, mask, threshold=0.3)
    w = latent.clone().requires_grad_(True)
    out = tw(w)
    delta = 0.3 * (latent * mask).abs().max()
    pos, neg = (latent > delta) & mask, (latent < -delta) & mask
    torch.testing.assert_close(out.detach(), 0.7 * pos.float() - 0.4 * neg.float())
    upstream = torch.randn(6, 5)
    out.backward(upstream)
    # dL/dWp = sum of the gradients on the positive set; dL/dWn = -(sum on the negative set) for w = -Wn
    torch.testing.assert_close(tw.wp.grad, upstream[pos].sum())
    torch.testing.assert_close(tw.wn.grad, -upstream[neg].sum())
    # latent: scaled by Wp / 1 / Wn by set, zero where pruned (eq. 8 of the paper)
    scale = torch.where(pos, 0.7, torch.where(neg, 0.4, 1.0)) * mask
    torch.testing.assert_close(w.grad, upstream * scale)


def test_ternarize_keeps_pruning_and_stores_two_values_at_two_bits():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    prune_(net, 0.6)
    pruned = net[0].weight == 0
    report = ternarize_(net, threshold=0.05)
    assert all(r.wp > 0 and r.wn > 0 for r in report)
    assert (net[0].weight[pruned] == 0).all()
    for t in find_targets(net):
        assert distinct_nonzero(t.weight) <= 2
    cts = compressed_tensors(net)
    assert {ct.bits for ct in cts.values()} == {2} and all(len(ct.codebook) == 2 for ct in cts.values())
    targets = {t.name: t for t in find_targets(net)}
    for name, ct in cts.items():
        torch.testing.assert_close(ct.to_dense(), targets[name].weight.detach())


def test_state_dict_restores_and_refusals():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4))
    ternarize_(net, 0.1)
    fresh = nn.Sequential(nn.Linear(8, 4))
    restore_(fresh, net.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), net(x))
    assert fresh[0].parametrizations.weight[0].threshold == 0.1
    with pytest.raises(DeepShrinkError, match=r"threshold=1.5 must be a number in \[0, 1\)"):
        ternarize_(nn.Sequential(nn.Linear(4, 4)), 1.5)
    shared = nn.Sequential(nn.Linear(8, 4))
    share_weights_(shared, bits=2)
    with pytest.raises(DeepShrinkError, match="already SharedWeight; ternarize a dense or pruned model"):
        ternarize_(shared)


def test_lenet300_ternary_on_mnist_trains_and_reloads_from_the_file(
    trained_lenet300, mnist_train, mnist_test, tmp_path
):
    model = trained_lenet300
    dense = evaluate(model, mnist_test)
    ternarize_(model, layers=["fc1", "fc2"])  # the paper keeps the last layer in full precision
    before = {t.name: t.module.parametrizations.weight.original.detach().clone() for t in find_targets(model, ["fc1"])}
    # Adam: the scales' gradients are sums over ~100k weights, which SGD's fixed step turns into a blow-up.
    fit(model, mnist_train, TrainConfig(epochs=0.15, lr=0.001, optimizer="adam", batch_size=128, progress=False))
    tuned = evaluate(model, mnist_test)
    assert tuned > dense - 0.03, (dense, tuned)
    latent = model.fc1.parametrizations.weight.original
    assert not torch.equal(latent, before["fc1.weight"])  # latent weights kept training
    assert distinct_nonzero(model.fc1.weight) == 2
    path = tmp_path / "ternary.dsz"
    size = save(model, path, coder="huffman", factory="deepshrink.models:lenet_300_100")
    contents = read(path)
    assert contents.tensors["fc1.weight"].bits == 2
    print(f"ternary LeNet-300-100 file: {size} bytes, accuracy {dense:.4f} -> {tuned:.4f}")
    assert size < 266_200 * 4 / 12  # fp32 weights are 1.06 MB; 2 bits a weight would be 16x, fc3 stays fp32
    x = mnist_test[0][:256]
    with torch.no_grad():
        torch.testing.assert_close(load(path)(x), model.eval()(x))
