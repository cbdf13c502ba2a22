"""Random affine augmentation: the geometry is right, draws are per image and seeded, fit applies it."""

from __future__ import annotations

import pytest
import torch

from deepshrink.compress.train import TrainConfig, fit
from deepshrink.data.augment import RandomAffine
from deepshrink.errors import DeepShrinkError


def _extreme_draws(monkeypatch) -> None:
    """Every uniform draw at its upper end: the largest shift, rotation and scale, in a known direction."""
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, **kw))


def test_a_whole_pixel_shift_moves_the_image_exactly(monkeypatch):
    images = torch.rand(3, 2, 9, 13, generator=torch.Generator().manual_seed(0))
    _extreme_draws(monkeypatch)
    shifted = RandomAffine(shift=1)(images)
    # Output pixel (i, j) samples input (i + 1, j + 1); the last row and column fall outside.
    torch.testing.assert_close(shifted[..., :-1, :-1], images[..., 1:, 1:])
    assert shifted[..., -1, :].abs().max() == 0 and shifted[..., :, -1].abs().max() == 0


def test_a_rotation_is_rigid_on_a_non_square_image(monkeypatch):
    _extreme_draws(monkeypatch)
    image = torch.zeros(1, 1, 15, 31)
    image[0, 0, 7, 12:19] = 1  # a cross centred on the middle pixel: arms of 3 across, 1 down
    image[0, 0, 6:9, 15] = 1
    rotated = RandomAffine(rotate=90)(image)
    expected = torch.zeros_like(image)
    expected[0, 0, 4:11, 15] = 1  # a quarter turn: arms of 3 down, 1 across, not sheared by the aspect ratio
    expected[0, 0, 7, 14:17] = 1
    torch.testing.assert_close(rotated, expected, atol=1e-5, rtol=0)


def test_scaling_keeps_the_centre_and_grows_the_image(monkeypatch):
    _extreme_draws(monkeypatch)
    image = torch.zeros(1, 1, 21, 21)
    image[0, 0, 8:13, 8:13] = 1  # a 5x5 square in the middle
    smaller = RandomAffine(scale=0.5)(image)  # zoom 1.5: each output pixel samples 1/1.5 as far from the centre
    assert smaller[0, 0, 10, 10] == 1
    assert float(smaller.sum()) == pytest.approx(25 * 1.5**2, rel=0.1)


def test_each_image_gets_its_own_seeded_draw():
    images = torch.rand(1, 1, 28, 28).expand(6, 1, 28, 28).contiguous()
    augment = RandomAffine(shift=2, rotate=10, scale=0.1)
    torch.manual_seed(0)
    first = augment(images)
    torch.manual_seed(0)
    assert torch.equal(augment(images), first)
    assert all(not torch.allclose(first[0], first[i]) for i in range(1, 6))
    assert torch.equal(RandomAffine()(images), images)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"shift": -1}, "shift=-1 must be a number in [0, inf)"),
        ({"rotate": 180}, "rotate=180 must be a number in [0, 180)"),
        ({"scale": 1.0}, "scale=1.0 must be a number in [0, 1)"),
        ({"scale": "0.1"}, "scale='0.1' must be a number"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(DeepShrinkError) as err:
        RandomAffine(**settings)
    assert message in str(err.value)


def test_inputs_that_are_not_image_batches_are_refused():
    with pytest.raises(DeepShrinkError, match=r"image batches \(N, C, H, W\), got shape \(8, 64\)"):
        RandomAffine(shift=1)(torch.rand(8, 64))


def test_fit_augments_every_training_batch():
    seen = []

    def augment(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return torch.zeros_like(x)  # nothing left to learn from

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    weight, bias = net[1].weight.detach().clone(), net[1].bias.detach().clone()
    data = (torch.rand(40, 1, 4, 4), torch.randint(0, 2, (40,)))
    fit(net, data, TrainConfig(epochs=2, batch_size=16, lr=0.5, weight_decay=0, augment=augment, progress=False))
    assert seen == [16, 16, 8] * 2
    # The net trained on the augmented (all-zero) inputs: no gradient reached the weights, only the bias.
    assert torch.equal(net[1].weight, weight) and not torch.equal(net[1].bias, bias)
