import numpy as np
import pytest
import torch
from torch import nn

from deepshrink import DeepShrinkError
from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import (
    INITS,
    compressed_tensors,
    distinct_nonzero,
    kmeans_1d,
    load_compressed_,
    share_weights_,
)


def _lloyd_reference(x, centroids, iters=300):
    """Plain O(n k) Lloyd's algorithm: the auditable reference."""
    c = np.sort(np.asarray(centroids, dtype=np.float64))
    for _ in range(iters):
        assign = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        new = np.array([x[assign == j].mean() if np.any(assign == j) else c[j] for j in range(len(c))])
        if np.allclose(new, c, rtol=0, atol=1e-12):
            break
        c = new
    return c


def test_kmeans_matches_plain_lloyd_from_the_same_start():
    x = np.random.default_rng(0).standard_normal(3000)
    for k in (2, 5, 16):
        # density init starts with no empty cluster, where the reference has no relocation rule
        ours, codes = kmeans_1d(x, k, "density", max_iter=300, tol=0)
        ref = _lloyd_reference(x, np.quantile(x, np.linspace(0, 1, k)))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(codes, np.argmin(np.abs(x[:, None] - ours[None, :]), axis=1))


@pytest.mark.parametrize("init", INITS)
def test_inits_are_deterministic_and_fill_the_codebook(init):
    x = np.random.default_rng(1).standard_normal(5000)
    x = x[np.abs(x) > 1]  # a pruned layer: nothing in the middle
    a, codes_a = kmeans_1d(x, 16, init, seed=3)
    b, codes_b = kmeans_1d(x, 16, init, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(codes_a, codes_b)
    assert len(a) == 16  # empty clusters are relocated, not wasted


def test_kmeans_edge_cases():
    c, codes = kmeans_1d(np.array([2.0, 2.0, 2.0]), 8)
    assert c.tolist() == [2.0] and codes.tolist() == [0, 0, 0]
    c, codes = kmeans_1d(np.array([]), 4)
    assert c.size == 0 and codes.size == 0
    with pytest.raises(DeepShrinkError, match="init='bogus'"):
        kmeans_1d(np.ones(3), 2, "bogus")


@pytest.mark.parametrize("bits", [0, 17, 2.5, True])
def test_bits_out_of_range(bits):
    with pytest.raises(DeepShrinkError, match="must be an integer in 1..16"):
        share_weights_(nn.Sequential(nn.Linear(4, 4)), bits=bits)


def test_default_bits_are_8_for_conv_and_5_for_fc():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 300))
    report = share_weights_(model)
    assert [(r.name, r.bits) for r in report] == [("0.weight", 8), ("2.weight", 5)]
    assert report[1].clusters == 32


def test_centroid_gradient_is_sum_of_member_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    prune_(layer, 0.5)
    share_weights_(layer, bits=2)
    shared = layer.parametrizations.weight[0]
    x = torch.randn(4, 6)
    w = layer.weight.detach().requires_grad_(True)
    (x @ w.T).pow(2).sum().backward()  # the same loss, gradient w.r.t. the dense weight
    layer(x).sub(layer.bias).pow(2).sum().backward()
    expected = torch.zeros(shared.codebook.numel()).index_add_(0, shared.codes[shared.mask].long(), w.grad[shared.mask])
    torch.testing.assert_close(shared.codebook.grad, expected)


def test_fine_tuning_keeps_codebook_size_and_zero_pattern():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    prune_(net, 0.7)
    zeros_before = [(layer.weight == 0).clone() for layer in (net[0], net[2])]
    share_weights_(net, bits=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(20):
        loss = nn.functional.cross_entropy(net(torch.randn(16, 10)), torch.randint(0, 3, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer, zeros in zip((net[0], net[2]), zeros_before):
        assert torch.equal(layer.weight == 0, zeros)
        assert distinct_nonzero(layer.weight) <= 8


def test_compressed_tensors_round_trip_through_load_compressed():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 4))
    prune_(net, 0.6)
    share_weights_(net, bits={"conv": 4, "fc": 3})
    tensors = compressed_tensors(net)
    assert sorted(tensors) == ["0.weight", "2.weight"]
    assert tensors["0.weight"].bits == 4 and tensors["2.weight"].bits == 3
    for layer, t in zip((net[0], net[2]), tensors.values()):
        assert torch.equal(t.to_dense(), layer.weight.detach())
    fresh = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 4))
    fresh.load_state_dict({k: v for k, v in net.state_dict().items() if "parametrizations" not in k}, strict=False)
    load_compressed_(fresh, tensors)
    x = torch.randn(2, 2, 6, 6)
    assert torch.equal(fresh(x), net(x))
    with pytest.raises(DeepShrinkError, match="'nope' is not a compressible weight"):
        load_compressed_(fresh, {"nope": tensors["0.weight"]})
