"""Calibration, one-shot pruning and sharing, and distillation: compression without labels."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepshrink.compress.calibrate import calibrate
from deepshrink.compress.distill import DistillConfig, distill, relative_error
from deepshrink.compress.oneshot import prune_calibrated_, share_calibrated_
from deepshrink.compress.parametrization import compression_of, current_mask
from deepshrink.compress.prune import Mask, prune_
from deepshrink.compress.quantize import (
    LatentSharedWeight,
    SharedWeight,
    compressed_tensors,
    fix_sharing_,
    kmeans_1d,
    latent_sharing_,
    nearest_code,
    share_weights_,
)
from deepshrink.data.digits import load_digits
from deepshrink.errors import DeepShrinkError


class Tokens(nn.Module):
    """A tokenizer-fed model: embedding, then a linear map per position (keyword inputs, padding masked)."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(input_ids)) * attention_mask.unsqueeze(-1)


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features differ in scale and correlate, as real activations do."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.logspace(-1, 1, dim)
    return torch.randn(n, dim, generator=g) @ mix


def output_error(layer: nn.Linear, reference: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((layer(x) - x @ reference.T) ** 2).mean())


def test_gram_matrix_of_linear_and_conv_inputs():
    x = torch.randn(5, 3, 6, 6)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(144, 2))
    calib = calibrate(net, [x[:2], x[2:]], progress=False)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    assert torch.allclose(calib.layers["0.weight"].gram, patches.T @ patches, rtol=1e-4, atol=1e-3)
    assert calib.layers["0.weight"].vectors == 5 * 36
    flat = net[1](net[0](x)).detach()
    assert torch.allclose(calib.layers["2.weight"].gram, flat.T @ flat, rtol=1e-4, atol=1e-2)
    assert calib.batches == 2


def test_padding_is_left_out_of_token_statistics():
    model = Tokens()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    calib = calibrate(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    lookups = calib.layers["emb.weight"].lookups
    assert lookups[0] == 0 and lookups[1:6].tolist() == [1, 1, 1, 1, 1]
    real = model.emb(ids)[mask.bool()].detach()
    assert torch.allclose(calib.layers["proj.weight"].gram, real.T @ real, atol=1e-5)
    assert calib.layers["proj.weight"].vectors == 5


def test_calibrate_needs_a_batch():
    with pytest.raises(DeepShrinkError, match="at least one batch"):
        calibrate(nn.Linear(2, 2), [], progress=False)


def test_wanda_keeps_weights_on_loud_inputs_and_prunes_each_row_exactly():
    layer = nn.Linear(16, 8)
    x = correlated_inputs(256, 16)
    reference = layer.weight.detach().clone()
    calib = calibrate(layer, [x], progress=False)
    report = prune_calibrated_(layer, calib, 0.5, method="wanda", progress=False)
    assert report[0].kept == 64
    assert (current_mask(_target(layer)).sum(1) == 8).all()  # Wanda's comparison group: one output row
    magnitude = copy.deepcopy(layer)
    with torch.no_grad():
        magnitude.parametrizations.weight.original.copy_(reference)
        magnitude.parametrizations.weight[0].mask.fill_(True)
    prune_(magnitude, 0.5, progress=False)
    assert output_error(layer, reference, x) < output_error(magnitude, reference, x)


def _target(module: nn.Module):
    from deepshrink.compress.targets import find_targets

    return find_targets(module)[0]


def test_sparsegpt_updates_the_survivors_and_beats_wanda():
    torch.manual_seed(0)
    x = correlated_inputs(512, 32)
    errors = {}
    for method in ("wanda", "sparsegpt"):
        torch.manual_seed(1)
        layer = nn.Linear(32, 16, bias=False)
        reference = layer.weight.detach().clone()
        calib = calibrate(layer, [x], progress=False)
        prune_calibrated_(layer, calib, 0.6, method=method, progress=False)
        w = layer.weight.detach()
        assert int((w != 0).sum()) <= 16 * (32 - 19)  # 60% of each row of 32, rounded down
        assert isinstance(compression_of(layer, "weight"), Mask)
        errors[method] = output_error(layer, reference, x)
    assert errors["sparsegpt"] < 0.8 * errors["wanda"]


def test_calibrated_sharing_keeps_masks_codes_and_beats_plain_kmeans():
    x = correlated_inputs(512, 32)
    errors = {}
    for how in ("plain", "calibrated"):
        torch.manual_seed(2)
        layer = nn.Linear(32, 16)
        reference = layer.weight.detach().clone()
        prune_(layer, 0.3, progress=False)
        mask = current_mask(_target(layer)).clone()
        if how == "plain":
            share_weights_(layer, bits=3, progress=False)
        else:
            report = share_calibrated_(layer, calibrate(layer, [x], progress=False), bits=3, progress=False)
            assert report[0].kept == int(mask.sum()) and report[0].clusters <= 8
        w = layer.weight.detach()
        assert torch.all(w[~mask] == 0)
        assert torch.unique(w[mask]).numel() <= 8
        assert isinstance(compression_of(layer, "weight"), SharedWeight)
        errors[how] = output_error(layer, reference * mask, x)
    assert errors["calibrated"] < errors["plain"]


def test_one_shot_stages_cover_embeddings_and_uncalibrated_layers():
    model = nn.Sequential(Tokens(), nn.Linear(8, 4))
    batch = {"input_ids": torch.randint(1, 20, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    calib = calibrate(model[0], [batch], progress=False)  # the last Linear is never reached: no statistics
    assert set(calib.layers) == {"emb.weight", "proj.weight"}
    prune_calibrated_(model[0], calib, 0.5, method="sparsegpt", progress=False)
    share_calibrated_(model[0], calib, bits=2, progress=False)
    tensors = compressed_tensors(model[0])
    assert set(tensors) == {"emb.weight", "proj.weight"}
    assert all(ct.codebook.size <= 4 for ct in tensors.values())
    share_calibrated_(model, calib, bits={"1": 3}, layers=["1"], progress=False)  # plain k-means there
    assert torch.unique(model[1].weight.detach()).numel() <= 8


def test_one_shot_errors_name_the_problem():
    layer = nn.Linear(4, 4)
    calib = calibrate(layer, [torch.randn(8, 4)], progress=False)
    with pytest.raises(DeepShrinkError, match="method"):
        prune_calibrated_(layer, calib, 0.5, method="obs", progress=False)
    with pytest.raises(DeepShrinkError, match="sparsity"):
        prune_calibrated_(layer, calib, 1.0, progress=False)
    with pytest.raises(DeepShrinkError, match="bits"):
        share_calibrated_(layer, calib, bits=0, progress=False)
    share_calibrated_(layer, calib, bits=2, progress=False)
    with pytest.raises(DeepShrinkError, match="prune before weight sharing"):
        prune_calibrated_(layer, calib, 0.5, progress=False)


def test_weighted_kmeans_follows_the_weights():
    values = np.array([0.0, 0.1, 1.0, 1.1])
    plain, _ = kmeans_1d(values, 1)
    heavy, _ = kmeans_1d(values, 1, weights=np.array([1.0, 1.0, 1.0, 97.0]))
    assert plain[0] == pytest.approx(0.55) and heavy[0] == pytest.approx((0.1 + 1.0 + 106.7) / 100)
    same, codes = kmeans_1d(values, 2, weights=np.ones(4))
    assert same.tolist() == pytest.approx([0.05, 1.05]) and codes.tolist() == [0, 0, 1, 1]
    with pytest.raises(DeepShrinkError, match="weights"):
        kmeans_1d(values, 2, weights=np.array([1.0, -1.0, 1.0, 1.0]))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-20, 20), min_size=1, max_size=30),
    st.lists(st.integers(-8, 8), min_size=1, max_size=9),
)
def test_nearest_code_picks_the_nearest_entry_and_the_lower_on_a_tie(values, entries):
    values, codebook = torch.tensor(values, dtype=torch.float32) / 2, torch.tensor(entries, dtype=torch.float32)
    distance = (values[:, None] - codebook[None, :]).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    expected = torch.where(nearest, codebook[None, :], torch.inf).min(dim=1).values  # the lower of tied entries
    assert torch.equal(codebook[nearest_code(values, codebook)], expected)


def test_latent_sharing_round_trips_and_lets_codes_move():
    torch.manual_seed(3)
    layer = nn.Linear(16, 16)
    prune_(layer, 0.5, progress=False)
    share_weights_(layer, bits=2, progress=False)
    before = layer.weight.detach().clone()
    assert latent_sharing_(layer) == 1
    assert isinstance(compression_of(layer, "weight"), LatentSharedWeight)
    assert torch.equal(layer.weight.detach(), before)
    opt = torch.optim.SGD([layer.parametrizations.weight.original], lr=10.0)
    loss = (layer(torch.randn(32, 16)) ** 2).sum()
    loss.backward()
    opt.step()
    moved = layer.weight.detach()
    assert torch.all(moved[before == 0] == 0)  # pruned weights stay zero
    assert set(torch.unique(moved[before != 0]).tolist()) <= set(compression_of(layer, "weight").codebook.tolist())
    assert not torch.equal(moved, before)  # some weight changed cluster
    assert fix_sharing_(layer) == 1
    assert isinstance(compression_of(layer, "weight"), SharedWeight)
    assert torch.equal(layer.weight.detach(), moved)


def test_relative_error_masks_padding():
    s, t = torch.ones(1, 2, 3), torch.ones(1, 2, 3)
    s[0, 1] = 5.0
    assert relative_error(s, t, torch.tensor([[True, False]])).item() == 0.0
    with pytest.raises(DeepShrinkError, match="differs"):
        relative_error(torch.ones(2), torch.ones(3))


@pytest.mark.parametrize("quantization_aware", [False, True])
def test_distillation_brings_the_student_back_to_the_teacher(quantization_aware):
    torch.manual_seed(0)
    images = load_digits("train")[0][:512].reshape(512, -1)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    student = copy.deepcopy(teacher)
    batches = [images[i : i + 32] for i in range(0, 512, 32)]
    calib = calibrate(student, batches, progress=False)
    prune_calibrated_(student, calib, 0.7, method="wanda", progress=False)
    share_calibrated_(student, calib, bits=2, progress=False)
    masks = {n: current_mask(t).clone() for n, t in _targets(student)}
    with torch.no_grad():
        before = relative_error(student(images), teacher(images)).item()
    cfg = DistillConfig(steps=60, lr=3e-3, quantization_aware=quantization_aware, hidden=("1",), progress=False)
    history = distill(student, teacher, batches, cfg)
    with torch.no_grad():
        after = relative_error(student(images), teacher(images)).item()
    assert after < 0.7 * before and history[-1]["step"] == 60
    for name, t in _targets(student):
        assert isinstance(compression_of(t.module, t.param), SharedWeight)
        assert torch.equal(current_mask(t), masks[name])
        assert torch.unique(t.weight.detach()[masks[name]]).numel() <= 4


def _targets(model: nn.Module):
    from deepshrink.compress.targets import find_targets

    return [(t.name, t) for t in find_targets(model)]


def test_frozen_modules_keep_every_parameter_and_train_again_afterwards():
    torch.manual_seed(1)
    teacher = Tokens()
    student = copy.deepcopy(teacher)
    share_weights_(student, bits=2, progress=False)
    batches = [{"input_ids": torch.randint(0, 20, (4, 6)), "attention_mask": torch.ones(4, 6)} for _ in range(4)]
    table = student.emb.weight.detach().clone()
    projection = student.proj.weight.detach().clone()
    trains = {n: p.requires_grad for n, p in student.emb.named_parameters()}
    distill(student, teacher, batches, DistillConfig(steps=20, lr=1e-2, frozen=("emb",), progress=False))
    assert torch.equal(student.emb.weight.detach(), table)  # neither codes nor centroids moved
    assert isinstance(compression_of(student.emb, "weight"), SharedWeight)
    assert not torch.equal(student.proj.weight.detach(), projection)
    assert {n: p.requires_grad for n, p in student.emb.named_parameters()} == trains
    assert any(trains.values())  # the centroids train again in a later fine-tuning


def test_distillation_on_the_cpu_is_deterministic_and_restores_the_callers_setting():
    torch.manual_seed(2)
    teacher = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    batches = [torch.randn(16, 64) for _ in range(4)]
    seen = []
    students = []
    for _ in range(2):
        student = copy.deepcopy(teacher)
        share_weights_(student, bits=2, progress=False)
        student[0].register_forward_hook(lambda *_: seen.append(torch.are_deterministic_algorithms_enabled()))
        distill(student, teacher, batches, DistillConfig(steps=8, lr=1e-2, progress=False))
        students.append(student)
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    first, second = (s.state_dict() for s in students)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first if isinstance(first[k], torch.Tensor))


def test_distill_rejects_unknown_hidden_or_frozen_modules():
    with pytest.raises(DeepShrinkError, match="hidden pattern"):
        distill(nn.Linear(2, 2), nn.Linear(2, 2), [torch.ones(1, 2)], DistillConfig(steps=1, hidden=("nope",)))
    with pytest.raises(DeepShrinkError, match="frozen pattern"):
        distill(nn.Linear(2, 2), nn.Linear(2, 2), [torch.ones(1, 2)], DistillConfig(steps=1, frozen=("nope",)))
    with pytest.raises(DeepShrinkError, match="steps"):
        DistillConfig(steps=0)
