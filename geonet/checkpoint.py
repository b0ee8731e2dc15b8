"""The self-describing detector checkpoint: what training writes and detection reads.

A geonet checkpoint is a ``torch.save`` of a dict of plain data and tensors only, loaded with
``torch.load(weights_only=True)``: a checkpoint from a stranger cannot run code. Keys:

* ``format`` = ``"geonet-detector"``, ``format_version`` = 1, ``geonet_version``;
* ``model_config``: :meth:`geonet.model.ModelConfig.to_dict` (backbone, anchors, thresholds,
  band count, per-band mean/std);
* ``classes``: class names, ``classes[i]`` has id ``i + 1``;
* ``bands`` (1-based band indexes read from the rasters, in order), ``dtype``, ``nodata``;
* ``gsd``: training GSD in metres ``[x, y]`` (median over training rasters, ``None`` if not georeferenced);
* ``chip_size``: training chip side in pixels;
* ``box_stats`` / ``box_stats_m``: percentiles (0, 5, 50, 95, 100) of training box width/height/side in
  pixels and in metres (the default detection overlap is the largest box);
* ``train_config``: the resolved training options; ``metrics``: the validation metrics of this epoch;
* ``epoch``; ``state_dict``: the model weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

import geonet
from geonet.atomic import atomic_file
from geonet.errors import InputError
from geonet.model import GeoRetinaNet, ModelConfig, build_model

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "read_checkpoint", "file_sha256"]

FORMAT = "geonet-detector"


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, cfg: ModelConfig, meta: dict) -> None:
    """Write a checkpoint atomically (temporary file + rename).

    Args:
        path: output ``.pt`` path.
        model: the detector (its ``state_dict`` is saved on the CPU).
        cfg: its configuration.
        meta: the other keys (``classes``, ``bands``, ``dtype``, ``nodata``, ``gsd``, ``chip_size``,
            ``box_stats``, ``train_config``, ``metrics``, ``epoch``); plain Python data only.
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "format_version": 1, "geonet_version": geonet.__version__,
               "model_config": cfg.to_dict(), **meta, "state_dict": state}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | os.PathLike[str]) -> dict:
    """Load a checkpoint dict with ``weights_only=True``.

    Raises:
        InputError: missing file, a file that is not a geonet checkpoint, or one that needs code to
            unpickle.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("--model: no such file.", path=p, fix="pass runs/NAME/best.pt from `geonet train`.")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"is not a geonet checkpoint (torch.load with weights_only=True failed: "
                         f"{type(exc).__name__}).", path=p,
                         fix="pass the best.pt or last.pt that `geonet train` wrote.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError("is not a geonet checkpoint (no 'format: geonet-detector').", path=p,
                         fix="pass the best.pt or last.pt that `geonet train` wrote.")
    return ckpt


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[GeoRetinaNet, dict]:
    """Rebuild the detector from a checkpoint.

    Returns:
        ``(model, ckpt)``: the model in eval mode on the CPU, and the checkpoint dict (without
        ``state_dict``).
    """
    ckpt = read_checkpoint(path)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    model = build_model(cfg, weights="none")
    model.load_state_dict(ckpt.pop("state_dict"))
    model.eval()
    return model, ckpt


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file (the model hash recorded in detection outputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
