"""Augmentations for overhead imagery: flips, 90-degree rotations, mild photometric jitter.

Overhead scenes have no "up", so the eight symmetries of the square (horizontal flip x 4 rotations
by 90 degrees) are all valid views. They are applied exactly (``torch.flip`` / ``torch.rot90``, no
interpolation) and boxes and ignore regions move with the image. Photometric jitter scales each
band's contrast and shifts its brightness by a few percent of the band's standard deviation, in
raw band units, so it works for any dtype and band count.

Every random draw comes from the ``torch.Generator`` passed in, never from global state, so a
sample's augmentation is a pure function of its seed (see :mod:`geonet.datasets`). torchvision's v2
transforms draw from the global RNG and rotate by interpolation; these few lines avoid both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["OverheadAugment", "hflip_boxes", "rot90_boxes"]


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Boxes ``[N, 4]`` xyxy after a horizontal flip of an image ``width`` pixels wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def rot90_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Boxes after ``torch.rot90(image, 1, dims=(1, 2))`` (90 degrees counter-clockwise).

    A pixel at ``(x, y)`` moves to ``(y, width - x)`` in the rotated ``width x height`` image.
    """
    return torch.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], dim=1)


class OverheadAugment:
    """Random dihedral transform plus photometric jitter.

    Args:
        flip: apply random horizontal flips.
        rotate: apply random 90-degree rotations (square chips keep their size; non-square swap H/W).
        contrast: max relative contrast change per band (0.1 = +-10 %).
        brightness: max brightness shift per band, as a fraction of ``band_std``.
        band_std: per-band standard deviation in raw units (from the training statistics).
    """

    def __init__(self, *, flip: bool = True, rotate: bool = True, contrast: float = 0.1, brightness: float = 0.1,
                 band_std: Sequence[float] | None = None):
        self.flip = flip
        self.rotate = rotate
        self.contrast = contrast
        self.brightness = brightness
        self.band_std = None if band_std is None else torch.as_tensor(band_std, dtype=torch.float32)

    def __call__(self, image: Tensor, target: dict, g: torch.Generator):
        boxes, ignore = target["boxes"], target["ignore"]
        if self.flip and torch.rand(1, generator=g).item() < 0.5:
            w = image.shape[-1]
            image = torch.flip(image, dims=(2,))
            boxes, ignore = hflip_boxes(boxes, w), hflip_boxes(ignore, w)
        if self.rotate:
            k = int(torch.randint(0, 4, (1,), generator=g))
            for _ in range(k):
                h, w = image.shape[-2:]
                image = torch.rot90(image, 1, dims=(1, 2))
                boxes, ignore = rot90_boxes(boxes, h, w), rot90_boxes(ignore, h, w)
        if self.contrast > 0 or self.brightness > 0:
            c = image.shape[0]
            mean = image.mean(dim=(1, 2), keepdim=True)
            scale = 1 + (torch.rand(c, 1, 1, generator=g) * 2 - 1) * self.contrast
            std = self.band_std.view(c, 1, 1) if self.band_std is not None and len(self.band_std) == c else \
                image.std(dim=(1, 2), keepdim=True)
            shift = (torch.rand(c, 1, 1, generator=g) * 2 - 1) * self.brightness * std
            image = (image - mean) * scale + mean + shift
        target = {**target, "boxes": boxes, "ignore": ignore}
        return image, target
