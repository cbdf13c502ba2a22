"""Group pruning against a plain loop reference, shrinking to a smaller dense model, AGP schedules."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from deepshrink.coding.relative import encode_relative
from deepshrink.compress.groups import group_index_bits, prune_groups_
from deepshrink.compress.parametrization import current_mask
from deepshrink.compress.prune import prune_
from deepshrink.compress.schedules import GradualPruner, agp_sparsity, gradual_prune
from deepshrink.compress.surgery import shrink
from deepshrink.compress.targets import find_targets
from deepshrink.compress.train import TrainConfig
from deepshrink.errors import DeepShrinkError, UnsupportedLayerError
from deepshrink.models import lenet_5

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_mask(w: np.ndarray, granularity: str, sparsity: float) -> np.ndarray:
    """Loop over the groups of a (out, in, kh, kw) weight: score = mean |w|, drop the lowest."""
    out, inp, kh, kw = w.shape
    keys = {
        "fine": lambda o, i, y, x: (o, i, y, x),
        "vector": lambda o, i, y, x: (o, i, y),
        "kernel": lambda o, i, y, x: (o, i),
        "filter": lambda o, i, y, x: (o,),
        "channel": lambda o, i, y, x: (i,),
    }[granularity]
    groups: dict[tuple, list] = {}
    for idx in itertools.product(range(out), range(inp), range(kh), range(kw)):
        groups.setdefault(keys(*idx), []).append(idx)
    scores = {k: np.mean([abs(w[i]) for i in members]) for k, members in groups.items()}
    n_drop = int(np.floor(sparsity * len(groups)))
    dropped = sorted(scores, key=scores.get)[:n_drop]
    mask = np.ones_like(w, dtype=bool)
    for k in dropped:
        for i in groups[k]:
            mask[i] = False
    return mask


@pytest.mark.parametrize("granularity", ["fine", "vector", "kernel", "filter", "channel"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75])
def test_group_masks_match_a_loop_reference(granularity, sparsity):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, (3, 2))  # non-square kernels catch a swapped row/column
    net = nn.Sequential(conv)
    expected = _reference_mask(conv.weight.detach().numpy(), granularity, sparsity)
    prune_groups_(net, sparsity, granularity)
    got = current_mask(find_targets(net)[0]).numpy()
    np.testing.assert_array_equal(got, expected)


def test_an_all_zero_layer_and_repeated_pruning_only_remove_more():
    net = nn.Sequential(nn.Conv2d(2, 3, 3))
    with torch.no_grad():
        net[0].weight.zero_()
    report = prune_groups_(net, 0.5, "kernel")
    assert report[0].kept == 0  # all-zero weights count as pruned, and nothing breaks
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3))
    prune_groups_(net, 0.25, "filter")
    first = current_mask(find_targets(net)[0]).clone()
    prune_groups_(net, 0.5, "filter")
    second = current_mask(find_targets(net)[0])
    assert not (second & ~first).any() and int(second.any((1, 2, 3)).sum()) == 4


def test_linear_layers_treat_a_weight_as_a_1x1_kernel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 6))
    prune_groups_(net, 0.5, "filter")
    rows = current_mask(find_targets(net)[0]).all(1)
    assert int(rows.sum()) == 3 and not current_mask(find_targets(net)[0])[~rows].any()
    net = nn.Sequential(nn.Linear(10, 6))
    report = prune_groups_(net, 0.5, "kernel")  # a 1x1 kernel is a single weight: fine-grained
    assert report[0].kept == 30


def test_bad_granularity_and_recurrent_filters_are_refused():
    with pytest.raises(DeepShrinkError, match="must be one of fine, vector, kernel, filter, channel"):
        prune_groups_(nn.Sequential(nn.Linear(4, 4)), 0.5, "block")
    with pytest.raises(UnsupportedLayerError, match="recurrent layer would cut its gates"):
        prune_groups_(nn.LSTM(4, 4), 0.5, "filter")
    with pytest.raises(DeepShrinkError, match=r"sparsity\[0.weight\]=1.5"):
        prune_groups_(nn.Sequential(nn.Linear(4, 4)), 1.5, "filter")


def test_a_refused_layer_leaves_the_whole_model_unpruned():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 4, 3), nn.LSTM(4, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UnsupportedLayerError, match="2.weight_ih_l0"):
        prune_groups_(net, 0.5, {"0.*": "fine", "1.*": "filter", "*": "filter"})
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_group_index_bits_count_one_index_per_kept_group():
    mask = torch.zeros(4, 3, 5, 5, dtype=torch.bool)
    mask[0, 0] = mask[3, 2] = True  # two kept kernels: groups 0 and 11 of 12
    expected = len(encode_relative(np.array([0, 11]), 3)) * 3
    assert group_index_bits(mask, "kernel", 3) == expected == 3 * 3  # 0, an escape (skip 7), then 3
    assert group_index_bits(mask, "fine", 8) == 50 * 8  # the gap of 250 between the kernels fits in 8 bits
    assert group_index_bits(mask, "fine", 7) == 51 * 7  # ... but needs an escape at 7 bits


def test_shrink_lenet5_after_filter_pruning_keeps_the_function():
    torch.manual_seed(0)
    model = lenet_5()
    prune_groups_(model, {"conv1": 0.5, "conv2": 0.6, "fc1": 0.7}, "filter")
    example = torch.rand(16, 1, 28, 28)
    small = shrink(model, example)
    assert (small.conv1.out_channels, small.conv2.in_channels, small.conv2.out_channels) == (10, 10, 20)
    assert (small.fc1.in_features, small.fc1.out_features, small.fc2.in_features) == (320, 150, 150)
    fresh = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(small(fresh), model.eval()(fresh), atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < 0.2 * sum(p.numel() for p in lenet_5().parameters())
    model(fresh)  # the original still runs: shrinking worked on a copy


def test_shrink_cuts_batch_norms_and_channel_pruned_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 5),
    )
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2)
    net.eval()
    prune_groups_(net, {"3.weight": 0.5}, "channel")  # 4 of conv 3's 8 inputs go: conv 0 loses 4 filters
    prune_groups_(net, {"3.weight": 0.5}, "filter")
    small = shrink(net, torch.randn(4, 3, 8, 8))
    assert (small[0].out_channels, small[1].num_features, small[3].in_channels) == (4, 4, 4)
    assert (small[3].out_channels, small[5].in_features) == (3, 3 * 36)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-4)


class _Branchy(nn.Module):
    """Two layers that do not form a chain: the first's output is added to the second's input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x) + self.a(x)


def test_shrink_refuses_a_model_that_is_not_a_chain():
    net = _Branchy()
    prune_groups_(net, {"a.weight": 0.5}, "filter")
    with pytest.raises(DeepShrinkError, match="not a chain|varies"):
        shrink(net, torch.randn(3, 4))


def test_agp_ramp_is_cubic_monotone_and_ends_at_the_target():
    levels = [agp_sparsity(s, 100, 0.9, ramp=0.5) for s in range(101)]
    assert levels[0] == 0 and levels[50] == pytest.approx(0.9) and levels[-1] == pytest.approx(0.9)
    assert all(b >= a for a, b in zip(levels, levels[1:]))
    assert levels[25] == pytest.approx(0.9 * (1 - 0.5**3))


def test_gradual_pruner_reaches_the_exact_sparsity_and_masks_hold():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    data = (torch.randn(256, 8), torch.randint(0, 3, (256,)))
    seen = []
    pruner = GradualPruner(net, {"1.weight": 0.75, "3.weight": 0.5}, every=4)
    from deepshrink.compress.train import fit

    fit(
        net,
        data,
        TrainConfig(epochs=2, batch_size=16, progress=False),
        on_step=lambda step, total: (pruner(step, total), seen.append(float((net[1].weight == 0).float().mean()))),
    )
    assert seen[-1] == pytest.approx(0.75) and float((net[3].weight == 0).float().mean()) == pytest.approx(0.5)
    assert all(b >= a for a, b in zip(seen, seen[1:]))  # never un-prunes
    assert len(pruner.reports) == 32 // 4
    report = gradual_prune(
        nn.Sequential(nn.Linear(8, 4)), 0.5, data, TrainConfig(epochs=1, progress=False), granularity="filter", every=3
    )
    assert report[0].kept == 16


def test_fine_group_pruning_equals_magnitude_pruning():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(20, 10)), nn.Sequential(nn.Linear(20, 10))
    b.load_state_dict(a.state_dict())
    prune_groups_(a, 0.8, "fine")
    prune_(b, 0.8)
    assert torch.equal(a[0].weight, b[0].weight)
