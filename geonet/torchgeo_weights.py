"""Backbones from TorchGeo's pretrained weights: ``--weights torchgeo:ENUM.MEMBER``.

`TorchGeo <https://torchgeo.readthedocs.io/en/stable/api/weights.html>`_ publishes ResNet weights trained on
Sentinel-2, Sentinel-1, Landsat and NAIP imagery (self-supervised: MoCo, SeCo, DINO...), with the band count,
band names and, for most, the normalisation they were trained with. For example
``torchgeo:ResNet50_Weights.SENTINEL2_ALL_MOCO`` (13 Sentinel-2 bands, values / 10000) or
``torchgeo:ResNet18_Weights.SENTINEL2_RGB_MOCO``.

* The weights enum is TorchGeo's own (``torchgeo.models``), so the file comes through its URL and the torch hub
  cache (``$TORCH_HOME/hub/checkpoints``), like torchvision's; offline with nothing cached, the error names the
  file and where to place it.
* Their keys are timm's ResNet names, which are torchvision's: they load into geonet's ResNet body as is;
  their first conv already takes the weights' band count, so the imagery must give that many bands
  (``--bands`` picks and orders them; a mismatch is an error naming both lists).
* The normalisation of the weights (their ``transforms``' ``Normalize``) replaces the band statistics of the
  training data, so the backbone sees values on the scale it was trained on.

TorchGeo is an optional dependency: ``pip install 'geonet[torchgeo]'``. (geonet does not use TorchGeo's
``VectorDataset`` for labels: 92x slower per window than geonet's STR-tree labelling, ``bench/torchgeo_labels_bench.py``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from geonet.errors import InputError

__all__ = ["PREFIX", "TorchGeoWeights", "is_torchgeo", "resolve_torchgeo"]

PREFIX = "torchgeo:"


def is_torchgeo(weights: str | None) -> bool:
    """Whether ``--weights`` names TorchGeo weights (``torchgeo:ENUM.MEMBER``)."""
    return bool(weights) and str(weights).startswith(PREFIX)


@dataclass(frozen=True)
class TorchGeoWeights:
    """A TorchGeo weights member and what geonet needs of it.

    Attributes:
        name: ``ENUM.MEMBER`` as given.
        member: the ``torchgeo.models`` weights enum member (``.url``, ``.meta``, ``.get_state_dict``).
        backbone: geonet's backbone name (``resnet18``, ``resnet50``).
        in_chans: bands the first conv takes.
        bands: the weights' band names (``["B1", ..., "B12"]``), or ``None`` where they do not say.
        mean, std: per-band normalisation of the weights (band values), or ``None`` where they define none.
    """

    name: str
    member: object
    backbone: str
    in_chans: int
    bands: tuple[str, ...] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def check_backbone(self, backbone: str) -> None:
        """Raise :class:`InputError` when ``backbone`` is not the one the weights were trained for."""
        if backbone != self.backbone:
            raise InputError(f"--weights torchgeo:{self.name} are for {self.backbone}, not --backbone {backbone}.",
                             fix=f"pass --backbone {self.backbone}.")

    def check_bands(self, in_channels: int, bands: Sequence[int] | None) -> None:
        """Raise :class:`InputError` naming both lists when the imagery's band count differs from the weights'."""
        if in_channels == self.in_chans:
            return
        theirs = f"{self.in_chans} bands" + (f" {list(self.bands)}" if self.bands else "")
        ours = f"{in_channels} band(s) " + (str(list(bands)) if bands else "(all but alpha)")
        raise InputError(f"--weights torchgeo:{self.name} expects {theirs}; the imagery gives {ours}.",
                         fix=f"pass --bands with {self.in_chans} band numbers of the imagery in the weights' order, "
                             "or choose weights for the imagery's bands.")


def _normalisation(member, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` of the ``Normalize`` in the member's ``transforms`` (broadcast to ``in_chans``)."""
    transforms = getattr(member, "transforms", None)
    mods = list(transforms.modules()) if hasattr(transforms, "modules") else []
    for m in mods:
        if type(m).__name__ == "Normalize" and hasattr(m, "mean") and hasattr(m, "std"):
            import torch

            mean = torch.as_tensor(m.mean, dtype=torch.float64).flatten().tolist()
            std = torch.as_tensor(m.std, dtype=torch.float64).flatten().tolist()
            if len(mean) == 1:
                mean = mean * in_chans
            if len(std) == 1:
                std = std * in_chans
            if len(mean) == len(std) == in_chans:
                return tuple(mean), tuple(std)
    return None


def resolve_torchgeo(weights: str) -> TorchGeoWeights:
    """``"torchgeo:ResNet50_Weights.SENTINEL2_ALL_MOCO"`` -> :class:`TorchGeoWeights`.

    Raises:
        InputError: TorchGeo missing, an unknown enum or member (the message lists the choices), or weights of
            a model geonet has no backbone for.
    """
    from geonet.model import BACKBONES

    name = weights[len(PREFIX):]
    try:
        import torchgeo.models as tgm
    except ImportError as exc:
        raise InputError(f"--weights {weights} needs TorchGeo, which is not installed ({exc.name or exc}).",
                         fix="pip install 'geonet[torchgeo]'.") from None
    enum_name, _, member_name = name.partition(".")
    enum = getattr(tgm, enum_name, None)
    resnets = sorted(n for n in dir(tgm) if n.startswith("ResNet") and n.endswith("_Weights"))
    if enum is None or not member_name:
        raise InputError(f"--weights {weights}: give torchgeo:ENUM.MEMBER with ENUM one of {resnets}.",
                         fix="e.g. --weights torchgeo:ResNet50_Weights.SENTINEL2_ALL_MOCO.")
    member = getattr(enum, member_name, None)
    if member is None:
        raise InputError(f"--weights {weights}: {enum_name} has no {member_name}; it has "
                         f"{[m.name for m in enum]}.", fix="pick one of those.")
    meta = dict(member.meta)
    model = str(meta.get("model", ""))
    if model not in BACKBONES:
        raise InputError(f"--weights {weights}: the weights are for {model!r}, which geonet has no backbone for.",
                         fix=f"choose ResNet18_Weights or ResNet50_Weights members ({', '.join(resnets)}).")
    in_chans = int(meta.get("in_chans", 3))
    norm = _normalisation(member, in_chans)
    bands = meta.get("bands")
    return TorchGeoWeights(name=name, member=member, backbone=model, in_chans=in_chans,
                           bands=tuple(bands) if bands else None,
                           mean=norm[0] if norm else None, std=norm[1] if norm else None)
