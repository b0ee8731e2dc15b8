"""Pre-flight report on imagery and labels (``geonet check``): read headers and labels, no pixels.

For each raster: CRS, GSD in metres, size, bands, dtype, nodata and the labels that fall on it.
Overall: labels that fall on no raster, and box size statistics in pixels and metres. Missing or
suspicious CRSs come with the command that fixes them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from geonet.errors import GeonetError
from geonet.labels import LabelIndex, LabelSet, read_labels
from geonet.raster import RasterInfo, describe_raster, find_rasters

log = logging.getLogger(__name__)

__all__ = ["CheckReport", "RasterCheck", "check", "check_inputs", "box_size_stats"]

_PCTS = (0, 5, 50, 95, 100)


@dataclass
class RasterCheck:
    """One raster's line in the report. ``error`` is set when the raster could not be read."""

    path: str
    crs: str | None = None
    gsd_m: tuple[float, float] | None = None
    width: int = 0
    height: int = 0
    bands: tuple[int, ...] = ()
    dtype: str = ""
    nodata: float | None = None
    labels_inside: int = 0
    problem: str | None = None
    error: str | None = None


@dataclass
class CheckReport:
    """Result of :func:`check_inputs`.

    Attributes:
        rasters: one :class:`RasterCheck` per raster.
        labels_path, labels_crs, labels_total, classes: about the label file.
        labels_empty, labels_repaired: geometries dropped as empty, and repaired by make_valid.
        labels_outside: labels that fall on no raster.
        box_px, box_m: percentiles (0, 5, 50, 95, 100) of box width, height and sqrt(area), in
            pixels (over every raster a label falls on) and in metres (each label once):
            ``{"width": [...], "height": [...], "side": [...]}``.
        per_class: label count per class inside the imagery.
        problems: one line per problem found, each with its fix.
    """

    rasters: list[RasterCheck] = field(default_factory=list)
    labels_path: str | None = None
    labels_crs: str | None = None
    labels_total: int = 0
    labels_empty: int = 0
    labels_repaired: int = 0
    labels_outside: int = 0
    classes: list[str] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)
    box_px: dict[str, list[float]] = field(default_factory=dict)
    box_m: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def box_size_stats(wh: np.ndarray) -> dict[str, list[float]]:
    """Percentiles (0, 5, 50, 95, 100) of width, height and sqrt(area) of ``[N, 2]`` sizes."""
    if len(wh) == 0:
        return {}
    side = np.sqrt(wh[:, 0] * wh[:, 1])
    return {name: [round(float(v), 2) for v in np.percentile(col, _PCTS)]
            for name, col in (("width", wh[:, 0]), ("height", wh[:, 1]), ("side", side))}


def check_inputs(rasters: Sequence[str], labels: LabelSet | None, *, bands=None, nodata=None,
                 point_size: float | None = None) -> CheckReport:
    """Build the pre-flight report.

    Rasters that cannot be read, and rasters without a CRS, are reported rather than raised, so one
    bad file does not hide the state of the others.

    Args:
        rasters: raster paths (see :func:`geonet.raster.find_rasters`).
        labels: labels from :func:`geonet.labels.read_labels`, or ``None``.
        bands, nodata, point_size: as for chipping.
    """
    rep = CheckReport()
    infos: list[RasterInfo] = []
    for path in rasters:
        rc = RasterCheck(path=str(path))
        try:
            info = describe_raster(path, bands=bands, nodata=nodata)
        except GeonetError as exc:
            rc.error = str(exc)
            rep.problems.append(str(exc))
            rep.rasters.append(rc)
            continue
        rc.crs = (f"EPSG:{info.epsg}" if info.epsg else (info.crs[:60] + "...")) if info.crs else None
        rc.gsd_m = None if info.gsd is None else (round(info.gsd[0], 4), round(info.gsd[1], 4))
        rc.width, rc.height, rc.bands, rc.dtype, rc.nodata = info.width, info.height, info.bands, info.dtype, info.nodata
        if info.crs is None:
            rc.problem = ("no CRS: labels cannot be placed on it. Fix: `gdal_edit.py -a_srs EPSG:XXXX "
                          f"{path}` with the CRS it was produced in.")
        elif info.crs_warning:
            rc.problem = info.crs_warning
        if rc.problem is None:
            rc.problem = _probe_blocks(info)
        if rc.problem:
            rep.problems.append(f"{path}: {rc.problem}")
        infos.append(info)
        rep.rasters.append(rc)
    if labels is None:
        return rep
    rep.labels_path = labels.path
    rep.labels_crs = labels.crs if len(labels.crs) < 80 else _short_crs(labels.crs)
    rep.labels_total = len(labels)
    rep.labels_empty = labels.n_empty
    rep.labels_repaired = labels.n_repaired
    rep.classes = list(labels.classes)
    index = LabelIndex(labels, point_size=point_size)
    inside: set[int] = set()
    wh_px, wh_m, cls = [], [], []
    by_path = {rc.path: rc for rc in rep.rasters}
    for info in infos:
        if info.crs is None:
            continue
        rb = index.for_raster(info)
        by_path[str(info.path)].labels_inside = len(rb.boxes)
        # pixels: every (raster, label) pair, as the detector sees it; metres and classes: each label once
        wh = np.column_stack([rb.boxes[:, 2] - rb.boxes[:, 0], rb.boxes[:, 3] - rb.boxes[:, 1]])
        wh_px.append(wh)
        new = [k for k, j in enumerate(rb.label_idx.tolist()) if j not in inside]
        inside.update(rb.label_idx.tolist())
        if new:
            wh_m.append(wh[new] * np.array(info.gsd))
            cls.append(rb.class_ids[new])
    rep.labels_outside = len(labels) - len(inside)
    if wh_m:
        rep.box_px = box_size_stats(np.concatenate(wh_px))
        rep.box_m = box_size_stats(np.concatenate(wh_m))
        ids, counts = np.unique(np.concatenate(cls), return_counts=True)
        rep.per_class = {labels.classes[i - 1]: int(c) for i, c in zip(ids, counts)}
    if rep.labels_outside == len(labels):
        rep.problems.append(
            f"{labels.path}: none of the {len(labels)} labels falls on the imagery. Fix: check that labels and "
            "imagery cover the same area; if the labels sit in the wrong place, their CRS is probably wrong "
            "(reassign it with `ogr2ogr -a_srs EPSG:XXXX`).")
    elif rep.labels_outside:
        log.info("%d of %d labels fall on no raster", rep.labels_outside, len(labels))
    return rep


def _probe_blocks(info: RasterInfo) -> str | None:
    """Read the first, a middle and the last block of the selected bands; a problem line when GDAL fails
    (a truncated or corrupt file whose header still reads)."""
    from rasterio.windows import Window

    from geonet.raster import RasterSource

    bh, bw = info.block_shape
    rows, cols = -(-info.height // bh), -(-info.width // bw)
    src = RasterSource(info)
    try:
        for r, c in {(0, 0), (rows // 2, cols // 2), (rows - 1, cols - 1)}:
            src.read(Window(c * bw, r * bh, min(bw, info.width - c * bw), min(bh, info.height - r * bh)))
    except GeonetError as exc:
        return f"{str(exc).split(': ', 1)[-1]}"
    finally:
        src.close()
    return None


def _short_crs(wkt: str) -> str:
    from pyproj import CRS

    crs = CRS.from_user_input(wkt)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.name


def check(imagery: Sequence[str], labels: str | None = None, *, layer: str | None = None,
          class_field: str | None = None, bands=None, nodata=None, point_size: float | None = None) -> CheckReport:
    """The pre-flight report of ``geonet check`` for raster files, folders or globs and an optional label file.


    Raises:
        InputError: no raster found, or an unreadable label file.
    """
    paths = find_rasters(imagery)
    lab = read_labels(labels, layer=layer, class_field=class_field) if labels else None
    return check_inputs([str(p) for p in paths], lab, bands=bands, nodata=nodata, point_size=point_size)
