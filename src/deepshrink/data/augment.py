"""Random affine distortions of image batches, drawn per image, in torch on the fly.

Small shifts, rotations and rescalings of the training images are the classic way to
train MNIST networks past their plain error (Simard, Steinkraus and Platt, ICDAR 2003;
LeCun et al., Proc. IEEE 1998): the test images are untouched. Each image of a batch gets
its own draw, resampled bilinearly with zeros outside (``affine_grid`` / ``grid_sample``).
Draws come from torch's global generator, which :func:`deepshrink.compress.train.fit`
seeds, so a run stays reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from deepshrink.errors import DeepShrinkError


def _check(value: object, key: str, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < high:
        raise DeepShrinkError(f"{key}={value!r} must be a number in [0, {high:g})")
    return float(value)


@dataclass(frozen=True)
class RandomAffine:
    """A per-image random affine distortion of ``(N, C, H, W)`` batches.

    Attributes:
        shift: largest translation in pixels, along each axis (uniform in ``[-shift, shift]``).
        rotate: largest rotation in degrees.
        scale: largest relative change of size (0.1: from 0.9x to 1.1x).

    Raises:
        DeepShrinkError: a negative value, a rotation of 180 degrees or more, a scale of 1 or more.

    Examples:
        >>> images = torch.rand(8, 1, 28, 28)
        >>> RandomAffine(shift=2, rotate=10, scale=0.1)(images).shape
        torch.Size([8, 1, 28, 28])
        >>> torch.equal(RandomAffine()(images), images)
        True
    """

    shift: float = 0.0
    rotate: float = 0.0
    scale: float = 0.0

    def __post_init__(self) -> None:
        _check(self.shift, "shift", math.inf)
        _check(self.rotate, "rotate", 180)
        _check(self.scale, "scale", 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` distorted, one random draw per image.

        Raises:
            DeepShrinkError: ``images`` is not a 4-D ``(N, C, H, W)`` batch.
        """
        if images.dim() != 4:
            raise DeepShrinkError(
                f"augmentation needs image batches (N, C, H, W), got shape {tuple(images.shape)}; "
                "drop `augment` for data that are not images"
            )
        if not (self.shift or self.rotate or self.scale):
            return images
        n, _, h, w = images.shape
        u = torch.rand(n, 4, device=images.device) * 2 - 1
        angle = u[:, 0] * math.radians(self.rotate)
        zoom = 1 + u[:, 1] * self.scale
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # affine_grid works in coordinates normalised to [-1, 1] per axis: one pixel is 2/w
        # across and 2/h down, and a rotation of a non-square image needs the aspect ratio.
        theta = torch.stack(
            [
                torch.stack([cos, -sin * h / w, u[:, 2] * self.shift * 2 / w], 1),
                torch.stack([sin * w / h, cos, u[:, 3] * self.shift * 2 / h], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
