"""Training: the second pipeline stage (``geonet train``).

Built on Lightning's ``Trainer`` (AMP, DDP through ``torchrun`` or Lightning's launcher, logging,
resumable checkpoints). The data come from rasters plus labels (windows cut on the fly,
:class:`geonet.datasets.RasterWindowDataset`), from a ``geonet chip`` folder, or from COCO / Pascal
VOC image sets. The model is :func:`geonet.model.build_model`.

Run folder (``-o runs/NAME``):

* ``config.yaml``: the resolved options; ``model_config.json``: the model's configuration;
  ``split.json``: the images and windows of the train and val splits; ``val_area.geojson``: the
  ground of the val split (EPSG:4326), the ``--aoi`` for evaluating on held-out ground only;
* ``last.ckpt``: Lightning's resumable checkpoint (model, optimizer, schedule, loop state), written
  atomically at the end of every epoch, and once before the first step, so a run stopped at any point
  (Ctrl-C included) can continue with ``--resume``;
* ``last.pt`` and ``best.pt`` (best validation AP): self-describing detector checkpoints
  (:mod:`geonet.checkpoint`) that ``geonet detect`` needs and nothing else;
* ``metrics.csv`` (CSV log), ``tb/`` (TensorBoard), ``curves.png`` (loss and validation AP),
  ``summary.json``.

**Reproducibility.** With ``--seed`` the model initialisation, the shuffling (:class:`EpochSampler`,
seeded by seed and epoch) and every augmentation (seeded by seed, epoch and sample) are fixed; on the
CPU ``torch.use_deterministic_algorithms`` is on. Checkpoints are taken at epoch ends only, so a
resumed run replays exactly the epochs an uninterrupted run would: on the CPU it ends with identical
weights (tested). Ctrl-C loses at most the epoch in progress.

**Schedule.** Linear warmup from 0.1 % of the learning rate over ``warmup_steps`` (default: 10 % of
the steps, at most 500), then cosine decay
to 0 or steps of 0.1 at 2/3 and 8/9 of training (the paper's 60k and 80k of 90k iterations). SGD with
momentum 0.9 and weight decay 1e-4 (the paper), learning rate 0.01 x batch / 16; or AdamW with
learning rate 1e-4, the default: on 12 synthetic chips from scratch, 12 steps took the classification
loss from 1.129 to 0.577 with AdamW and to 1.120 with SGD at 0.0025 (batch 4); AdamW at 1e-3 made it
explode to ~1000 at the third step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from geonet.atomic import atomic_file, make_parent
from geonet.augment import OverheadAugment
from geonet.checkpoint import save_checkpoint
from geonet.chip import ChipConfig, plan_chips
from geonet.datasets import ChipDataset, RasterWindowDataset, band_stats, collate, load_coco, load_voc
from geonet.errors import InputError, RunError
from geonet.labels import LabelIndex, read_labels
from geonet.metrics import coco_metrics, operating_point
from geonet.model import ModelConfig, build_model
from geonet.raster import describe_raster, find_rasters

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainData", "EpochSampler", "prepare_data", "train", "TrainingInterrupted",
           "NonFiniteLoss"]


class TrainingInterrupted(RunError):
    """Training stopped by Ctrl-C (SIGINT); the last complete epoch's checkpoint is kept."""

    exit_code = 130


class NonFiniteLoss(RunError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Options of ``geonet train`` (also the keys of its YAML config). See ``geonet train --help``."""

    output: str = "runs/geonet"
    # data: rasters + labels, or --chips, or --coco/--images, or --voc
    imagery: list[str] = field(default_factory=list)
    labels: str | None = None
    layer: str | None = None
    class_field: str | None = None
    bands: list[int] | None = None
    nodata: float | None = None
    point_size: float = 1.0
    chips: str | None = None
    coco: str | None = None
    images: str | None = None
    voc: str | None = None
    # chipping (defaults: ChipConfig's, except a 20 % spatial validation split)
    size: int = ChipConfig.size
    stride: int | None = ChipConfig.stride
    min_visible: float = ChipConfig.min_visible
    negative_ratio: float = ChipConfig.negative_ratio
    val_fraction: float = 0.2
    split_by: str = ChipConfig.split_by
    block_size: int | None = ChipConfig.block_size
    # model (defaults: ModelConfig's)
    backbone: str = ModelConfig.backbone
    weights: str = "none"
    anchor_sizes: list[float] = field(default_factory=lambda: [float(v) for v in ModelConfig.anchor_sizes])
    anchor_scales: list[float] = field(default_factory=lambda: [float(v) for v in ModelConfig.anchor_scales])
    anchor_ratios: list[float] = field(default_factory=lambda: [float(v) for v in ModelConfig.anchor_ratios])
    fit_anchors: bool = False
    focal_alpha: float = ModelConfig.focal_alpha
    focal_gamma: float = ModelConfig.focal_gamma
    fg_iou: float = ModelConfig.fg_iou
    bg_iou: float = ModelConfig.bg_iou
    score_thresh: float = ModelConfig.score_thresh
    nms_iou: float = ModelConfig.nms_iou
    detections_per_img: int = ModelConfig.detections_per_img
    trainable_layers: int | None = None
    # optimisation
    epochs: int = 24
    batch_size: int = 4
    optimizer: str = "adamw"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int | None = None
    grad_clip: float | None = 35.0
    augment: bool = True
    early_stopping: int = 0
    seed: int = 0
    device: str = "auto"
    devices: int = 1
    amp: str = "auto"
    workers: int | None = None
    limit_train_batches: int | None = None

    def validate(self) -> None:
        sources = sum(bool(x) for x in (self.imagery, self.chips, self.coco, self.voc))
        if sources == 0:
            raise InputError("no training data: pass --imagery with --labels, or --chips, --coco or --voc.")
        if sources > 1:
            raise InputError("pass only one data source: --imagery/--labels, --chips, --coco or --voc.")
        if self.imagery and not self.labels:
            raise InputError("--imagery needs --labels (a vector file of the objects).",
                             fix="add --labels FILE.shp|.geojson|.gpkg.")
        if self.epochs < 1:
            raise InputError(f"--epochs must be >= 1, got {self.epochs}.")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}.")
        if self.optimizer not in ("sgd", "adamw"):
            raise InputError(f"--optimizer {self.optimizer!r}: choose sgd or adamw.")
        if self.schedule not in ("cosine", "step"):
            raise InputError(f"--schedule {self.schedule!r}: choose cosine or step.")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"--device {self.device!r}: choose auto, cpu or cuda.")
        if self.amp not in ("auto", "32", "bf16", "16"):
            raise InputError(f"--amp {self.amp!r}: choose auto, 32, bf16 or 16.")
        self.chip_config().validate()

    def chip_config(self) -> ChipConfig:
        return ChipConfig(size=self.size, stride=self.stride, min_visible=self.min_visible,
                          negative_ratio=self.negative_ratio, val_fraction=self.val_fraction, split_by=self.split_by,
                          block_size=self.block_size, seed=self.seed, point_size=self.point_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown config keys {unknown}.", fix=f"valid keys: {', '.join(sorted(names))}.")
        return cls(**d)

    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.01 * self.batch_size / 16 if self.optimizer == "sgd" else 1e-4


@dataclass
class TrainData:
    """Datasets and the facts about them that go into the checkpoint."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    classes: list[str]
    in_channels: int
    bands: list[int] | None
    dtype: str
    nodata: float | None
    gsd: list[float] | None
    chip_size: int
    val_gt: dict | None
    n_train_boxes: int
    n_degenerate: int
    box_stats: dict
    train_boxes: np.ndarray  # [N, 4] chip-frame boxes, for anchor fitting
    box_stats_m: dict = field(default_factory=dict)

    def meta(self) -> dict:
        return {"classes": self.classes, "bands": self.bands, "dtype": self.dtype, "nodata": self.nodata,
                "gsd": self.gsd, "chip_size": self.chip_size, "box_stats": self.box_stats,
                "box_stats_m": self.box_stats_m}


def _targets_of(ds) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(boxes, labels, ignore)`` of every sample, read from the plan/records (no pixels)."""
    if isinstance(ds, RasterWindowDataset):
        return [(s.labels.boxes, s.labels.class_ids, s.labels.ignore) for s in ds.specs]
    return [(r.boxes, r.labels, r.ignore) for r in ds.records]


def _image_ids(ds) -> list[int]:
    """The ``target["image_id"]`` each sample of ``ds`` yields (validation detections carry it)."""
    if isinstance(ds, RasterWindowDataset):
        return [i + 1 for i in range(len(ds.specs))]
    return [int(r.image_id) for r in ds.records]


def _gt_coco(ds, classes: Sequence[str]) -> dict:
    """COCO ground truth of a dataset, with the image ids its samples carry (see :func:`_image_ids`)."""
    images, anns = [], []
    ids = _image_ids(ds)
    if len(set(ids)) != len(ids):
        raise InputError("the validation images do not have unique COCO image ids.",
                         fix="give every image in the annotations a distinct id.")
    for i, (boxes, labels, ignore) in enumerate(_targets_of(ds)):
        w, h = ds.image_size(i)
        images.append({"id": ids[i], "width": w, "height": h})
        for b, k, crowd in [(b, k, 0) for b, k in zip(boxes, labels)] + [(b, 1, 1) for b in ignore]:
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            if w <= 0 or h <= 0:
                continue
            anns.append({"id": len(anns) + 1, "image_id": ids[i], "category_id": int(k),
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": crowd})
    return {"images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]}


def _split_records(records, fraction: float, seed: int):
    """Random split of non-georeferenced images by image (there is no ground to keep apart)."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    n_val = min(len(records) - 1, max(1, int(round(fraction * len(records)))))
    val_idx = set(order[:n_val].tolist())
    return [r for k, r in enumerate(records) if k not in val_idx], [r for k, r in enumerate(records) if k in val_idx]


def prepare_data(cfg: TrainConfig) -> TrainData:
    """Build the train and val datasets from the configured source.

    Raises:
        InputError: no labels at all, band counts that differ between rasters, bad paths or options.
    """
    n_degenerate = 0
    gsd = None
    dtype, nodata, bands = "float32", None, cfg.bands
    if cfg.imagery:
        paths = find_rasters(cfg.imagery)
        infos = [describe_raster(p, bands=cfg.bands, nodata=cfg.nodata) for p in paths]
        counts = {len(i.bands) for i in infos}
        if len(counts) > 1:
            ref = infos[0]
            odd = next(i for i in infos if len(i.bands) != len(ref.bands))
            raise InputError(f"has {len(odd.bands)} band(s) but {ref.path} has {len(ref.bands)}: every raster "
                             "must give the model the same bands.", path=odd.path,
                             fix="pass --bands to choose the same bands from each, or train on one kind.")
        labels = read_labels(cfg.labels, layer=cfg.layer, class_field=cfg.class_field)
        plan = plan_chips(infos, LabelIndex(labels, point_size=cfg.point_size), cfg.chip_config())
        n_degenerate = sum(r["degenerate_labels"] for r in plan.per_raster)
        train = RasterWindowDataset(infos, None, cfg.chip_config(), split="train", plan=plan)
        val = RasterWindowDataset(infos, None, cfg.chip_config(), split="val", plan=plan)
        classes = list(plan.classes)
        ref = infos[0]
        dtype, nodata, bands = ref.dtype, ref.nodata, list(ref.bands)
        gsds = [i.gsd for i in infos if i.gsd]
        gsd = [float(np.median([g[0] for g in gsds])), float(np.median([g[1] for g in gsds]))] if gsds else None
        chip_size = cfg.size
    else:
        if cfg.chips:
            records, classes = load_coco(cfg.chips)
            if any(r.split for r in records):
                tr = [r for r in records if r.split != "val"]
                va = [r for r in records if r.split == "val"]
            else:
                log.warning("%s has no val split (chip with --split val=0.2); the last epoch is the best model",
                            cfg.chips)
                tr, va = records, []
        elif cfg.coco:
            records, classes = load_coco(cfg.coco, image_root=cfg.images)
            tr, va = _split_records(records, cfg.val_fraction, cfg.seed)
        else:
            records, classes = load_voc(cfg.voc)
            tr, va = _split_records(records, cfg.val_fraction, cfg.seed)
        if not tr:
            raise InputError("no training images.", path=cfg.chips or cfg.coco or cfg.voc)
        train = ChipDataset(tr, classes=classes, bands=cfg.bands)
        val = ChipDataset(va, classes=classes, bands=cfg.bands) if va else None
        info0 = train.info(0)
        dtype, nodata, bands = info0.dtype, info0.nodata, list(info0.bands)
        if info0.gsd and info0.crs:
            gsd = [float(info0.gsd[0]), float(info0.gsd[1])]
        chip_size = max(info0.width, info0.height)
        for i in range(len(train)):
            if len(train.info(i).bands) != len(bands):
                raise InputError(f"has {len(train.info(i).bands)} band(s), the first image has {len(bands)}.",
                                 path=train.records[i].path, fix="pass --bands to choose the same bands.")
        for r in tr + va:
            b = r.boxes
            bad = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
            n_degenerate += int(bad.sum())
    targets = _targets_of(train)
    all_boxes = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b, _, _ in targets]
    train_boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4))
    if len(train_boxes) == 0:
        raise InputError("no training labels: the training split holds no object box.",
                         path=cfg.labels or cfg.chips or cfg.coco or cfg.voc,
                         fix="check that the labels fall on the imagery (geonet check), or lower --split val.")
    if n_degenerate:
        log.warning("dropped %d degenerate box(es) with zero width or height", n_degenerate)
    if val is not None and len(val) == 0:
        val = None
    wh = np.column_stack([train_boxes[:, 2] - train_boxes[:, 0], train_boxes[:, 3] - train_boxes[:, 1]])
    # sizes in metres, through each image's own GSD (rasters of several GSDs train together)
    gsds = [_sample_gsd(train, i) for i in range(len(targets))]
    wh_m = [np.column_stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]]) * np.asarray(g)
            for (b, _, _), g in zip(targets, gsds) if g is not None and len(b)]
    from geonet.check import box_size_stats

    return TrainData(train=train, val=val, classes=classes, in_channels=len(bands) if bands else 3,
                     bands=bands, dtype=dtype, nodata=nodata, gsd=gsd, chip_size=int(chip_size),
                     val_gt=_gt_coco(val, classes) if val is not None else None, n_train_boxes=len(train_boxes),
                     n_degenerate=n_degenerate, box_stats=box_size_stats(wh), train_boxes=train_boxes,
                     box_stats_m=box_size_stats(np.concatenate(wh_m)) if wh_m else {})


def split_listing(data: TrainData) -> dict:
    """``{"train": [...], "val": [...]}``: the images (and windows) of each split, for ``split.json``."""
    out = {}
    for name, ds in (("train", data.train), ("val", data.val)):
        if ds is None:
            out[name] = []
        elif isinstance(ds, RasterWindowDataset):
            out[name] = [{"source": str(Path(ds.info(i).path).resolve()), "window": list(ds.specs[i].window)}
                         for i in range(len(ds))]
        else:
            out[name] = [{"source": r.meta.get("source", r.path), "image": r.path, "window": r.meta.get("window")}
                         for r in ds.records]
    return out


def val_area(data: TrainData):
    """Ground the validation split covers: the union of its windows (EPSG:4326), or ``None``.

    Only for georeferenced sources (imagery + labels, or chips that carry ``crs`` and ``transform``).
    Written as ``val_area.geojson``, it is the ``--aoi`` that evaluates a model on held-out ground only.
    """
    import shapely

    from geonet.georef import affine_from_list, pixel_boxes_to_polygons, to_crs

    ds = data.val
    if ds is None:
        return None
    parts = []
    for i in range(len(ds)):
        if isinstance(ds, RasterWindowDataset):
            info = ds.info(i)
            crs, transform = info.crs, info.transform
            x, y, w, h = ds.specs[i].window
            box = [max(x, 0), max(y, 0), min(x + w, info.width), min(y + h, info.height)]
        else:
            m = ds.records[i].meta
            if not m.get("crs") or not m.get("transform"):
                return None
            crs, transform = m["crs"], affine_from_list(m["transform"])
            w, h = ds.image_size(i)
            box = [0, 0, w, h]
        if crs is None:
            return None
        poly = pixel_boxes_to_polygons(np.array([box], dtype=float), transform)
        parts.append(to_crs(poly, crs, "EPSG:4326")[0])
    return shapely.union_all(np.array(parts, dtype=object)) if parts else None


def _keep_csv_history(logger, run: Path) -> None:
    """Carry the epochs ``last.ckpt`` holds over into the resumed run's ``metrics.csv``.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts; on ``--resume`` that
    would lose the history of the epochs before the interruption. The rows of the epochs the checkpoint
    completed (every epoch up to its ``epoch`` unless it was saved before the first step) are written
    back, and the writer appends after them.
    """
    import csv

    path = run / "metrics.csv"
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    ck = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    done = int(ck["epoch"]) if int(ck.get("global_step", 0)) > 0 else -1
    rows = [r for r in rows if r.get("epoch") not in (None, "") and float(r["epoch"]) <= done]
    exp = logger.experiment  # creating it deletes metrics.csv
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    exp.metrics_keys = sorted(header)


def _sample_gsd(ds, i: int) -> tuple[float, float] | None:
    """GSD ``(x, y)`` in metres of sample ``i`` (``None`` when not georeferenced)."""
    if isinstance(ds, RasterWindowDataset):
        return ds.info(i).gsd
    g = ds.records[i].meta.get("gsd")
    return tuple(g) if g else None


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles ``range(n)`` with a generator seeded by ``(seed, epoch)``; yields ``(index, sample_seed)``.

    ``sample_seed`` identifies the (seed, epoch) pair, so each sample's augmentation is fixed by
    seed, epoch and index (see :mod:`geonet.datasets`). Lightning calls :meth:`set_epoch`.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch_seed = self.seed * 100_003 + self.epoch
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(epoch_seed)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter([(i, epoch_seed) for i in order])


def _lr_lambda(warmup: int, total: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup:
            return 0.001 + (1 - 0.001) * step / max(1, warmup)
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 0.1 ** sum(step >= int(total * m) for m in (2 / 3, 8 / 9))
    return f


def _lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        import lightning.pytorch as pl

    return pl


def _make_module(model, model_cfg: ModelConfig, cfg: TrainConfig, steps_per_epoch: int, val_gt: dict | None,
                 classes: list[str]):
    pl = _lightning()

    class DetectorModule(pl.LightningModule):
        """LightningModule around :class:`geonet.model.GeoRetinaNet` (loss, validation AP, schedule)."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.val_gt = val_gt
            self._val_dets: list[dict] = []
            self.last_metrics: dict = {}
            self._t_last = None
            self._t_fetch = None
            self.data_wait = 0.0
            self.step_time = 0.0

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            images, targets = batch
            nb = device.type == "cuda"
            images = [im.to(device, non_blocking=nb) for im in images]
            targets = [{k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
            return images, targets

        def on_train_batch_start(self, batch, batch_idx):
            now = time.perf_counter()
            if self._t_last is not None:
                self.data_wait += now - self._t_last
            self._t_fetch = now

        def training_step(self, batch, batch_idx):
            images, targets = batch
            losses = self.model(images, targets)
            loss = losses["classification"] + losses["bbox_regression"]
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLoss(
                    f"the loss became {float(loss.detach())} at step {self.global_step} (epoch {self.current_epoch}, "
                    f"classification {float(losses['classification'].detach()):.4g}, "
                    f"box {float(losses['bbox_regression'].detach()):.4g}). "
                    "Likely causes: a learning rate too high (--lr), bad boxes, or unnormalised input. The last good "
                    f"checkpoint in {cfg.output} is kept.", fix="lower --lr (or add --grad-clip 10) and --resume.")
            bs = len(images)
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
            self.log("train/cls", losses["classification"], on_step=False, on_epoch=True, batch_size=bs)
            self.log("train/box", losses["bbox_regression"], on_step=False, on_epoch=True, batch_size=bs)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            now = time.perf_counter()
            if self._t_fetch is not None:
                dt = now - self._t_fetch
                self.step_time += dt
                self.log("img_s", len(batch[0]) / max(dt, 1e-9), on_step=True, prog_bar=True, logger=False,
                         batch_size=len(batch[0]))
            self._t_last = now

        def on_train_epoch_start(self):
            self._t_last = None

        def validation_step(self, batch, batch_idx):
            images, targets = batch
            out = self.model(images)
            for t, o in zip(targets, out):
                b = o["boxes"].float().cpu()
                for box, s, k in zip(b.tolist(), o["scores"].float().cpu().tolist(), o["labels"].cpu().tolist()):
                    self._val_dets.append({"image_id": int(t["image_id"]), "category_id": int(k),
                                           "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": s})

        def on_validation_epoch_start(self):
            self._val_dets = []

        def on_validation_epoch_end(self):
            dets = self._val_dets
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, dets)
                dets = [d for part in gathered for d in part]
            dets = [d for d in dets if 1 <= d["category_id"] <= len(classes)]
            m = coco_metrics(self.val_gt, dets, keep_eval=True)
            m.pop("precision", None)
            op = operating_point(m.pop("_eval"), 0.5)
            if op["tp"] > 0:  # the score that maximises F1 at IoU 0.5: detection's default threshold
                m["operating_point"] = {k: op[k] for k in ("iou", "score_thresh", "precision", "recall", "f1")}
            self.last_metrics = m
            self.log("val/AP", m["AP"], prog_bar=True, sync_dist=False)
            self.log("val/AP50", m["AP50"], prog_bar=True, sync_dist=False)
            self.log("val/AP75", m["AP75"], sync_dist=False)
            for name, pc in m["per_class"].items():
                if len(classes) > 1:
                    self.log(f"val/AP50_{name}", pc["AP50"], sync_dist=False)

        def configure_optimizers(self):
            params = [p for p in self.model.parameters() if p.requires_grad]
            lr = cfg.effective_lr
            if cfg.optimizer == "sgd":
                opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            else:
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
            total = max(1, cfg.epochs * steps_per_epoch)
            warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(500, max(1, total // 10))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, total, cfg.schedule))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return DetectorModule()


class _DeferredInterrupt:
    """Ctrl-C during training: stop at the next batch boundary, in the main loop.

    Python delivers SIGINT as a ``KeyboardInterrupt`` wherever the main thread happens to be; raised
    inside a finaliser (``__del__``, a weakref callback) it is printed and swallowed, and training
    carries on (seen once in CI). The handler here only sets a flag; :meth:`check`, called from the
    batch and epoch hooks, raises ``KeyboardInterrupt`` there, so Lightning's graceful shutdown runs
    and the last complete epoch's checkpoint is kept. A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _make_callbacks(cfg: TrainConfig, model_cfg: ModelConfig, data: TrainData, resume: bool,
                    interrupt: _DeferredInterrupt | None = None):
    pl = _lightning()
    run = Path(cfg.output)

    class RunCheckpoint(pl.Callback):
        """Atomic end-of-epoch checkpoints: Lightning's ``last.ckpt`` and geonet's ``last.pt``/``best.pt``."""

        def __init__(self):
            self.best = -math.inf
            self.best_epoch = -1

        @property
        def state_key(self) -> str:
            return "geonet.RunCheckpoint"

        def state_dict(self):
            return {"best": float(self.best), "best_epoch": int(self.best_epoch)}

        def load_state_dict(self, state):
            self.best = float(state["best"])
            self.best_epoch = int(state["best_epoch"])

        def _save_resume(self, trainer):
            with atomic_file(run / "last.ckpt") as tmp:
                trainer.save_checkpoint(tmp)

        def on_train_start(self, trainer, pl_module):
            if not resume and trainer.is_global_zero:
                self._save_resume(trainer)  # a resumable state before the first step

        def on_train_epoch_end(self, trainer, pl_module):
            if not trainer.is_global_zero:
                return
            metrics = dict(getattr(pl_module, "last_metrics", {}) or {})
            epoch = trainer.current_epoch
            meta = {**data.meta(), "train_config": cfg.to_dict(), "metrics": metrics, "epoch": epoch}
            save_checkpoint(run / "last.pt", pl_module.model, model_cfg, meta)
            score = metrics.get("AP", None)
            score = -1.0 if score is None else float(score)
            if data.val is None or score > self.best:
                self.best, self.best_epoch = score, epoch
                save_checkpoint(run / "best.pt", pl_module.model, model_cfg, meta)
            self._save_resume(trainer)

    callbacks = [RunCheckpoint(), pl.callbacks.LearningRateMonitor(logging_interval="step")]
    if interrupt is not None:

        class StopOnCtrlC(pl.Callback):
            def on_train_batch_end(self, *args, **kwargs):
                interrupt.check()

            def on_validation_batch_end(self, *args, **kwargs):
                interrupt.check()

            def on_train_epoch_start(self, *args, **kwargs):
                interrupt.check()

        callbacks.append(StopOnCtrlC())
    if cfg.early_stopping > 0 and data.val is not None:
        callbacks.append(pl.callbacks.EarlyStopping(monitor="val/AP", mode="max", patience=cfg.early_stopping))
    return callbacks


def _precision(cfg: TrainConfig, accelerator: str) -> str:
    if cfg.amp == "32":
        return "32-true"
    if cfg.amp == "bf16":
        return "bf16-mixed"
    if cfg.amp == "16":
        return "16-mixed"
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def model_config_for(cfg: TrainConfig, data: TrainData, mean, std) -> ModelConfig:
    pretrained = cfg.weights not in ("none", "", None)
    mc = ModelConfig(backbone=cfg.backbone, num_classes=len(data.classes), in_channels=data.in_channels,
                     anchor_sizes=tuple(cfg.anchor_sizes), anchor_scales=tuple(cfg.anchor_scales),
                     anchor_ratios=tuple(cfg.anchor_ratios), focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma,
                     fg_iou=cfg.fg_iou, bg_iou=cfg.bg_iou, score_thresh=cfg.score_thresh, nms_iou=cfg.nms_iou,
                     detections_per_img=cfg.detections_per_img, mean=list(mean), std=list(std),
                     trainable_layers=cfg.trainable_layers if cfg.trainable_layers is not None else (3 if pretrained else 5),
                     frozen_bn=pretrained)
    if cfg.fit_anchors:
        from geonet.anchors import fit_anchors

        fit = fit_anchors(data.train_boxes, (data.chip_size, data.chip_size), base=mc)
        log.info("anchors fitted: coverage %.3f -> %.3f (%s)", fit.default_coverage, fit.coverage, fit.as_flags())
        mc.anchor_sizes, mc.anchor_ratios = tuple(fit.sizes), tuple(fit.ratios)
    return mc


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: str
    epochs_run: int
    best_epoch: int
    best_metrics: dict
    last_metrics: dict
    seconds: float
    images_per_second: float
    data_wait_fraction: float
    n_train: int
    n_val: int
    n_train_boxes: int
    n_degenerate: int
    device: str
    precision: str


def check_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    run = Path(cfg.output)
    if resume:
        if not (run / "last.ckpt").exists():
            raise InputError(f"--resume: {run} holds no last.ckpt to resume from.",
                             fix="pass the run folder of an earlier `geonet train -o`.")
        return run
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise InputError(f"-o {run} exists and is not empty.",
                             fix="choose a new run folder, --resume it, or pass --overwrite.")
        import shutil

        shutil.rmtree(run)
    make_parent(run)
    return run


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          extra_callbacks: Sequence = (), progress: bool = True) -> TrainResult:
    """Train a detector and write the run folder (module docstring).

    Args:
        cfg: options. With ``resume``, ``cfg`` must be the run's saved ``config.yaml``.
        resume: continue ``cfg.output`` from its ``last.ckpt`` (same schedule and epoch count).
        overwrite: replace an existing, non-empty run folder.
        extra_callbacks: more Lightning callbacks (tests use one to simulate Ctrl-C).
        progress: show Lightning's progress bar (loss, images/s).

    Raises:
        InputError: bad options or data (before anything is written).
        NonFiniteLoss: the loss became NaN/inf; the last good checkpoint is kept.
        TrainingInterrupted: Ctrl-C; the last complete epoch's checkpoint is kept.
    """
    cfg.validate()
    run = check_run_dir(cfg, resume=resume, overwrite=overwrite)
    pl = _lightning()
    t0 = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = prepare_data(cfg)
    if resume and (run / "model_config.json").exists():
        model_cfg = ModelConfig.from_dict(json.loads((run / "model_config.json").read_text()))
        if model_cfg.in_channels != data.in_channels:
            raise InputError(f"the run was trained on {model_cfg.in_channels} band(s); the data now give "
                             f"{data.in_channels}.", fix="use the same imagery and --bands as the run.")
    else:
        mean, std = band_stats(data.train, seed=cfg.seed)
        model_cfg = model_config_for(cfg, data, mean, std)
    for ds in (data.train, data.val):
        if ds is not None:
            ds.fill_values = np.asarray(model_cfg.mean, dtype=np.float32)
    if cfg.augment:
        data.train.transform = OverheadAugment(band_std=model_cfg.std)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(model_cfg, weights="none" if resume else cfg.weights)
    run.mkdir(parents=True, exist_ok=True)
    if not resume:
        with atomic_file(run / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        with atomic_file(run / "split.json") as tmp:
            tmp.write_text(json.dumps(split_listing(data), indent=1))
        with atomic_file(run / "model_config.json") as tmp:
            tmp.write_text(json.dumps(model_cfg.to_dict(), indent=2))
        area = val_area(data)
        if area is not None:
            import geopandas as gpd

            with atomic_file(run / "val_area.geojson") as tmp:
                gpd.GeoDataFrame({"split": ["val"]}, geometry=[area], crs="EPSG:4326").to_file(tmp, driver="GeoJSON")

    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available.", fix="use --device auto or cpu.")
    accelerator = "gpu" if cuda else "cpu"
    precision = _precision(cfg, accelerator)
    workers = cfg.workers if cfg.workers is not None else (min(8, os.cpu_count() or 1) if cuda else 0)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        model.transform.channels_last = True
        torch.backends.cudnn.benchmark = True

    def loader(ds, shuffle):
        return torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, sampler=EpochSampler(len(ds), cfg.seed, shuffle=shuffle),
            collate_fn=collate, num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
            drop_last=shuffle and len(ds) > cfg.batch_size)

    train_loader = loader(data.train, True)
    val_loader = loader(data.val, False) if data.val is not None else None
    steps_per_epoch = len(train_loader) if cfg.limit_train_batches is None else min(len(train_loader),
                                                                                  cfg.limit_train_batches)
    module = _make_module(model, model_cfg, cfg, steps_per_epoch, data.val_gt, data.classes)
    interrupt = _DeferredInterrupt()
    callbacks = _make_callbacks(cfg, model_cfg, data, resume, interrupt) + list(extra_callbacks)
    loggers = [pl.loggers.CSVLogger(save_dir=str(run), name="", version="")]
    if resume and cfg.devices <= 1:
        _keep_csv_history(loggers[0], run)
    try:
        loggers.append(pl.loggers.TensorBoardLogger(save_dir=str(run), name="tb", version="",
                                                    default_hp_metric=False))
    except ModuleNotFoundError:  # tensorboard missing: CSV only
        log.warning("tensorboard is not installed: CSV log only")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    trainer = pl.Trainer(
        max_epochs=cfg.epochs, accelerator=accelerator, devices=cfg.devices if cuda else 1, precision=precision,
        logger=loggers, callbacks=callbacks, deterministic=not cuda, benchmark=cuda, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=max(1, min(10, steps_per_epoch)),
        gradient_clip_val=cfg.grad_clip, enable_progress_bar=progress,
        limit_train_batches=cfg.limit_train_batches, limit_val_batches=1.0 if val_loader is not None else 0,
        default_root_dir=str(run), use_distributed_sampler=cfg.devices > 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*The number of training batches.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        try:
            with interrupt:
                trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                            ckpt_path=str(run / "last.ckpt") if resume else None, weights_only=True)
        except SystemExit:  # Lightning's handling of KeyboardInterrupt ends with sys.exit(1)
            done = trainer.current_epoch
            raise TrainingInterrupted(
                f"training interrupted during epoch {done}; {run / 'last.ckpt'} holds the state after "
                f"{done} complete epoch(s).", fix=f"continue with `geonet train --resume -o {run}`.") from None
    seconds = time.perf_counter() - t0
    ckpt_cb = callbacks[0]
    best_metrics = {}
    if (run / "best.pt").exists():
        best_metrics = torch.load(run / "best.pt", map_location="cpu", weights_only=True).get("metrics", {})
    plot_curves(run)
    n_imgs = trainer.global_step * cfg.batch_size
    result = TrainResult(
        run_dir=str(run), epochs_run=trainer.current_epoch, best_epoch=ckpt_cb.best_epoch, best_metrics=best_metrics,
        last_metrics=module.last_metrics, seconds=seconds,
        images_per_second=n_imgs / max(module.step_time, 1e-9) if module.step_time else 0.0,
        data_wait_fraction=module.data_wait / max(module.data_wait + module.step_time, 1e-9),
        n_train=len(data.train), n_val=len(data.val) if data.val is not None else 0,
        n_train_boxes=data.n_train_boxes, n_degenerate=data.n_degenerate, device=accelerator, precision=precision)
    with atomic_file(run / "summary.json") as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=2, default=float))
    return result


def plot_curves(run: Path) -> Path | None:
    """``curves.png``: training loss per epoch and validation AP / AP50, from ``metrics.csv``."""
    csv = run / "metrics.csv"
    if not csv.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    if "train/loss_epoch" in df:
        d = df.dropna(subset=["train/loss_epoch"])
        ax[0].plot(d["epoch"], d["train/loss_epoch"], marker="o", label="loss")
        for k in ("train/cls", "train/box"):
            if k in df:
                dd = df.dropna(subset=[k])
                ax[0].plot(dd["epoch"], dd[k], linestyle="--", label=k.split("/")[1])
        ax[0].set_xlabel("epoch")
        ax[0].set_title("training loss")
        ax[0].legend()
    for k in ("val/AP", "val/AP50"):
        if k in df:
            d = df.dropna(subset=[k])
            ax[1].plot(d["epoch"], d[k], marker="o", label=k.split("/")[1])
    ax[1].set_xlabel("epoch")
    ax[1].set_title("validation")
    ax[1].set_ylim(0, 1)
    if ax[1].lines:
        ax[1].legend()
    else:
        ax[1].text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax[1].transAxes)
    fig.tight_layout()
    out = run / "curves.png"
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out


def load_run_config(run: str | os.PathLike[str]) -> TrainConfig:
    """The saved ``config.yaml`` of a run folder."""
    p = Path(run) / "config.yaml"
    if not p.exists():
        raise InputError(f"--resume: {p} does not exist.", fix="pass the run folder of an earlier `geonet train -o`.")
    return TrainConfig.from_dict(yaml.safe_load(p.read_text()))

