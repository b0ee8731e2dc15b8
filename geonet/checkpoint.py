"""The self-describing detector checkpoint: what training writes and detection reads.

A geonet checkpoint is a ``torch.save`` of a dict of plain data and tensors only, loaded with
``torch.load(weights_only=True)``: a checkpoint from a stranger cannot run code. Its keys are the
fields of :class:`CheckpointHeader` (``format`` = ``"geonet-detector"``, ``format_version``, the model
configuration, classes, bands, dtype, nodata, GSD, chip size, box statistics, training options,
validation metrics and epoch) plus ``state_dict``, the model weights. This module alone writes and
reads that dict; everything else sees a :class:`CheckpointHeader`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

import geonet
from geonet.atomic import atomic_file
from geonet.errors import InputError
from geonet.model import GeoRetinaNet, ModelConfig, build_model

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointHeader", "OperatingPoint", "save_checkpoint",
           "read_checkpoint", "load_checkpoint", "file_sha256"]

FORMAT = "geonet-detector"
#: 1: the first release; 2: the same keys, read through :class:`CheckpointHeader`; 3: a classification
#: layer of K outputs (1 and 2 had K + 1, output 0 for the background; loading drops it).
FORMAT_VERSION = 3


@dataclass(frozen=True)
class OperatingPoint:
    """The score threshold chosen on the validation set, and what it gave there.

    Attributes:
        iou: IoU at which detections were matched to the truth.
        score_thresh: the score that maximised F1 at ``iou``: ``geonet detect``'s default threshold.
        precision, recall, f1: at that threshold, on the validation set.
        nms_iou: the NMS IoU chosen with it (``None`` in checkpoints before it was chosen).
    """

    iou: float
    score_thresh: float
    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0
    nms_iou: float | None = None


@dataclass
class CheckpointHeader:
    """Everything about a detector except its weights (see the module docstring).

    Attributes:
        model_config: rebuilds the network (:func:`geonet.model.build_model`).
        classes: class names; ``classes[i]`` has class id ``i + 1``.
        bands: 1-based band indexes read from the rasters, in order (``None``: all but alpha).
        dtype: numpy dtype of the training imagery (the normalisation fits only that).
        nodata: nodata value of the training imagery.
        gsd: training GSD ``[x, y]`` in metres (median over the training rasters; ``None`` if not
            georeferenced).
        chip_size: training chip side in pixels.
        box_stats, box_stats_m: percentiles (0, 5, 50, 95, 100) of training box ``width``, ``height``
            and ``side`` in pixels and in metres.
        train_config: the resolved training options (:meth:`geonet.training.TrainConfig.to_dict`).
        metrics: validation metrics of the saved epoch (:func:`geonet.metrics.coco_metrics` keys, plus
            ``operating_point``).
        epoch: the saved epoch (0-based).
        geonet_version: version that wrote it.
        format_version: :data:`FORMAT_VERSION` of the writer.
    """

    model_config: ModelConfig
    classes: list[str]
    bands: list[int] | None = None
    dtype: str = "float32"
    nodata: float | None = None
    gsd: list[float] | None = None
    chip_size: int = 512
    box_stats: dict = field(default_factory=dict)
    box_stats_m: dict = field(default_factory=dict)
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    epoch: int = -1
    geonet_version: str = geonet.__version__
    format_version: int = FORMAT_VERSION

    @property
    def operating_point(self) -> OperatingPoint | None:
        """The validation operating point, or ``None`` (no validation set, or no true positive there)."""
        op = (self.metrics or {}).get("operating_point")
        if not op or op.get("score_thresh") is None:
            return None
        return OperatingPoint(**{k: float(op[k]) for k in ("iou", "score_thresh", "precision", "recall", "f1",
                                                             "nms_iou") if op.get(k) is not None})

    @property
    def bands_chosen(self) -> bool:
        """Whether training chose the bands with ``--bands`` (else they were all the bands but alpha)."""
        tc = self.train_config or {}
        return (tc.get("data") or tc).get("bands") is not None

    @property
    def train_gsd(self) -> float | None:
        """Geometric mean of the training GSD in metres (``None`` if not georeferenced)."""
        return float(np.sqrt(self.gsd[0] * self.gsd[1])) if self.gsd else None

    def largest_box(self, gsd: float | None = None) -> float:
        """Side of the largest training box in pixels of a frame of ``gsd`` metres (in training pixels
        without one, or without box sizes in metres); 0 when unknown."""
        if self.box_stats_m and gsd:
            return max(self.box_stats_m["width"][-1], self.box_stats_m["height"][-1]) / gsd
        s = self.box_stats or {}
        return float(max((s.get("width") or [0])[-1], (s.get("height") or [0])[-1]))

    def to_dict(self) -> dict:
        """Plain data (the checkpoint's keys without ``state_dict``)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model_config"}
        return {"format": FORMAT, **d, "model_config": self.model_config.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> CheckpointHeader:
        """Read a checkpoint dict of any format version (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and k != "model_config"}
        kw["format_version"] = int(d.get("format_version", 1))
        return cls(model_config=ModelConfig.from_dict(d["model_config"]), **kw)


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, header: CheckpointHeader) -> None:
    """Write ``header`` and the weights of ``model`` (copied to the CPU) atomically (temporary file + rename).

    The header's ``model_config`` must describe ``model``.
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {**header.to_dict(), "format_version": FORMAT_VERSION, "geonet_version": geonet.__version__,
               "state_dict": state}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | os.PathLike[str], *, option: str = "--model") -> tuple[CheckpointHeader, dict]:
    """Load a checkpoint with ``weights_only=True``: ``(header, state_dict)``.

    Raises:
        InputError: missing file, a file that is not a geonet checkpoint, or one that needs code to
            unpickle.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{option}: no such file.", path=p, fix="pass runs/NAME/best.pt from `geonet train`.")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"is not a geonet checkpoint (torch.load with weights_only=True failed: "
                         f"{type(exc).__name__}).", path=p,
                         fix="pass the best.pt or last.pt that `geonet train` wrote.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model_config" not in ckpt:
        raise InputError("is not a geonet checkpoint (no 'format: geonet-detector').", path=p,
                         fix="pass the best.pt or last.pt that `geonet train` wrote.")
    try:
        header = CheckpointHeader.from_dict(ckpt)
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"is a damaged geonet checkpoint ({type(exc).__name__}: {exc}).", path=p,
                         fix="pass the best.pt or last.pt that `geonet train` wrote.") from None
    return header, ckpt.get("state_dict", {})


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[GeoRetinaNet, CheckpointHeader]:
    """Rebuild the detector from a checkpoint: ``(model in eval mode on the CPU, header)``.

    Raises:
        InputError: see :func:`read_checkpoint`.
    """
    header, state = read_checkpoint(path)
    model = build_model(header.model_config, weights="none")
    if header.format_version < 3:
        state = _drop_background_output(state, header.model_config)
    model.load_state_dict(state)
    model.eval()
    return model, header


def _drop_background_output(state: dict, cfg: ModelConfig) -> dict:
    """Format 1-2 -> 3: the classification layer of ``A * (K + 1)`` outputs (anchor-major, output 0 of each
    anchor the background) becomes ``A * K``."""
    key = "head.classification_head.cls_logits"
    w, b = state[f"{key}.weight"], state[f"{key}.bias"]  # [A * (K + 1), 256, 3, 3], [A * (K + 1)]
    k = cfg.num_classes
    a = w.shape[0] // (k + 1)
    if w.shape[0] != a * (k + 1) or a * k == w.shape[0]:
        return state
    return {**state, f"{key}.weight": w.view(a, k + 1, *w.shape[1:])[:, 1:].reshape(a * k, *w.shape[1:]),
            f"{key}.bias": b.view(a, k + 1)[:, 1:].reshape(a * k)}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file (the model hash recorded in detection outputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
