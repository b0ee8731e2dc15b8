"""Chipping: rasters + vector labels -> training chips (the first pipeline stage).

:func:`plan_chips` lays a window grid over every raster, labels each window through
:func:`geonet.labels.label_window` (the single labelling code path, shared with the on-the-fly
training dataset in :mod:`geonet.datasets`), assigns windows to a spatial train/val split and picks
the background-only windows to keep. :func:`write_chips` reads each planned window, skips those
that are all nodata, and writes GeoTIFF chips that keep their georeferencing plus a COCO
``annotations.json``.

**Window grid.** :func:`geonet.tiling.window_offsets` inside each raster or split block: the last
window of a row or column shifts inward so the edges are always covered; a region shorter than
``size`` gets one window, padded (padding is nodata, or 0 with an internal mask when the raster has
no nodata).

**Spatial split** (``val_fraction > 0``): the same ground never lands in both train and val.

* ``split_by="raster"``: rasters whose footprints overlap (the same ground at several GSDs, or
  overlapping scenes) form one group; whole groups go to val, chosen with a seeded shuffle until
  they hold ``val_fraction`` of the labels.
* ``split_by="block"``: each group is cut into square blocks on a grid anchored on the group's
  finest raster; windows are tiled *inside* each block and never cross a block edge, and whole
  blocks go to val. Across rasters of one group the block edges coincide on the ground to within a
  pixel.
* ``split_by="auto"`` (default): ``raster`` when there are at least 2 groups, else ``block``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.windows import Window

import geonet
from geonet.atomic import atomic_dir, check_output_dir
from geonet.boxes import connected_components
from geonet.errors import InputError
from geonet.georef import affine_to_list, crs_to_pixel, pixel_to_crs, to_crs
from geonet.labels import LabelIndex, RasterBoxes, WindowLabels, label_window, read_labels
from geonet.metrics import coco_annotations
from geonet.raster import RasterInfo, RasterSource, describe_raster, find_rasters
from geonet.tiling import window_offsets

log = logging.getLogger(__name__)

__all__ = ["ChipConfig", "ChipSpec", "ChipPlan", "chip", "plan_chips", "write_chips", "read_chip"]


#: Chip side in pixels when none is given (and the rasters are at least that large).
DEFAULT_SIZE = 512


@dataclass
class ChipConfig:
    """Options of the chipping stage (the ``geonet chip`` flags).

    Attributes:
        size: chip side in pixels; ``None``: :data:`DEFAULT_SIZE`, or the longest raster side when every
            raster is smaller (a larger chip would be mostly padding). A given size is kept, and rasters
            smaller than it are padded.
        stride: step between windows in pixels (default: ``size``, no overlap); ``<= size``.
        min_visible: minimum visible fraction of a box cut by a chip edge to stay a target.
        negative_ratio: background-only chips kept per chip with objects (0 keeps none).
        val_fraction: share of labels that go to the val split (0: no split).
        split_by: ``auto``, ``raster`` or ``block`` (see module docstring).
        block_size: block side in pixels of the group's finest raster (``split_by=block``);
            default ``min(2 * size, longest side / 2)``.
        seed: seed of the split and the negative sampling.
        point_size: side in metres of the square box given to point labels; required when the labels
            hold points (``None``: points are an error, never boxes of a guessed size).
        compress: GeoTIFF compression of the chips (``none``, ``deflate``, ``lzw``, ``zstd``).
    """

    size: int | None = None
    stride: int | None = None
    min_visible: float = 0.5
    negative_ratio: float = 0.25
    val_fraction: float = 0.0
    split_by: str = "auto"
    block_size: int | None = None
    seed: int = 0
    point_size: float | None = None
    compress: str = "deflate"

    def validate(self) -> None:
        """Raise :class:`InputError` for out-of-range options."""
        if self.size is not None and self.size <= 0:
            raise InputError(f"--size must be a positive number of pixels, got {self.size}.", fix="use e.g. --size 512.")
        if self.stride is not None and self.stride <= 0:
            raise InputError(f"--stride must be positive, got {self.stride}.", fix="use e.g. --stride 448.")
        if self.stride is not None and self.size is not None and self.stride > self.size:
            raise InputError(f"--stride {self.stride} is larger than --size {self.size}: the gaps between chips would "
                             "never be seen.", fix=f"use a stride of at most {self.size}.")
        if not 0.0 < self.min_visible <= 1.0:
            raise InputError(f"--min-visible must be in (0, 1], got {self.min_visible}.", fix="use e.g. 0.5.")
        if self.negative_ratio < 0:
            raise InputError(f"--negative-ratio must be >= 0, got {self.negative_ratio}.", fix="use e.g. 0.25.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"--split val={self.val_fraction}: the fraction must be in [0, 1).", fix="use e.g. val=0.2.")
        if self.split_by not in ("auto", "raster", "block"):
            raise InputError(f"--split-by {self.split_by!r}: choose auto, raster or block.")
        if self.block_size is not None and self.block_size <= 0:
            raise InputError(f"--block-size must be positive, got {self.block_size}.")
        if self.point_size is not None and self.point_size <= 0:
            raise InputError(f"--point-size must be positive (metres), got {self.point_size}.",
                             fix="give the typical object width in metres, e.g. --point-size 3.")

    @property
    def step(self) -> int:
        """Step between windows (the stride, else the size) of a resolved configuration."""
        return self.stride if self.stride is not None else self.size

    def resolved(self, infos: Sequence[RasterInfo]) -> ChipConfig:
        """A copy with the chip size decided for ``infos`` (see ``size``).

        Raises:
            InputError: a given size above twice the longest raster side (and above :data:`DEFAULT_SIZE`).
        """
        longest = max((max(i.width, i.height) for i in infos), default=DEFAULT_SIZE)
        if self.size is not None:
            if self.size > max(DEFAULT_SIZE, 2 * longest):  # a chip of mostly padding, and gigabytes of it
                raise InputError(f"--size {self.size} px is far larger than the largest raster ({longest} px).",
                                 fix=f"use --size {min(DEFAULT_SIZE, longest)} (or up to {max(DEFAULT_SIZE, 2 * longest)}), "
                                     "or leave it out.")
            return self
        size = min(DEFAULT_SIZE, longest)
        return dataclasses.replace(self, size=size, stride=None if self.stride is None else min(self.stride, size))


@dataclass
class ChipSpec:
    """One planned chip.

    Attributes:
        raster: index of the raster in the plan's ``infos``.
        window: ``(col_off, row_off, size, size)`` in the raster's pixel frame; may extend past it.
        region: ``(x1, y1, x2, y2)``: the part of the raster the chip may show (its block, clipped
            to the raster); pixels of the window outside it are padding.
        split: ``"train"`` or ``"val"``.
        labels: the window's targets and ignore regions (window frame).
    """

    raster: int
    window: tuple[int, int, int, int]
    region: tuple[int, int, int, int]
    split: str
    labels: WindowLabels


@dataclass
class ChipPlan:
    """Output of :func:`plan_chips`.

    Attributes:
        infos: the rasters.
        specs: every planned chip.
        classes: class names (``classes[i]`` has id ``i + 1``).
        split_by: the split unit used (``raster``, ``block`` or ``None`` without a split).
        labels_total, labels_inside: labels read, and labels that fall on some raster.
        per_raster: counts per raster (labels, windows with objects, background windows, degenerate labels).
        size: the chip side used (:meth:`ChipConfig.resolved`).
    """

    infos: list[RasterInfo]
    specs: list[ChipSpec]
    classes: list[str]
    split_by: str | None
    labels_total: int
    labels_inside: int
    per_raster: list[dict] = field(default_factory=list)
    size: int = 512


def footprint_groups(infos: Sequence[RasterInfo]) -> list[list[int]]:
    """Group rasters whose footprints overlap with positive area (connected components), in input order."""
    fps = np.array([i.footprint(crs="EPSG:4326") for i in infos], dtype=object)
    a, b = shapely.STRtree(fps).query(fps, predicate="intersects")
    inter = shapely.area(shapely.intersection(fps[a], fps[b]))
    real = (a != b) & (inter > 1e-6 * np.minimum(shapely.area(fps[a]), shapely.area(fps[b])))
    labels = connected_components(len(infos), a[real], b[real])
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(labels.tolist()):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def _blocks_for_group(infos: Sequence[RasterInfo], group: list[int], block_px: int | None, size: int):
    """Block rectangles per raster of a group: ``{raster: [(block_key, (x1, y1, x2, y2)), ...]}``.

    The block grid is defined in the pixel frame of the group's finest raster (the reference),
    mapped to the CRS, then into each raster's pixel frame, and rounded to whole pixels.
    """
    ref = min(group, key=lambda i: infos[i].gsd_mean or 1.0)
    rinfo = infos[ref]
    if block_px is None:
        block_px = int(min(2 * size, max(64, math.ceil(max(rinfo.width, rinfo.height) / 2))))
    # extent of the whole group in the reference pixel frame
    xs, ys = [], []
    for i in group:
        fp = infos[i].footprint(crs=rinfo.crs)
        X, Y = np.asarray(fp.exterior.coords).T
        x, y = crs_to_pixel(rinfo.transform, X, Y)
        xs.extend(x)
        ys.extend(y)
    gx0 = math.floor(min(xs) / block_px) * block_px
    gy0 = math.floor(min(ys) / block_px) * block_px
    nx = math.ceil((max(xs) - gx0) / block_px)
    ny = math.ceil((max(ys) - gy0) / block_px)
    out: dict[int, list] = {i: [] for i in group}
    for by in range(ny):
        for bx in range(nx):
            x1, y1 = gx0 + bx * block_px, gy0 + by * block_px
            cx = np.array([x1, x1 + block_px, x1 + block_px, x1])
            cy = np.array([y1, y1, y1 + block_px, y1 + block_px])
            X, Y = pixel_to_crs(rinfo.transform, cx, cy)
            for i in group:
                info = infos[i]
                if info.crs != rinfo.crs:
                    poly = to_crs(np.array([shapely.polygons(np.column_stack([X, Y]))], object), rinfo.crs, info.crs)[0]
                    PX, PY = np.asarray(poly.exterior.coords).T
                else:
                    PX, PY = X, Y
                px, py = crs_to_pixel(info.transform, PX, PY)
                r = (max(0, int(round(px.min()))), max(0, int(round(py.min()))),
                     min(info.width, int(round(px.max()))), min(info.height, int(round(py.max()))))
                if r[2] > r[0] and r[3] > r[1]:
                    out[i].append(((ref, by, bx), r))
    return out


def _pick_val(units: list, weights: np.ndarray, fraction: float, rng: np.random.Generator) -> set:
    """Seeded choice of units for val, as close as it gets to ``fraction`` of the total weight.

    Units are visited in a seeded random order; one is added while the val share is short of
    ``fraction`` and adding it overshoots by less than the current shortfall. Val gets at least one
    unit and train keeps at least one.
    """
    order = rng.permutation(len(units))
    total = float(weights.sum()) or 1.0
    val, acc = set(), 0.0
    for k in order:
        short = fraction - acc / total
        if short <= 0 or len(val) >= len(units) - 1:
            break
        over = (acc + float(weights[k])) / total - fraction
        if val and over > short:
            continue
        val.add(units[k])
        acc += float(weights[k])
    return val


def plan_chips(infos: Sequence[RasterInfo], index: LabelIndex, config: ChipConfig) -> ChipPlan:
    """Plan every chip: window grid, labels, split and negative sampling (no pixel is read).

    Args:
        infos: the rasters (all with a CRS).
        index: the labels.
        config: chipping options.

    Returns:
        A :class:`ChipPlan`; ``specs`` holds every window with objects and the sampled
        background-only windows.

    Raises:
        InputError: a raster has no CRS, the labels miss every raster, or the split cannot be made.
    """
    config.validate()
    config = config.resolved(infos)
    size, step = config.size, config.step
    rng = np.random.default_rng(config.seed)
    rboxes: list[RasterBoxes] = [index.for_raster(info) for info in infos]
    inside = set()
    for rb in rboxes:
        inside.update(rb.label_idx.tolist())
    if not inside:
        raise InputError(
            f"none of the {len(index.labels)} labels falls on any of the {len(infos)} raster(s).",
            path=index.labels.path,
            fix="check that the labels and imagery cover the same area (run `geonet check` to see both extents "
                "and CRSs).")

    # regions per raster: [(unit_key, (x1, y1, x2, y2))]
    split_by = None
    regions: dict[int, list] = {i: [((i,), (0, 0, info.width, info.height))] for i, info in enumerate(infos)}
    val_units: set = set()
    if config.val_fraction > 0:
        groups = footprint_groups(infos)
        split_by = config.split_by
        if split_by == "auto":
            split_by = "raster" if len(groups) >= 2 else "block"
        if split_by == "raster":
            if len(groups) < 2:
                raise InputError("--split-by raster needs at least 2 rasters that do not overlap; these "
                                 f"{len(infos)} overlap on the ground.", fix="use --split-by block.")
            units = [tuple(g) for g in groups]
            weights = np.array([sum(len(rboxes[i].boxes) for i in g) for g in groups], dtype=float)
            val_units = _pick_val(units, weights, config.val_fraction, rng)
            regions = {i: [(u, (0, 0, infos[i].width, infos[i].height))] for u in units for i in u}
        else:
            regions = {}
            for g in groups:
                regions.update(_blocks_for_group(infos, g, config.block_size, size))
            units = sorted({k for rs in regions.values() for k, _ in rs})
            if len(units) < 2:
                raise InputError("--split-by block: the imagery makes a single block, so nothing is left for val.",
                                 fix="lower --block-size (pixels of the finest raster).")
            weights = np.zeros(len(units))
            pos = {u: k for k, u in enumerate(units)}
            for i, rs in regions.items():
                for key, (x1, y1, x2, y2) in rs:
                    weights[pos[key]] += len(rboxes[i].query(x1, y1, x2, y2)) + 1e-3
            val_units = _pick_val(units, weights, config.val_fraction, rng)

    positives: list[ChipSpec] = []
    negatives: list[ChipSpec] = []
    per_raster = []
    for i, info in enumerate(infos):
        rb = rboxes[i]
        n_pos = n_neg = n_slivers = 0
        for key, (x1, y1, x2, y2) in regions[i]:
            split = "val" if key in val_units else "train"
            for r in window_offsets(y2 - y1, size, step, y1):
                for c in window_offsets(x2 - x1, size, step, x1):
                    lab = label_window(rb, c, r, size, size, clip=(x1, y1, x2, y2), min_visible=config.min_visible)
                    n_slivers += lab.n_slivers
                    spec = ChipSpec(raster=i, window=(c, r, size, size), region=(x1, y1, x2, y2), split=split,
                                    labels=lab)
                    if lab.is_negative:
                        negatives.append(spec)
                        n_neg += 1
                    else:
                        positives.append(spec)
                        n_pos += 1
        per_raster.append({"path": info.path, "labels": int(len(rb.boxes)), "windows_with_objects": n_pos,
                           "windows_background": n_neg, "degenerate_labels": rb.n_degenerate,
                           "slivers_dropped": n_slivers})
    specs = positives + _sample_negatives(negatives, positives, config.negative_ratio, rng)
    specs.sort(key=lambda s: (s.raster, s.window[1], s.window[0]))
    return ChipPlan(infos=list(infos), specs=specs, classes=list(index.labels.classes), split_by=split_by,
                    labels_total=len(index.labels), labels_inside=len(inside), per_raster=per_raster, size=size)


def _sample_negatives(negatives: list[ChipSpec], positives: list[ChipSpec], ratio: float,
                      rng: np.random.Generator) -> list[ChipSpec]:
    """Keep ``round(ratio * positives)`` background windows per split, chosen at random (seeded)."""
    kept = []
    for split in ("train", "val"):
        pool = [s for s in negatives if s.split == split]
        n = min(len(pool), int(round(ratio * sum(1 for s in positives if s.split == split))))
        if n:
            kept.extend(pool[k] for k in sorted(rng.choice(len(pool), size=n, replace=False)))
    return kept


def read_chip(source: RasterSource, spec: ChipSpec) -> tuple[np.ndarray, np.ndarray]:
    """Read a planned chip: ``([C, size, size] data, [size, size] valid)``; outside ``region`` is padding."""
    c, r, w, h = spec.window
    data, valid = source.read(Window(c, r, w, h))
    x1, y1, x2, y2 = spec.region
    if (x1, y1) > (c, r) or x2 < c + w or y2 < r + h:
        keep = np.zeros_like(valid)
        keep[max(0, y1 - r):max(0, y2 - r), max(0, x1 - c):max(0, x2 - c)] = True
        outside = ~keep
        data[:, outside] = np.asarray(source.fill_value, dtype=data.dtype)
        valid &= keep
    return data, valid


@dataclass
class ChipReport:
    """What :func:`write_chips` did. Times are seconds."""

    out_dir: str
    chips: int = 0
    chips_train: int = 0
    chips_val: int = 0
    chips_negative: int = 0
    boxes: int = 0
    ignore_regions: int = 0
    skipped_nodata: int = 0
    labels_total: int = 0
    labels_inside: int = 0
    split_by: str | None = None
    classes: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds_total: float = 0.0
    seconds_read: float = 0.0
    seconds_write: float = 0.0
    per_raster: list[dict] = field(default_factory=list)


def write_chips(plan: ChipPlan, out_dir: str | os.PathLike[str], config: ChipConfig, *, preview: int = 0,
                overwrite: bool = False, extra_info: dict | None = None) -> ChipReport:
    """Write the planned chips as georeferenced GeoTIFFs plus a COCO ``annotations.json``.

    Layout of ``out_dir``: ``images/*.tif`` (one per chip, same dtype, bands and nodata as the
    source, with the chip's own affine transform and CRS, an internal mask where padded),
    ``annotations.json`` (COCO; see :func:`coco_dict`) and ``preview/*.png`` when ``preview > 0``.
    The folder appears atomically: on any failure nothing is left at ``out_dir``.

    Raises:
        InputError: ``out_dir`` cannot be written (see :func:`geonet.atomic.check_output_dir`).
        RunError: a raster fails to decode.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    t_start = time.perf_counter()
    report = ChipReport(out_dir=str(out), labels_total=plan.labels_total, labels_inside=plan.labels_inside,
                        split_by=plan.split_by, classes=plan.classes, per_raster=plan.per_raster)
    images, annotations = [], []
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        sources = [RasterSource(info) for info in plan.infos]
        for spec in plan.specs:
            src = sources[spec.raster]
            info = src.info
            t0 = time.perf_counter()
            data, valid = read_chip(src, spec)
            report.seconds_read += time.perf_counter() - t0
            report.bytes_read += int(valid.sum()) * data.shape[0] * data.dtype.itemsize
            if not valid.any():
                report.skipped_nodata += 1
                continue
            c, r, w, h = spec.window
            name = f"images/{Path(info.path).stem}_{c}_{r}.tif"
            transform = info.transform @ Affine.translation(c, r)
            t0 = time.perf_counter()
            _write_geotiff(tmp / name, data, valid, transform, info, config.compress)
            report.seconds_write += time.perf_counter() - t0
            image_id = len(images) + 1
            images.append({
                "id": image_id, "file_name": name, "width": w, "height": h, "split": spec.split,
                "source": str(Path(info.path).resolve()), "window": [c, r, w, h], "crs": info.crs_label,
                "transform": affine_to_list(transform), "gsd": list(info.gsd) if info.gsd else None,
            })
            lab = spec.labels
            for boxes, cls, crowd in ((lab.boxes, lab.class_ids, 0), (lab.ignore, lab.ignore_class_ids, 1)):
                annotations += coco_annotations(image_id, boxes, cls, iscrowd=crowd, first_id=len(annotations) + 1,
                                                decimals=3)
            report.chips += 1
            report.boxes += len(lab.boxes)
            report.ignore_regions += len(lab.ignore)
            report.chips_negative += int(lab.is_negative)
            if spec.split == "val":
                report.chips_val += 1
            else:
                report.chips_train += 1
        for s in sources:
            s.close()
        if report.chips == 0:
            raise InputError(f"every window with labels is nodata ({report.skipped_nodata} skipped), so no chip was "
                             "written.", path=plan.infos[0].path if len(plan.infos) == 1 else None,
                             fix="check the rasters' nodata value (or pass --nodata) and --bands; `geonet check` "
                                 "shows both.")
        info_block = {"geonet_version": geonet.__version__, "chip_config": {**asdict(config), "size": plan.size},
                      "bands": list(plan.infos[0].bands) if plan.infos else [], "split_by": plan.split_by,
                      **(extra_info or {})}
        coco = coco_dict(images, annotations, plan.classes, info_block)
        (tmp / "annotations.json").write_text(json.dumps(coco))
        if preview > 0:
            from geonet.preview import chip_previews

            chip_previews(tmp, coco, preview)
    report.seconds_total = time.perf_counter() - t_start
    return report


def coco_dict(images: list[dict], annotations: list[dict], classes: Sequence[str], info: dict) -> dict:
    """A COCO detection dict.

    ``bbox`` is ``[x, y, w, h]`` in the image's pixel frame (corner convention, see
    :mod:`geonet.georef`). Ignore regions are annotations with ``iscrowd = 1`` (and ``ignore = 1``),
    which pycocotools' COCOeval also treats as regions to ignore. Each image carries extra fields:
    ``split``, ``source`` (raster path), ``window`` (``[col_off, row_off, w, h]`` in the source),
    ``crs`` (``EPSG:n`` or WKT), ``transform`` (affine ``[a, b, c, d, e, f]``, pixel corner -> CRS)
    and ``gsd`` (metres, ``[x, y]``). Category ids are geonet's class ids ``1..K``.
    """
    return {
        "info": {"description": "geonet training chips", "version": str(info.get("geonet_version", "")),
                 "date_created": time.strftime("%Y-%m-%dT%H:%M:%S"), "geonet": info},
        "licenses": [],
        "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(classes)],
        "images": images,
        "annotations": annotations,
    }


def _write_geotiff(path: Path, data: np.ndarray, valid: np.ndarray, transform: Affine, info: RasterInfo,
                   compress: str) -> None:
    count, h, w = data.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": count, "dtype": data.dtype.name,
               "crs": info.crs, "transform": transform, "nodata": info.nodata}
    if compress and compress != "none":
        profile["compress"] = compress
        if data.dtype.itemsize > 1 or compress in ("deflate", "lzw", "zstd"):
            profile["predictor"] = 2 if np.issubdtype(data.dtype, np.integer) else 3
    if w % 16 == 0 and h % 16 == 0 and w >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if info.nodata is None and not valid.all():
            dst.write_mask(valid.astype(np.uint8) * 255)


def chip(imagery: Sequence[str], labels: str, out_dir: str | os.PathLike[str], config: ChipConfig | None = None, *,
         layer: str | None = None, class_field: str | None = None, bands: Sequence[int] | None = None,
         nodata: float | None = None, preview: int = 0, overwrite: bool = False) -> ChipReport:
    """Cut georeferenced chips and a COCO ``annotations.json`` from rasters and labels (``geonet chip``).

    Args:
        imagery: raster files, folders or globs (:func:`geonet.raster.find_rasters`).
        labels: vector labels, any OGR format and CRS; ``layer`` and ``class_field`` as in
            :func:`geonet.labels.read_labels`.
        out_dir: the output folder (see :func:`write_chips`).
        config: chipping options (default :class:`ChipConfig`).
        bands, nodata: bands to read (1-based) and a nodata value overriding the files'.
        preview: preview PNGs to write.
        overwrite: replace a non-empty ``out_dir``.

    Raises:
        InputError: bad options, inputs or output folder (before anything is written).
        RunError: a raster fails to decode.
    """
    config = config or ChipConfig()
    config.validate()
    check_output_dir(out_dir, overwrite=overwrite)
    infos = [describe_raster(p, bands=bands, nodata=nodata) for p in find_rasters(imagery)]
    lab = read_labels(labels, layer=layer, class_field=class_field)
    plan = plan_chips(infos, LabelIndex(lab, point_size=config.point_size), config)
    return write_chips(plan, out_dir, config, preview=preview, overwrite=overwrite)
