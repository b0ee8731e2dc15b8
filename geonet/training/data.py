"""Training data: the datasets of each split, and the facts about them that go into the checkpoint.

The data come from rasters plus labels (windows cut on the fly,
:class:`geonet.datasets.RasterWindowDataset`), from a ``geonet chip`` folder, or from COCO / Pascal VOC
image sets (:class:`geonet.datasets.ChipDataset`). Both datasets implement :class:`DetectionSource`, and
this module uses nothing else of them.

**Reproducibility.** :class:`EpochSampler` shuffles with a generator seeded by the run's seed and the
epoch, and yields ``(index, seed)`` pairs so that each sample's augmentation is fixed by seed, epoch
and index, whatever the number of workers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from geonet.chip import plan_chips
from geonet.datasets import ChipDataset, RasterWindowDataset, Targets, load_coco, load_voc
from geonet.errors import InputError
from geonet.labels import MIN_SIDE_PX, LabelIndex, read_labels
from geonet.metrics import coco_annotations
from geonet.raster import RasterInfo, describe_raster, find_rasters
from geonet.training.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["DetectionSource", "TrainData", "EpochSampler", "prepare_data", "gt_coco", "split_listing", "val_area"]


@runtime_checkable
class DetectionSource(Protocol):
    """What training needs of a dataset of detection samples (see :mod:`geonet.datasets`).

    ``dataset[i]`` (or ``dataset[(i, seed)]``) gives ``(image FloatTensor[C, H, W], target dict)``; the
    other methods answer without reading pixels, except :meth:`read`.
    """

    transform: object
    fill_values: np.ndarray | None

    def __len__(self) -> int: ...

    def __getitem__(self, index): ...

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``([C, H, W] raw data, [H, W] valid mask)`` of sample ``i``."""

    def targets(self, i: int) -> Targets:
        """Boxes, labels and ignore regions of sample ``i`` in its pixel frame."""

    def image_id(self, i: int) -> int:
        """The COCO image id sample ``i`` carries as ``target["image_id"]``."""

    def info(self, i: int) -> RasterInfo:
        """Header of the raster sample ``i`` is read from (bands, dtype, nodata)."""

    def image_size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` in pixels."""

    def gsd(self, i: int) -> tuple[float, float] | None:
        """GSD ``(x, y)`` in metres, ``None`` when not georeferenced."""

    def footprint(self, i: int):
        """Ground of sample ``i`` as a shapely polygon in EPSG:4326, ``None`` when not georeferenced."""

    def describe(self, i: int) -> dict:
        """``{"source", "window", ...}``: where sample ``i`` comes from."""


@dataclass
class TrainData:
    """Datasets and the facts about them that go into the checkpoint.

    Attributes:
        train, val: the splits (``val`` is ``None`` without a validation split).
        classes: class names; ``classes[i]`` has id ``i + 1``.
        in_channels, bands, dtype, nodata: of the imagery (bands 1-based, ``None``: all but alpha).
        gsd: median training GSD ``[x, y]`` in metres (``None`` if not georeferenced).
        chip_size: window side in pixels.
        val_gt: COCO ground truth of ``val`` (ignore regions as ``iscrowd`` with their class).
        n_train_boxes: object boxes in the training split.
        n_degenerate: labels dropped because their box (or its part in a window) is under 1 px on a side.
        box_stats, box_stats_m: training box size percentiles in pixels and metres
            (:func:`geonet.check.box_size_stats`).
        train_boxes: ``[N, 4]`` training boxes in their windows' frames (for anchor fitting).
    """

    train: DetectionSource
    val: DetectionSource | None
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
    train_boxes: np.ndarray
    box_stats_m: dict = field(default_factory=dict)


def gt_coco(ds: DetectionSource, classes: list[str]) -> dict:
    """COCO ground truth of a dataset, with the image ids its samples carry.

    Ignore regions are ``iscrowd = 1`` annotations of their own class, so COCOeval ignores detections
    of that class on them and no other.

    Raises:
        InputError: two samples carry the same image id.
    """
    ids = [ds.image_id(i) for i in range(len(ds))]
    if len(set(ids)) != len(ids):
        raise InputError("the validation images do not have unique COCO image ids.",
                         fix="give every image in the annotations a distinct id.")
    images, anns = [], []
    for i, image_id in enumerate(ids):
        w, h = ds.image_size(i)
        images.append({"id": image_id, "width": w, "height": h})
        t = ds.targets(i)
        anns += coco_annotations(image_id, t.boxes, t.labels, first_id=len(anns) + 1, skip_empty=True)
        anns += coco_annotations(image_id, t.ignore, t.ignore_labels, iscrowd=1, first_id=len(anns) + 1,
                                 skip_empty=True)
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


@dataclass
class _Sets:
    """What a data source gives: the splits and the facts known before reading a pixel."""

    train: DetectionSource
    val: DetectionSource | None
    classes: list[str]
    n_degenerate: int
    ref: RasterInfo | None  # the raster whose bands, dtype and nodata the model takes
    gsd: list[float] | None
    chip_size: int


def _raster_datasets(cfg: TrainConfig) -> _Sets:
    """Windows cut from ``--imagery`` with ``--labels``."""
    d = cfg.data
    infos = [describe_raster(p, bands=d.bands, nodata=d.nodata) for p in find_rasters(d.imagery)]
    counts = {len(i.bands) for i in infos}
    if len(counts) > 1:
        ref = infos[0]
        odd = next(i for i in infos if len(i.bands) != len(ref.bands))
        raise InputError(f"has {len(odd.bands)} band(s) but {ref.path} has {len(ref.bands)}: every raster "
                         "must give the model the same bands.", path=odd.path,
                         fix="pass --bands to choose the same bands from each, or train on one kind.")
    labels = read_labels(d.labels, layer=d.layer, class_field=d.class_field)
    plan = plan_chips(infos, LabelIndex(labels, point_size=cfg.chip.point_size), cfg.chip_config)
    gsds = [i.gsd for i in infos if i.gsd]
    gsd = [float(np.median([g[0] for g in gsds])), float(np.median([g[1] for g in gsds]))] if gsds else None
    return _Sets(train=RasterWindowDataset(plan, split="train"), val=RasterWindowDataset(plan, split="val"),
                 classes=list(plan.classes),
                 n_degenerate=sum(r["degenerate_labels"] + r["slivers_dropped"] for r in plan.per_raster),
                 ref=infos[0], gsd=gsd, chip_size=plan.size)


def _image_set_datasets(cfg: TrainConfig) -> _Sets:
    """A chip folder, COCO or VOC image set."""
    d = cfg.data
    if d.chips:
        records, classes = load_coco(d.chips)
        if any(r.split for r in records):
            tr = [r for r in records if r.split != "val"]
            va = [r for r in records if r.split == "val"]
        else:
            log.warning("%s has no val split (chip with --split val=0.2); the last epoch is the best model", d.chips)
            tr, va = records, []
    elif d.coco:
        records, classes = load_coco(d.coco, image_root=d.images)
        tr, va = _split_records(records, cfg.chip.val_fraction, cfg.seed)
    else:
        records, classes = load_voc(d.voc)
        tr, va = _split_records(records, cfg.chip.val_fraction, cfg.seed)
    if not tr:
        raise InputError("no training images.", path=d.source,
                         fix="point it at a `geonet chip` folder (or COCO/VOC set) that holds images.")
    n_degenerate = sum(int((~_big_enough(r.boxes)).sum())
                       for r in tr + va)
    train = ChipDataset(tr, classes=classes, bands=d.bands)
    val = ChipDataset(va, classes=classes, bands=d.bands) if va else None
    ref = train.info(0)
    bands = len(ref.bands)
    for i in range(len(train)):
        if len(train.info(i).bands) != bands:
            raise InputError(f"has {len(train.info(i).bands)} band(s), the first image has {bands}.",
                             path=train.records[i].path, fix="pass --bands to choose the same bands.")
    gsd = [float(ref.gsd[0]), float(ref.gsd[1])] if ref.gsd and ref.crs else None
    return _Sets(train=train, val=val, classes=classes, n_degenerate=n_degenerate, ref=ref, gsd=gsd,
                 chip_size=max(ref.width, ref.height))


def _big_enough(boxes: np.ndarray) -> np.ndarray:
    """``[N]`` mask of boxes at least :data:`geonet.labels.MIN_SIDE_PX` wide and high."""
    b = np.asarray(boxes).reshape(-1, 4)
    return (b[:, 2] - b[:, 0] >= MIN_SIDE_PX) & (b[:, 3] - b[:, 1] >= MIN_SIDE_PX)


def prepare_data(cfg: TrainConfig) -> TrainData:
    """Build the train and val datasets from the configured source.

    Raises:
        InputError: no labels at all, band counts that differ between rasters or images, bad paths or
            options.
    """
    from geonet.check import box_size_stats

    sets = (_raster_datasets if cfg.data.imagery else _image_set_datasets)(cfg)
    train, val, ref = sets.train, sets.val, sets.ref
    targets = [train.targets(i) for i in range(len(train))]
    kept = [t.boxes[_big_enough(t.boxes)] for t in targets]
    train_boxes = np.concatenate(kept) if kept else np.zeros((0, 4))
    if len(train_boxes) == 0:
        raise InputError("no training labels: the training split holds no object box.", path=cfg.data.source,
                         fix="check that the labels fall on the imagery (geonet check), or lower --split val.")
    if sets.n_degenerate:
        log.warning("dropped %d degenerate box(es) under 1 px wide or high", sets.n_degenerate)
    if val is not None and len(val) == 0:
        val = None
    wh = np.column_stack([train_boxes[:, 2] - train_boxes[:, 0], train_boxes[:, 3] - train_boxes[:, 1]])
    # sizes in metres, through each image's own GSD (rasters of several GSDs train together)
    wh_m = [np.column_stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]]) * np.asarray(g)
            for b, g in zip(kept, (train.gsd(i) for i in range(len(train)))) if g is not None and len(b)]
    return TrainData(train=train, val=val, classes=sets.classes, in_channels=len(ref.bands), bands=list(ref.bands),
                     dtype=ref.dtype, nodata=ref.nodata, gsd=sets.gsd, chip_size=int(sets.chip_size),
                     val_gt=gt_coco(val, sets.classes) if val is not None else None, n_train_boxes=len(train_boxes),
                     n_degenerate=sets.n_degenerate, box_stats=box_size_stats(wh), train_boxes=train_boxes,
                     box_stats_m=box_size_stats(np.concatenate(wh_m)) if wh_m else {})


def split_listing(data: TrainData) -> dict:
    """``{"train": [...], "val": [...]}``: where the samples of each split come from, for ``split.json``."""
    return {name: [ds.describe(i) for i in range(len(ds))] if ds is not None else []
            for name, ds in (("train", data.train), ("val", data.val))}


def val_area(data: TrainData):
    """Ground the validation split covers: the union of its samples' footprints (EPSG:4326), or ``None``.

    Only for georeferenced sources (imagery + labels, or chips that carry ``crs`` and ``transform``).
    Written as ``val_area.geojson``, it is the ``--aoi`` that evaluates a model on held-out ground only.
    """
    import shapely

    ds = data.val
    if ds is None:
        return None
    parts = [ds.footprint(i) for i in range(len(ds))]
    if not parts or any(p is None for p in parts):
        return None
    return shapely.union_all(np.array(parts, dtype=object))


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles ``range(n)`` with a generator seeded by ``(seed, epoch)``; yields ``(index, sample_seed)``.

    ``sample_seed`` identifies the (seed, epoch) pair, so each sample's augmentation is fixed by
    seed, epoch and index (see :mod:`geonet.datasets`). Lightning calls :meth:`set_epoch`.

    **Several processes (DDP).** When a ``torch.distributed`` process group is up, every process draws the
    same permutation, padded with its own first indices to a multiple of ``world``, and takes every
    ``world``-th index from its rank on (the split of PyTorch's ``DistributedSampler``): every process runs
    the same number of batches (DDP's gradient sync and the validation gather need that, even when there
    are fewer validation images than processes). Validation drops the padded repeats after gathering
    (:meth:`geonet.training.task.DetectionTask.on_validation_epoch_end`), so each image is scored once.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def _group() -> tuple[int, int]:
        """``(rank, world size)`` of the process group, ``(0, 1)`` without one."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    @staticmethod
    def shard_length(n: int, world: int) -> int:
        """Samples one process draws per epoch out of ``n`` split over ``world`` processes."""
        return math.ceil(n / world)

    def __len__(self) -> int:
        return self.shard_length(self.n, self._group()[1])

    def __iter__(self):
        epoch_seed = self.seed * 100_003 + self.epoch
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(epoch_seed)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        rank, world = self._group()
        if world > 1:
            order = (order * world)[:self.shard_length(self.n, world) * world][rank::world]
        return iter([(i, epoch_seed) for i in order])
