import io

import pytest
import torch
from torch import nn

from deepshrink import DeepShrinkError, UnsupportedLayerError
from deepshrink.compress.parametrization import current_mask, restore_
from deepshrink.compress.prune import prune_, sparsity_report, sparsity_schedule
from deepshrink.compress.targets import find_targets


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))


def test_sparsity_is_exact_and_removes_smallest_magnitudes():
    net = _net()
    before = net[0].weight.detach().clone()
    report = prune_(net, 0.75)
    assert [r.kept for r in report] == [150, 75]
    kept = net[0].weight != 0
    assert before.abs()[kept].min() >= before.abs()[~kept].max()


def test_quality_rule_uses_std_threshold():
    net = _net()
    w = net[0].weight.detach().clone()
    prune_(net, quality=0.5, layers=["0.weight"])
    expected = w.abs() > 0.5 * w.std()
    assert torch.equal(net[0].weight != 0, expected)
    assert torch.all(net[2].weight != 0)  # not selected, untouched


def test_global_scope_uses_one_threshold():
    net = _net()
    magnitudes = torch.cat([net[0].weight.detach().abs().flatten(), net[2].weight.detach().abs().flatten()])
    prune_(net, 0.6, scope="global")
    threshold = magnitudes.kthvalue(int(0.6 * magnitudes.numel())).values
    for layer in (net[0], net[2]):
        w = layer.parametrizations.weight.original.detach()
        assert torch.equal(layer.weight != 0, w.abs() > threshold)


def _net_with_a_small_layer():
    net = _net()
    with torch.no_grad():
        net[2].weight.mul_(1e-3)  # every one of its 300 weights under the global threshold
    return net


@pytest.mark.parametrize("setting", [dict(sparsity=0.7), dict(quality=1.0)])
def test_global_scope_never_empties_a_layer(setting):
    net = _net_with_a_small_layer()
    small = net[2].weight.detach().abs().clone()
    with pytest.warns(UserWarning, match=r"2\.weight .* kept its 3 largest of 300 weights") as caught:
        prune_(net, scope="global", **setting)
    assert "0.weight" not in str(caught[0].message)
    kept = net[2].weight != 0
    assert int(kept.sum()) == 3  # the floor: 1% of 300
    assert small[kept].min() >= small[~kept].max()  # its largest weights
    wider = _net_with_a_small_layer()
    with pytest.warns(UserWarning, match="kept its 30 largest"):
        prune_(wider, scope="global", min_density=0.1, **setting)
    assert torch.equal(wider[0].weight != 0, net[0].weight != 0)  # the other layer as the threshold says


def test_global_floor_keeps_at_least_one_weight_and_checks_its_value():
    net = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 1))
    with torch.no_grad():
        net[1].weight.mul_(1e-4)
    with pytest.warns(UserWarning, match=r"1\.weight .* kept its 1 largest of 5"):
        prune_(net, 0.9, scope="global", min_density=0.0)
    assert int((net[1].weight != 0).sum()) == 1
    with pytest.raises(DeepShrinkError, match=r"min_density=1.5 must be a number in \[0, 1\]"):
        prune_(net, 0.9, min_density=1.5)  # checked whatever the scope


def test_per_layer_mapping_and_pruning_only_grows():
    net = _net()
    prune_(net, {"0.weight": 0.5, "2.*": 0.2})
    first = current_mask(find_targets(net)[0]).clone()
    prune_(net, {"*": 0.8})
    second = current_mask(find_targets(net)[0])
    assert not torch.any(second & ~first)  # nothing comes back
    assert [round(r.kept_fraction, 2) for r in sparsity_report(net)] == [0.2, 0.2]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(sparsity=1.0), DeepShrinkError, r"sparsity=1.0 must be a number in \[0, 1\)"),
        (dict(sparsity=-0.1), DeepShrinkError, "sparsity=-0.1"),
        (dict(sparsity=0.5, quality=1.0), DeepShrinkError, "exactly one"),
        (dict(sparsity=0.5, scope="row"), DeepShrinkError, "scope='row'"),
        (
            dict(sparsity=0.5, layers=["fc9"]),
            DeepShrinkError,
            "matches no compressible weight; available: 0.weight, 2.weight",
        ),
        (dict(sparsity={"nope": 0.5}), DeepShrinkError, "'nope' matches no target"),
        (dict(sparsity={"*": 0.5}, scope="global"), DeepShrinkError, "one scalar"),
    ],
)
def test_invalid_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        prune_(_net(), **kwargs)


class WithOddLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.attn = nn.MultiheadAttention(4, 1)

    def forward(self, x):
        return self.fc(x)


def test_unsupported_layer_is_reported_by_name():
    model = WithOddLayer()
    with pytest.warns(UserWarning, match=r"attn.in_proj_weight \(MultiheadAttention\)"):
        prune_(model, 0.5)
    with pytest.raises(UnsupportedLayerError, match="attn.in_proj_weight"):
        prune_(model, 0.5, layers=["attn"])


def test_type_patterns_still_match_after_the_first_stage():
    from deepshrink.compress.quantize import share_weights_

    net = _net()
    prune_(net, 0.5, layers=["Linear"])
    assert [t.type_name for t in find_targets(net)] == ["Linear", "Linear"]  # not ParametrizedLinear
    report = share_weights_(net, bits=4, layers=["Linear"])
    assert [r.name for r in report] == ["0.weight", "2.weight"]


def _step_many(net, optimizer, steps=5):
    for _ in range(steps):
        loss = net(torch.randn(8, 20)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1),
    ],
)
def test_masks_hold_through_optimizer_steps_in_a_user_loop(make_opt):
    net = _net()
    optimizer = make_opt(net.parameters())  # made before pruning: momentum state already exists
    _step_many(net, optimizer, 2)
    prune_(net, 0.9)
    masks = [current_mask(t).clone() for t in find_targets(net)]
    _step_many(net, optimizer)
    for layer, mask in zip((net[0], net[2]), masks):
        assert torch.all(layer.weight[~mask] == 0)
        assert torch.any(layer.weight[mask] != layer.parametrizations.weight.original.grad.new_zeros(()))


def test_state_dict_round_trip_into_fresh_model_keeps_masks():
    net = _net()
    prune_(net, 0.8)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = _net()
    restore_(fresh, torch.load(buffer, weights_only=True))
    x = torch.randn(3, 20)
    assert torch.equal(fresh(x), net(x))
    _step_many(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    assert float((fresh[0].weight != 0).float().mean()) == pytest.approx(0.2)


def test_schedules():
    iterative = sparsity_schedule(0.9, 3)
    assert iterative[-1] == pytest.approx(0.9)
    kept = [1 - s for s in iterative]
    assert kept[1] / kept[0] == pytest.approx(kept[2] / kept[1])  # same share removed each round
    cubic = sparsity_schedule(0.9, 4, power=3)
    assert cubic[-1] == pytest.approx(0.9) and all(a < b for a, b in zip(cubic, cubic[1:]))
    with pytest.raises(DeepShrinkError, match="steps=0"):
        sparsity_schedule(0.9, 0)


def test_lstm_gates_and_conv_are_pruned():
    model = nn.ModuleDict({"conv": nn.Conv1d(3, 4, 3), "lstm": nn.LSTM(5, 6, num_layers=2), "emb": nn.Embedding(10, 5)})
    report = prune_(model, 0.5)
    assert [r.name for r in report] == [
        "conv.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
        "emb.weight",
    ]
    out, _ = model["lstm"](torch.randn(7, 2, 5))
    out.sum().backward()
    grad = model["lstm"].parametrizations.weight_hh_l0.original.grad
    assert torch.all(grad[model["lstm"].weight_hh_l0 == 0] == 0)
