"""Torch datasets of detection samples.

Two datasets, one sample format, one labelling code path:

* :class:`ChipDataset` reads a folder written by ``geonet chip`` (or any COCO detection JSON with its
  images, georeferenced or not).
* :class:`RasterWindowDataset` cuts the same windows on the fly from rasters plus vector labels,
  without writing chips. Its windows and targets come from :func:`geonet.chip.plan_chips`, the same
  function (and so the same :func:`geonet.labels.label_window` rule) that ``geonet chip`` writes.

Both implement one interface (:class:`geonet.training.data.DetectionSource`), so training never asks
which one it holds: :meth:`~_DetectionDataset.targets`, :meth:`~_DetectionDataset.image_id`,
:meth:`~_DetectionDataset.image_size`, :meth:`~_DetectionDataset.gsd`,
:meth:`~_DetectionDataset.footprint`, :meth:`~_DetectionDataset.describe` (no pixels read) and
:meth:`~_DetectionDataset.read` (pixels).

:func:`load_voc` turns a Pascal VOC folder into the records :class:`ChipDataset` uses.

**Sample format.** ``dataset[i]`` (or ``dataset[(i, seed)]``, see below) returns
``(image, target)``:

* ``image``: FloatTensor ``[C, H, W]``, raw band values (not normalised) in the raster's units;
  nodata and padding pixels hold ``fill_values`` (per band, default 0; training sets them to the
  band means so that they normalise to 0).
* ``target["boxes"]``: FloatTensor ``[N, 4]``, ``[x1, y1, x2, y2]`` in the image's pixel frame
  (corner convention, :mod:`geonet.georef`), every box at least 1 px wide and high.
* ``target["labels"]``: Int64Tensor ``[N]``, class ids ``1..K``.
* ``target["ignore"]``: FloatTensor ``[M, 4]``, ignore regions in the same frame.
* ``target["image_id"]``: int.

Augmentation: when ``transform`` is set, it is called as ``transform(image, target, generator)``
with a ``torch.Generator`` seeded from the index and the epoch seed. Indexing with a tuple
``(i, seed)`` (what :class:`geonet.train.EpochSampler` yields) makes the augmentation of every
sample a pure function of ``(seed, epoch, i)``, whatever the number of workers, so runs and resumed
runs are reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rasterio.windows import Window
from torch.utils.data import Dataset

from geonet.boxes import xywh_to_xyxy
from geonet.chip import ChipConfig, ChipPlan, plan_chips, read_chip
from geonet.errors import InputError
from geonet.georef import affine_from_list, pixel_boxes_to_polygons, to_crs
from geonet.labels import MIN_SIDE_PX, LabelIndex
from geonet.raster import RasterInfo, RasterSource, describe_raster

log = logging.getLogger(__name__)

__all__ = ["ImageRecord", "Targets", "ChipDataset", "RasterWindowDataset", "load_coco", "load_voc", "collate",
           "band_stats"]


@dataclass
class ImageRecord:
    """One training image with its targets (pixel frame of the image).

    Attributes:
        path: image file (any GDAL-readable raster: GeoTIFF, PNG, JPEG...).
        boxes: float32 ``[N, 4]`` targets ``[x1, y1, x2, y2]``.
        labels: int64 ``[N]`` class ids ``1..K``.
        ignore: float32 ``[M, 4]`` ignore regions.
        ignore_labels: int64 ``[M]`` class ids of the ignore regions.
        split: ``"train"``, ``"val"`` or ``""`` (no split).
        image_id: COCO image id.
        meta: extra COCO image fields (``crs``, ``transform``, ``source``, ``window``, ``gsd``).
    """

    path: str
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    ignore_labels: np.ndarray | None = None
    split: str = ""
    image_id: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.ignore_labels is None:
            self.ignore_labels = np.ones(len(self.ignore), dtype=np.int64)


@dataclass
class Targets:
    """The targets of one sample, in its pixel frame (corner convention of :mod:`geonet.georef`).

    Attributes:
        boxes: ``[N, 4]`` ``[x1, y1, x2, y2]`` object boxes (degenerate ones included; the sample drops them).
        labels: int64 ``[N]`` class ids ``1..K``.
        ignore: ``[M, 4]`` ignore regions.
        ignore_labels: int64 ``[M]`` class ids of the ignore regions.
    """

    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    ignore_labels: np.ndarray


def load_coco(path: str | os.PathLike[str], *, image_root: str | os.PathLike[str] | None = None,
              classes: Sequence[str] | None = None) -> tuple[list[ImageRecord], list[str]]:
    """Records from a COCO detection JSON (a ``geonet chip`` ``annotations.json`` or any other).

    Category ids are remapped to contiguous ``1..K`` in the order of their ids (or to ``classes``
    by name when given). Annotations with ``iscrowd = 1`` or ``ignore = 1`` become ignore regions.

    Args:
        path: the JSON file, or a chip folder holding ``annotations.json``.
        image_root: folder the ``file_name``\\ s are relative to (default: the JSON's folder).
        classes: fixed class names to map onto.

    Returns:
        ``(records, class_names)``.

    Raises:
        InputError: the file is missing or is not COCO detection JSON.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "annotations.json"
    if not p.exists():
        raise InputError("no such COCO annotation file.", path=p,
                         fix="pass a `geonet chip` output folder or a COCO .json file.")
    try:
        coco = json.loads(p.read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        images = coco["images"]
        anns = coco.get("annotations", [])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"is not a COCO detection file ({exc}).", path=p,
                         fix="it needs 'images', 'annotations' and 'categories'.") from None
    names = [c["name"] for c in cats]
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise InputError(f"categories {unknown} are not among the classes {list(classes)}.", path=p,
                             fix="rename them, or train a model with those classes.")
        by_name = {n: i + 1 for i, n in enumerate(classes)}
        id_map = {c["id"]: by_name[c["name"]] for c in cats}
        names = list(classes)
    else:
        id_map = {c["id"]: i + 1 for i, c in enumerate(cats)}
    root = Path(image_root) if image_root is not None else p.parent
    per_image: dict[int, list[dict]] = {}
    for a in anns:
        per_image.setdefault(a["image_id"], []).append(a)
    records = []
    for im in images:
        a = per_image.get(im["id"], [])
        crowd = np.array([bool(x.get("iscrowd", 0) or x.get("ignore", 0)) for x in a], dtype=bool)
        boxes = xywh_to_xyxy([x["bbox"] for x in a]).astype(np.float32)
        labels = np.array([id_map[x["category_id"]] for x in a], dtype=np.int64)
        meta = {k: v for k, v in im.items() if k in ("crs", "transform", "source", "window", "gsd", "width", "height")}
        records.append(ImageRecord(path=str(root / im["file_name"]), boxes=boxes[~crowd], labels=labels[~crowd],
                                   ignore=boxes[crowd], ignore_labels=labels[crowd], split=str(im.get("split", "")),
                                   image_id=int(im["id"]), meta=meta))
    return records, names


def load_voc(folder: str | os.PathLike[str], *, classes: Sequence[str] | None = None
             ) -> tuple[list[ImageRecord], list[str]]:
    """Records from Pascal VOC XML annotations (``Annotations/*.xml`` or ``*.xml`` in ``folder``).

    Images are looked up as ``<filename>`` beside the XML, in ``JPEGImages/``, or in ``images/``.
    VOC ``bndbox`` values are 1-based inclusive pixel indexes (the VOC devkit's convention), so the
    corner-frame box is ``[xmin - 1, ymin - 1, xmax, ymax]``. ``difficult = 1`` objects become
    ignore regions. Class ids follow sorted names (or ``classes``).

    Raises:
        InputError: no XML file, an unreadable XML, or an image that cannot be found.
    """
    root = Path(folder)
    ann_dir = root / "Annotations" if (root / "Annotations").is_dir() else root
    xmls = sorted(ann_dir.glob("*.xml"))
    if not xmls:
        raise InputError("holds no Pascal VOC .xml file.", path=root, fix="pass the folder with Annotations/.")
    parsed = []
    for x in xmls:
        try:
            tree = ET.parse(x).getroot()
        except ET.ParseError as exc:
            raise InputError(f"is not valid XML ({exc}).", path=x, fix="fix or remove it.") from None
        fname = tree.findtext("filename") or (x.stem + ".jpg")
        candidates = [ann_dir / fname, root / "JPEGImages" / fname, root / "images" / fname, root / fname]
        img = next((c for c in candidates if c.exists()), None)
        if img is None:
            raise InputError(f"its image {fname} is not beside it, in JPEGImages/ or in images/.", path=x,
                             fix="put the image there.")
        objs = []
        for o in tree.iter("object"):
            bb = o.find("bndbox")
            if bb is None:
                continue
            v = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            objs.append((o.findtext("name", "object").strip(), [v[0] - 1, v[1] - 1, v[2], v[3]],
                         o.findtext("difficult", "0").strip() == "1"))
        parsed.append((img, objs))
    names = list(classes) if classes is not None else sorted({n for _, objs in parsed for n, _, _ in objs})
    lookup = {n: i + 1 for i, n in enumerate(names)}
    records = []
    for k, (img, objs) in enumerate(parsed):
        unknown = {n for n, _, _ in objs} - set(lookup)
        if unknown:
            raise InputError(f"classes {sorted(unknown)} are not among {names}.", path=img)
        hard = np.array([d for _, _, d in objs], dtype=bool)
        boxes = np.array([b for _, b, _ in objs], dtype=np.float32).reshape(-1, 4)
        labels = np.array([lookup[n] for n, _, _ in objs], dtype=np.int64)
        records.append(ImageRecord(path=str(img), boxes=boxes[~hard], labels=labels[~hard], ignore=boxes[hard],
                                   ignore_labels=labels[hard], image_id=k + 1))
    return records, names


class _DetectionDataset(Dataset):
    """Shared sample logic (read pixels, fill nodata, drop degenerate boxes, augment) and the
    :class:`~geonet.training.data.DetectionSource` interface that subclasses fill in."""

    def __init__(self, *, transform: Callable | None = None, fill_values: Sequence[float] | None = None):
        self.transform = transform
        self.fill_values = None if fill_values is None else np.asarray(fill_values, dtype=np.float32)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of sample ``i``: ``([C, H, W] data in the raster's dtype, [H, W] bool valid mask)``."""
        raise NotImplementedError

    def targets(self, i: int) -> Targets:
        """Targets of sample ``i`` (no pixel is read)."""
        raise NotImplementedError

    def image_id(self, i: int) -> int:
        """The COCO image id sample ``i`` carries as ``target["image_id"]``."""
        raise NotImplementedError

    def info(self, i: int) -> RasterInfo:
        """Header of the raster sample ``i`` is read from."""
        raise NotImplementedError

    def image_size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of sample ``i`` in pixels."""
        raise NotImplementedError

    def gsd(self, i: int) -> tuple[float, float] | None:
        """GSD ``(x, y)`` in metres of sample ``i`` (``None`` when not georeferenced)."""
        raise NotImplementedError

    def footprint(self, i: int):
        """The ground sample ``i`` shows, as a shapely polygon in EPSG:4326 (``None`` when not georeferenced)."""
        raise NotImplementedError

    def describe(self, i: int) -> dict:
        """Where sample ``i`` comes from: ``{"source", "window", ...}`` (for the run's ``split.json``)."""
        raise NotImplementedError

    def __getitem__(self, index):
        i, seed = (index if isinstance(index, tuple) else (index, None))
        data, valid = self.read(i)
        image = torch.from_numpy(data.astype(np.float32, copy=False))
        if not valid.all():
            fill = self.fill_values if self.fill_values is not None else np.zeros(image.shape[0], np.float32)
            inv = torch.from_numpy(~valid)
            image[:, inv] = torch.as_tensor(fill, dtype=torch.float32)[:, None]
        t = self.targets(i)
        boxes = torch.as_tensor(t.boxes, dtype=torch.float32).reshape(-1, 4)
        ok = (boxes[:, 2] - boxes[:, 0] >= MIN_SIDE_PX) & (boxes[:, 3] - boxes[:, 1] >= MIN_SIDE_PX)
        target = {"boxes": boxes[ok], "labels": torch.as_tensor(t.labels, dtype=torch.int64)[ok],
                  "ignore": torch.as_tensor(t.ignore, dtype=torch.float32).reshape(-1, 4),
                  "image_id": self.image_id(i)}
        if self.transform is not None:
            g = torch.Generator()
            g.manual_seed((int(seed if seed is not None else 0) * 1_000_003 + i) % (2**63))
            image, target = self.transform(image, target, g)
        return image, target


class ChipDataset(_DetectionDataset):
    """Samples from a chip folder / COCO JSON (see module docstring for the sample format).

    Args:
        source: a ``geonet chip`` output folder, a COCO JSON path, or a list of
            :class:`ImageRecord` (e.g. from :func:`load_voc`).
        split: keep only images of this split (``"train"``/``"val"``); ``None`` keeps all.
        classes: class names: for a COCO source, the names to map its categories onto (default: the
            file's own); for a list of records, their names (``classes[i]`` has id ``i + 1``).
        bands: 1-based bands to read (default: all).
        transform: augmentation ``(image, target, generator) -> (image, target)``.
        fill_values: per-band value for nodata/padding pixels.
    """

    def __init__(self, source: str | os.PathLike[str] | list[ImageRecord], *, split: str | None = None,
                 classes: Sequence[str] | None = None, bands: Sequence[int] | None = None,
                 transform: Callable | None = None, fill_values: Sequence[float] | None = None):
        super().__init__(transform=transform, fill_values=fill_values)
        if isinstance(source, list):
            records, names = source, list(classes or [])
        else:
            records, names = load_coco(source, classes=classes)
        self.records = [r for r in records if split is None or r.split == split]
        self.classes = names
        self.bands = tuple(bands) if bands else None
        self._infos: dict[str, RasterInfo] = {}
        self._sources: dict[str, RasterSource] = {}

    def __len__(self) -> int:
        return len(self.records)

    def info(self, i: int) -> RasterInfo:
        path = self.records[i].path
        if path not in self._infos:
            self._infos[path] = describe_raster(path, bands=self.bands)
        return self._infos[path]

    def image_size(self, i: int) -> tuple[int, int]:
        info = self.info(i)
        return info.width, info.height

    def gsd(self, i: int) -> tuple[float, float] | None:
        g = self.records[i].meta.get("gsd")
        return tuple(g) if g else None

    def footprint(self, i: int):
        m = self.records[i].meta
        if not m.get("crs") or not m.get("transform"):
            return None
        w, h = self.image_size(i)
        poly = pixel_boxes_to_polygons(np.array([[0, 0, w, h]], dtype=float), affine_from_list(m["transform"]))
        return to_crs(poly, m["crs"], "EPSG:4326")[0]

    def describe(self, i: int) -> dict:
        r = self.records[i]
        return {"source": r.meta.get("source", r.path), "image": r.path, "window": r.meta.get("window")}

    def read(self, i: int):
        info = self.info(i)
        src = self._sources.get(info.path)
        if src is None:
            src = RasterSource(info)
            if len(self._sources) > 64:  # chips are many and small: keep few handles open
                for s in self._sources.values():
                    s.close()
                self._sources.clear()
            self._sources[info.path] = src
        return src.read(Window(0, 0, info.width, info.height))

    def targets(self, i: int) -> Targets:
        r = self.records[i]
        return Targets(r.boxes, r.labels, r.ignore, r.ignore_labels)

    def image_id(self, i: int) -> int:
        return int(self.records[i].image_id)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_sources"] = {}
        return state


class RasterWindowDataset(_DetectionDataset):
    """Windows cut on the fly from rasters plus labels (no chips written).

    The windows, their split and their targets are those of a :class:`geonet.chip.ChipPlan`, i.e.
    exactly what ``geonet chip`` would write for the same options, except that windows that are all
    nodata are kept (they are found only by reading pixels) and then hold only fill values.

    Args:
        plan: the chip plan (:func:`geonet.chip.plan_chips`); see :meth:`from_rasters`.
        split: keep only this split; ``None`` keeps all.
        transform, fill_values: as for :class:`ChipDataset`.
    """

    def __init__(self, plan: ChipPlan, *, split: str | None = None, transform: Callable | None = None,
                 fill_values: Sequence[float] | None = None):
        super().__init__(transform=transform, fill_values=fill_values)
        self.plan = plan
        self.specs = [s for s in plan.specs if split is None or s.split == split]
        self.sources = [RasterSource(i) for i in plan.infos]
        self.classes = list(plan.classes)

    @classmethod
    def from_rasters(cls, infos: Sequence[RasterInfo], index: LabelIndex, config: ChipConfig, *,
                     split: str | None = None, **kw) -> RasterWindowDataset:
        """Plan the windows of ``infos`` with ``index``'s labels and ``config`` (:func:`geonet.chip.plan_chips`)."""
        return cls(plan_chips(infos, index, config), split=split, **kw)

    def __len__(self) -> int:
        return len(self.specs)

    def info(self, i: int) -> RasterInfo:
        return self.plan.infos[self.specs[i].raster]

    def image_size(self, i: int) -> tuple[int, int]:
        return self.specs[i].window[2], self.specs[i].window[3]

    def gsd(self, i: int) -> tuple[float, float] | None:
        return self.info(i).gsd

    def footprint(self, i: int):
        info = self.info(i)
        if info.crs is None:
            return None
        x, y, w, h = self.specs[i].window
        box = [max(x, 0), max(y, 0), min(x + w, info.width), min(y + h, info.height)]
        return info.footprint(box, crs="EPSG:4326")

    def describe(self, i: int) -> dict:
        return {"source": str(Path(self.info(i).path).resolve()), "window": list(self.specs[i].window)}

    def read(self, i: int):
        spec = self.specs[i]
        return read_chip(self.sources[spec.raster], spec)

    def targets(self, i: int) -> Targets:
        lab = self.specs[i].labels
        return Targets(lab.boxes, lab.class_ids, lab.ignore, lab.ignore_class_ids)

    def image_id(self, i: int) -> int:
        return i + 1


def collate(batch):
    """DataLoader collate for detection: ``(list[image], list[target])`` (images may differ in size)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def band_stats(dataset: _DetectionDataset, *, max_images: int = 256, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation over the valid pixels of (a sample of) a dataset.

    Nodata and padding are excluded. Up to ``max_images`` images are read, chosen at random with
    ``seed``. Accumulated in float64.

    Returns:
        ``(mean, std)``: lists of length C, in the raster's units. A band with zero variance gets
        ``std = 1``.

    Raises:
        InputError: the dataset is empty or has no valid pixel.
    """
    n = len(dataset)
    if n == 0:
        raise InputError("no training images to compute band statistics from.",
                         fix="check the imagery and labels (geonet check).")
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=min(n, max_images), replace=False)
    s = s2 = None
    count = 0
    for i in sorted(idx.tolist()):
        data, valid = dataset.read(int(i))
        v = data[:, valid].astype(np.float64)  # [C, P]
        if v.size == 0:
            continue
        s = v.sum(axis=1) if s is None else s + v.sum(axis=1)
        s2 = (v * v).sum(axis=1) if s2 is None else s2 + (v * v).sum(axis=1)
        count += v.shape[1]
    if count == 0:
        raise InputError("every training pixel is nodata.", fix="check --nodata and --bands.")
    mean = s / count
    var = np.maximum(s2 / count - mean * mean, 0.0)
    std = np.sqrt(var)
    std[std == 0] = 1.0
    return mean.tolist(), std.tolist()

