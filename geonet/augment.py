"""Augmentations for overhead imagery: the eight symmetries of the square, scale jitter around the training
GSD, and photometric jitter that works in raw band units for any band count.

* **Dihedral.** Overhead scenes have no "up", so horizontal flips and rotations by 90 degrees are all
  valid views. They are exact (``torch.flip`` / ``torch.rot90``, no interpolation); boxes and ignore
  regions move with the image.
* **Scale.** The window is resized by a factor drawn log-uniformly from ``scale`` (bilinear, with
  antialiasing when shrinking), so the model sees objects a little larger and smaller than at the
  training GSD: scenes are resampled to the training GSD at detection, but crowns, roofs and vehicles
  vary in size between sites.
* **Photometric.** Per band: contrast (scale around the band's mean), brightness (a shift in units of
  the band's standard deviation) and gain. With three bands (RGB), also saturation (blend with the
  luma) and hue (a rotation of the chroma in YIQ space). All are linear in the raw values, so they need
  no value range and work for uint8, uint16 and float imagery alike. Sensors and sites differ in
  exactly these ways (illumination, white balance, season).

Every random draw comes from the ``torch.Generator`` passed in, never from global state, so a
sample's augmentation is a pure function of its seed (see :mod:`geonet.datasets`). torchvision's v2
transforms draw from the global RNG and rotate by interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["OverheadAugment", "hflip_boxes", "rot90_boxes"]

#: RGB -> YIQ (NTSC): Y is the luma; hue rotates the (I, Q) plane.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Boxes ``[N, 4]`` xyxy after a horizontal flip of an image ``width`` pixels wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def rot90_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Boxes after ``torch.rot90(image, 1, dims=(1, 2))`` (90 degrees counter-clockwise).

    A pixel at ``(x, y)`` moves to ``(y, width - x)`` in the rotated ``width x height`` image.
    """
    return torch.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], dim=1)


def _uniform(g: torch.Generator, lo: float, hi: float, *shape) -> Tensor:
    return lo + (hi - lo) * torch.rand(*(shape or (1,)), generator=g)


class OverheadAugment:
    """Random dihedral transform, scale jitter and photometric jitter (module docstring).

    Args:
        flip: random horizontal flips.
        rotate: random 90-degree rotations (square chips keep their size; non-square swap H/W).
        scale: ``(min, max)`` resize factor, drawn log-uniformly; ``None`` or ``(1, 1)``: off.
        contrast: max relative contrast change per band (0.1 = +-10 %).
        brightness: max brightness shift per band, as a fraction of ``band_std``.
        gain: max relative gain per band (multiplies the band around zero).
        saturation: max relative saturation change (RGB only).
        hue: max hue rotation in degrees (RGB only).
        band_std: per-band standard deviation in raw units (from the training statistics).

    Call: ``(image FloatTensor[C, H, W] raw values, target dict with boxes [N, 4] and ignore [M, 4], generator)``
    -> ``(image, target)``; ``H`` and ``W`` change with the scale.
    """

    def __init__(self, *, flip: bool = True, rotate: bool = True, scale: tuple[float, float] | None = None,
                 contrast: float = 0.1, brightness: float = 0.1, gain: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0, band_std: Sequence[float] | None = None):
        self.flip = flip
        self.rotate = rotate
        self.scale = scale
        self.contrast = contrast
        self.brightness = brightness
        self.gain = gain
        self.saturation = saturation
        self.hue = hue
        self.band_std = None if band_std is None else torch.as_tensor(band_std, dtype=torch.float32)

    @classmethod
    def for_training(cls, *, strength: str, band_std: Sequence[float] | None = None,
                     scale: tuple[float, float] | None = None) -> OverheadAugment:
        """The augmentation of a ``--augment`` level: ``"light"`` (dihedral, +-10 % contrast and brightness,
        as geonet 0.1 did) or ``"strong"`` (also scale 0.8-1.25, +-25 % contrast, gain +-10 %, saturation
        +-30 %, hue +-10 degrees, brightness +-20 % of a standard deviation). ``scale`` replaces the level's
        scale range (``--scale-range``)."""
        if strength == "light":
            return cls(band_std=band_std, scale=scale)
        if strength == "strong":
            return cls(scale=scale or (0.8, 1.25), contrast=0.25, brightness=0.2, gain=0.1, saturation=0.3,
                       hue=10.0, band_std=band_std)
        raise ValueError(f"unknown augmentation strength {strength!r}")

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
        if self.scale is not None and self.scale[0] != self.scale[1]:
            lo, hi = math.log(self.scale[0]), math.log(self.scale[1])
            image, boxes, ignore = self._resize(image, boxes, ignore, math.exp(float(_uniform(g, lo, hi))))
        image = self._photometric(image, g)
        target = {**target, "boxes": boxes, "ignore": ignore}
        return image, target

    @staticmethod
    def _resize(image: Tensor, boxes: Tensor, ignore: Tensor, s: float):
        h, w = image.shape[-2:]
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        image = torch.nn.functional.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False,
                                                antialias=s < 1)[0]
        f = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=boxes.dtype)
        return image, boxes * f, ignore * f

    def _photometric(self, image: Tensor, g: torch.Generator) -> Tensor:
        c = image.shape[0]
        mean = image.mean(dim=(1, 2), keepdim=True)  # [C, 1, 1]
        if c == 3 and (self.saturation > 0 or self.hue > 0):
            yiq = torch.einsum("ij,jhw->ihw", _YIQ, image)
            sat = float(_uniform(g, 1 - self.saturation, 1 + self.saturation))
            theta = math.radians(float(_uniform(g, -self.hue, self.hue)))
            cos, sin = math.cos(theta) * sat, math.sin(theta) * sat
            rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
            image = torch.einsum("ij,jhw->ihw", torch.linalg.inv(_YIQ) @ rot, yiq)
        if self.contrast > 0 or self.brightness > 0 or self.gain > 0:
            scale = _uniform(g, 1 - self.contrast, 1 + self.contrast, c, 1, 1)
            std = self.band_std.view(c, 1, 1) if self.band_std is not None and len(self.band_std) == c else \
                image.std(dim=(1, 2), keepdim=True)
            shift = _uniform(g, -self.brightness, self.brightness, c, 1, 1) * std
            gain = _uniform(g, 1 - self.gain, 1 + self.gain, c, 1, 1)
            image = ((image - mean) * scale + mean + shift) * gain
        return image
