"""Training options: one :class:`TrainConfig` holding nested data, chip, model and optimisation configs.

Each option is declared once, in the dataclass that uses it: chipping options in
:class:`geonet.chip.ChipConfig`, network options in :class:`geonet.model.ModelConfig`, optimisation in
:class:`OptimConfig`, data sources in :class:`DataConfig`; run-wide options (weights, seed, device...)
on :class:`TrainConfig` itself. Their defaults are the library's defaults; the command line states
none of its own.

Options are also addressed by *flat* names (``size``, ``backbone``, ``lr``...), which are unique
across the sections: the command line's flags and the keys of the flat ``config.yaml`` files written
before format 2 (still read, for ``--resume``). A run folder's ``config.yaml`` is the nested form
(:meth:`TrainConfig.to_dict`); ``--config FILE.yaml`` takes either form.

The model section leaves out what the data decide (``num_classes``, ``in_channels``, ``mean``,
``std``): training fills those in from the data.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from geonet.chip import ChipConfig
from geonet.device import AMP_CHOICES, DEVICE_CHOICES
from geonet.errors import InputError
from geonet.model import ModelConfig

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "load_run_config", "resume_config", "RUNTIME_OPTIONS"]

#: ModelConfig fields that the data decide, never the user.
DATA_DERIVED = ("num_classes", "in_channels", "mean", "std")
#: Augmentation levels (:meth:`geonet.augment.OverheadAugment.for_training`).
AUGMENT_CHOICES = ("strong", "light", "none")
#: Options that may change when a run is resumed (they do not change the result).
RUNTIME_OPTIONS = ("output", "workers", "device")


@dataclass
class DataConfig:
    """Where the training samples come from: rasters + labels, a chip folder, COCO or Pascal VOC.

    Attributes:
        imagery: rasters (files, folders, globs) cut into windows on the fly, with ``labels``.
        labels: vector labels (any OGR format, any CRS); ``layer`` and ``class_field`` as in ``geonet chip``.
        bands: 1-based bands to read, in order (default: all but alpha).
        nodata: nodata value overriding the files'.
        chips: a ``geonet chip`` output folder.
        coco, images: a COCO detection JSON and its image folder.
        voc: a Pascal VOC folder.
    """

    imagery: list[str] = field(default_factory=list)
    labels: str | None = None
    layer: str | None = None
    class_field: str | None = None
    bands: list[int] | None = None
    nodata: float | None = None
    chips: str | None = None
    coco: str | None = None
    images: str | None = None
    voc: str | None = None

    def validate(self) -> None:
        sources = sum(bool(x) for x in (self.imagery, self.chips, self.coco, self.voc))
        if sources == 0:
            raise InputError("no training data: pass --imagery with --labels, or --chips, --coco or --voc.",
                             fix="e.g. --imagery tiles/ --labels labels.gpkg.")
        if sources > 1:
            raise InputError("pass only one data source: --imagery/--labels, --chips, --coco or --voc.",
                             fix="keep one of them.")
        if self.imagery and not self.labels:
            raise InputError("--imagery needs --labels (a vector file of the objects).",
                             fix="add --labels FILE.shp|.geojson|.gpkg.")

    @property
    def source(self) -> str | None:
        """The path of the data source, for messages."""
        return self.labels or self.chips or self.coco or self.voc


@dataclass
class OptimConfig:
    """Optimisation.

    Attributes:
        steps: the training budget in optimiser steps, whatever the size of the data (the epochs follow:
            ``ceil(steps / steps_per_epoch)``).
        epochs: passes over the training windows; when set, it replaces ``steps``.
        batch_size: images per optimiser step in each process (with DDP the global batch is this times the
            processes, and one optimiser step consumes all of it).
        optimizer: ``adamw`` (default) or ``sgd`` (momentum, the paper's).
        lr: learning rate (default: 1e-4 for AdamW, 0.01 x global batch / 16 for SGD, the linear scaling rule
            of Goyal et al. 2017, "Accurate, Large Minibatch SGD").
        momentum, weight_decay: of the optimiser.
        schedule: ``cosine`` or ``step`` (x0.1 at 2/3 and 8/9 of the steps) after the warmup.
        warmup_steps: linear warmup (default: 10 % of the steps, at most 500).
        grad_clip: gradient-norm clipping (``None`` or 0: off).
        early_stopping: stop after this many epochs without a better validation AP (0: off).
    """

    steps: int = 1000
    epochs: int | None = None
    batch_size: int = 4
    optimizer: str = "adamw"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int | None = None
    grad_clip: float | None = 35.0
    early_stopping: int = 0

    def validate(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise InputError(f"--epochs must be >= 1, got {self.epochs}.", fix="e.g. --epochs 24, or leave it out.")
        if self.steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.steps}.", fix="e.g. --steps 1000.")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}.", fix="e.g. --batch-size 4.")
        if self.optimizer not in ("sgd", "adamw"):
            raise InputError(f"--optimizer {self.optimizer!r}: choose sgd or adamw.")
        if self.schedule not in ("cosine", "step"):
            raise InputError(f"--schedule {self.schedule!r}: choose cosine or step.")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}.", fix="e.g. --lr 1e-4.")

    def epochs_for(self, steps_per_epoch: int) -> int:
        """Epochs of the run: ``epochs`` when set, else enough to make ``steps`` optimiser steps."""
        return self.epochs if self.epochs is not None else max(1, math.ceil(self.steps / max(1, steps_per_epoch)))

    def learning_rate(self, processes: int = 1) -> float:
        """The learning rate of a run over ``processes`` DDP processes (``lr`` when given)."""
        if self.lr is not None:
            return self.lr
        return 0.01 * self.batch_size * processes / 16 if self.optimizer == "sgd" else 1e-4


_SECTIONS: dict[str, type] = {"data": DataConfig, "chip": ChipConfig, "model": ModelConfig, "optim": OptimConfig}
_TOP = ("output", "weights", "fit_anchors", "augment", "scale_range", "seed", "device", "devices", "num_nodes", "amp",
        "workers", "limit_train_batches")


def _flat_names() -> dict[str, str | None]:
    """Flat option name -> its section (``None``: a field of :class:`TrainConfig` itself)."""
    out: dict[str, str | None] = {}
    for sec, cls in _SECTIONS.items():
        for f in fields(cls):
            if (sec, f.name) in (("chip", "seed"),) or (sec == "model" and f.name in DATA_DERIVED):
                continue
            out[f.name] = sec
    out.update({k: None for k in _TOP})
    return out


@dataclass
class TrainConfig:
    """Options of ``geonet train`` (see the module docstring and ``geonet train --help``).

    Attributes:
        output: the run folder.
        data, chip, model, optim: the sections. ``chip.val_fraction`` defaults to a 20 % spatial
            validation split here.
        weights: initial weights: ``auto`` (the best pretrained weights for the backbone: torchvision's COCO
            RetinaNet for ResNet-50, ImageNet otherwise, from the torch hub cache or a download), ``none``,
            ``imagenet``, ``coco``, a local file, or ``torchgeo:ENUM.MEMBER`` (:func:`geonet.model.build_model`,
            :mod:`geonet.torchgeo_weights`).
        fit_anchors: fit anchor sizes and ratios to the training boxes (:func:`geonet.anchors.fit_anchors`).
        augment: ``strong`` (dihedral, scale and photometric jitter), ``light`` or ``none``
            (:meth:`geonet.augment.OverheadAugment.for_training`).
        scale_range: ``(min, max)`` resize factor of the scale jitter, drawn log-uniformly; ``None``: the
            level's own (0.8-1.25 for ``strong``, none for ``light``). Wider ranges show the model objects
            of other sizes than the training ground's (crowns of another forest type at the same GSD).
        seed: the run's seed (split, negative sampling, initialisation, shuffling, augmentation).
        device, amp: see :mod:`geonet.device`.
        devices: training processes per machine: one per GPU, or CPU processes (gloo) with ``device="cpu"``;
            Lightning's DDP when ``devices * num_nodes > 1`` (launched by ``geonet train`` itself, by ``torchrun``
            or by SLURM's ``srun``; see the README).
        num_nodes: machines taking part (DDP).
        workers: DataLoader workers (default: 0 on the CPU, up to 8 with CUDA).
        limit_train_batches: train on at most this many batches per epoch (tests and benchmarks).
    """

    output: str = "runs/geonet"
    data: DataConfig = field(default_factory=DataConfig)
    chip: ChipConfig = field(default_factory=lambda: ChipConfig(val_fraction=0.2))
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    weights: str = "auto"
    fit_anchors: bool = True
    augment: str = "strong"
    scale_range: tuple[float, float] | None = None
    seed: int = 0
    device: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    amp: str = "auto"
    workers: int | None = None
    limit_train_batches: int | None = None

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        """Raise :class:`InputError` for a bad option (before anything is read or written)."""
        self.data.validate()
        self.optim.validate()
        self.chip_config.validate()
        self.model.validate()
        if self.device not in DEVICE_CHOICES:
            raise InputError(f"--device {self.device!r}: choose auto, cpu or cuda.")
        if self.amp not in AMP_CHOICES:
            raise InputError(f"--amp {self.amp!r}: choose auto, 32, bf16 or 16.")
        if self.devices < 1:
            raise InputError(f"--devices must be >= 1, got {self.devices}.", fix="e.g. --devices 2, or leave it out.")
        if self.num_nodes < 1:
            raise InputError(f"--num-nodes must be >= 1, got {self.num_nodes}.",
                             fix="e.g. --num-nodes 2, or leave it out.")
        if self.augment not in AUGMENT_CHOICES:
            raise InputError(f"--augment {self.augment!r}: choose {', '.join(AUGMENT_CHOICES)}.")
        if self.scale_range is not None:
            if len(self.scale_range) != 2:
                raise InputError(f"--scale-range {list(self.scale_range)} needs two numbers, MIN,MAX.",
                                 fix="e.g. --scale-range 0.5,2.")
            lo, hi = self.scale_range
            if not 0.1 <= lo <= hi <= 10:
                raise InputError(f"--scale-range {lo:g},{hi:g}: needs 0.1 <= MIN <= MAX <= 10.",
                                 fix="e.g. --scale-range 0.5,2.")
            if self.augment == "none":
                raise InputError("--scale-range needs augmentation; it is off (--augment none).",
                                 fix="drop --scale-range, or use --augment strong.")

    @property
    def processes(self) -> int:
        """DDP processes in all (``devices * num_nodes``)."""
        return self.devices * self.num_nodes

    @property
    def chip_config(self) -> ChipConfig:
        """The chipping options with the run's seed."""
        return dataclasses.replace(self.chip, seed=self.seed)

    # ------------------------------------------------------------------ flat names

    def get(self, name: str) -> Any:
        """The value of a flat option name (``"size"``, ``"lr"``...)."""
        sec = _flat_names().get(name, "?")
        if sec == "?":
            raise KeyError(name)
        return getattr(self if sec is None else getattr(self, sec), name)

    def updated(self, options: Mapping[str, Any], *, source: str = "options") -> TrainConfig:
        """A copy with flat options set (``{"size": 256, "lr": 1e-3}``); ``source`` names them in errors.

        Raises:
            InputError: an unknown option name.
        """
        names = _flat_names()
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise InputError(f"{source}: unknown keys {unknown}.", fix=f"valid keys: {', '.join(sorted(names))}.")
        new = dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s)) for s in _SECTIONS})
        for k, v in options.items():
            sec = names[k]
            if k in ("anchor_sizes", "anchor_scales", "anchor_ratios", "scale_range") and v is not None:
                v = tuple(float(x) for x in v)
            elif k == "augment" and isinstance(v, bool):  # format 1: on/off (on was the light level)
                v = "light" if v else "none"
            elif k in ("imagery",) and isinstance(v, str):
                v = [v]
            elif k in ("imagery", "bands") and v is not None:
                v = list(v)
            setattr(new if sec is None else getattr(new, sec), k, v)
        return new

    def differences(self, options: Mapping[str, Any]) -> list[str]:
        """Flat option names whose value in ``options`` differs from this configuration's."""
        out = []
        for k, v in options.items():
            try:
                mine = self.get(k)
            except KeyError:
                out.append(k)
                continue
            if isinstance(mine, (list, tuple)) or isinstance(v, (list, tuple)):
                same = v is not None and mine is not None and [float(a) if isinstance(a, (int, float)) else a
                                                                for a in v] == [float(a) if isinstance(a, (int, float))
                                                                                else a for a in mine]
                same = same or (v is None and mine is None)
            else:
                same = v == mine
            if not same:
                out.append(k)
        return out

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        """The nested form written as the run's ``config.yaml`` (plain data)."""
        d: dict[str, Any] = {"output": self.output}
        for sec in _SECTIONS:
            obj = getattr(self, sec)
            v = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
            d[sec] = {k: (list(x) if isinstance(x, tuple) else x) for k, x in v.items()
                      if k in _flat_names() and _flat_names()[k] == sec}
        d.update({k: (list(v) if isinstance(v, tuple) else v) for k in _TOP if k != "output"
                  for v in [getattr(self, k)]})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """Read the nested form, the flat form of format 1, or a mix of both (``source`` names it in errors).

        Raises:
            InputError: unknown keys, or a section that is not a mapping.
        """
        flat: dict[str, Any] = {}
        for k, v in d.items():
            if k in _SECTIONS:
                if not isinstance(v, Mapping):
                    raise InputError(f"{source}: section {k!r} must be a mapping of option names to values.",
                                     fix=f"write `{k}:` followed by indented `name: value` lines.")
                allowed = {n for n, s in _flat_names().items() if s == k} | (
                    set(DATA_DERIVED) if k == "model" else set()) | ({"seed"} if k == "chip" else set())
                bad = sorted(set(v) - allowed)
                if bad:
                    raise InputError(f"{source}: unknown keys {bad} in section {k!r}.",
                                     fix=f"valid keys: {', '.join(sorted(allowed))}.")
                flat.update({n: x for n, x in v.items() if not (k == "model" and n in DATA_DERIVED)
                             and not (k == "chip" and n == "seed")})
            else:
                flat[k] = v
        return cls().updated(flat, source=source)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, config_file: str | os.PathLike[str] | None = None
                     ) -> TrainConfig:
        """Defaults, then ``config_file`` (YAML, nested or flat keys), then the flat ``options`` on top.

        Raises:
            InputError: a missing or malformed config file, or unknown option names.
        """
        base = cls()
        if config_file:
            base = cls.from_dict(_read_yaml(config_file, option="--config"), source=f"--config {config_file}")
        return base.updated(options, source="command line")


def _read_yaml(path: str | os.PathLike[str], *, option: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{option} {path}: no such file.", fix="check the path.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{option} {path}: not valid YAML ({' '.join(str(exc).split())[:120]}).",
                         fix="fix the YAML syntax.") from None
    if not isinstance(data, dict):
        raise InputError(f"{option} {path}: the YAML must be a mapping of option names to values.",
                         fix="write one `name: value` per line.")
    return data


def load_run_config(run: str | os.PathLike[str]) -> TrainConfig:
    """The saved ``config.yaml`` of a run folder (either format).

    Raises:
        InputError: the run folder has no (readable) ``config.yaml``.
    """
    p = Path(run) / "config.yaml"
    if not p.exists():
        raise InputError(f"--resume: {p} does not exist.", fix="pass the run folder of an earlier `geonet train -o`.")
    return TrainConfig.from_dict(_read_yaml(p, option="--resume"), source=str(p))


def resume_config(run: str | os.PathLike[str], options: Mapping[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The saved configuration of ``run`` with the runtime ``options`` (:data:`RUNTIME_OPTIONS`) applied.

    Returns:
        ``(config, ignored)``: ``ignored`` names the other given options whose value differs from the
        saved run's (a resumed run continues the saved configuration; the caller warns about them).
    """
    saved = load_run_config(run)
    runtime = {k: v for k, v in options.items() if k in RUNTIME_OPTIONS and k != "output"}
    ignored = saved.differences({k: v for k, v in options.items() if k not in RUNTIME_OPTIONS})
    cfg = saved.updated(runtime)
    cfg.output = str(run)
    return cfg, ignored
