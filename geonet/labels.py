"""Reading vector labels and turning them into pixel boxes, once, through a spatial index.

Labels come from any OGR vector source (Shapefile, GeoJSON, GeoPackage with ``layer``...) in any
CRS. :func:`read_labels` reads them once, repairs invalid geometries with ``shapely.make_valid``,
drops empty ones (counted) and maps class names to contiguous ids ``1..K`` (id 0 is background,
as in torchvision's detection models). :class:`LabelIndex` reprojects them to each raster CRS
it meets (once per CRS) and answers "which labels touch this raster" with an STR-tree;
:func:`raster_boxes` then gives their pixel-frame envelopes, and :func:`label_window` applies the
chip-edge rule to one window.

**Box rule at a window edge** (used by chipping, on-the-fly training windows and nothing else):
a box is clipped to the window (and to the raster). If the clipped part keeps at least
``min_visible`` of the box's area, the clipped box is a training target. Otherwise the clipped
part becomes an *ignore region*: anchors that fall mostly inside it are neither positives nor
negatives during training, and detections on it are neither true nor false positives in
evaluation (COCO ``iscrowd=1`` semantics). A sliver of an object is therefore never taught as
background, nor as a whole object.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyogrio
import shapely
from pyproj import CRS

from geonet.errors import InputError
from geonet.georef import geometries_to_pixel, to_crs
from geonet.raster import RasterInfo

log = logging.getLogger(__name__)

#: Boxes narrower or lower than this many pixels are not objects (slivers of a label, or of a chip edge):
#: they are dropped and counted, never trained on.
MIN_SIDE_PX = 1.0

__all__ = ["MIN_SIDE_PX", "LabelSet", "LabelIndex", "RasterBoxes", "WindowLabels", "read_labels", "label_window", "raster_boxes"]


@dataclass
class LabelSet:
    """Labels read from one vector file.

    Attributes:
        path: source file.
        crs: the labels' CRS (WKT).
        geometries: ``[N]`` shapely geometries in ``crs``, all valid and non-empty.
        class_ids: ``[N]`` int64 class ids in ``1..K``.
        classes: class names; ``classes[i]`` has id ``i + 1``.
        n_read: features read from the file.
        n_empty: features dropped because their geometry was missing or empty.
        n_repaired: invalid geometries repaired with ``make_valid``.
        n_dropped_invalid: invalid geometries that could not be repaired into an area, line or point.
    """

    path: str
    crs: str
    geometries: np.ndarray
    class_ids: np.ndarray
    classes: list[str]
    n_read: int = 0
    n_empty: int = 0
    n_repaired: int = 0
    n_dropped_invalid: int = 0
    is_point: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __len__(self) -> int:
        return len(self.geometries)


def read_labels(path: str | os.PathLike[str], *, layer: str | int | None = None, class_field: str | None = None,
                classes: Sequence[str] | None = None) -> LabelSet:
    """Read a vector label file.

    Args:
        path: any OGR vector source (``.shp``, ``.geojson``, ``.gpkg``...).
        layer: layer name or index for multi-layer sources (GeoPackage).
        class_field: attribute holding the class name; default: one class named after the file.
        classes: fixed class list (e.g. from a checkpoint); names absent from it are an error.
            Default: the sorted distinct values of ``class_field``.

    Returns:
        A :class:`LabelSet`.

    Raises:
        InputError: missing or unreadable file, unknown layer or class field, no CRS, no usable
            geometry, or a class not in ``classes``.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("--labels: no such file.", path=path, fix="check the path.")
    try:
        layers = pyogrio.list_layers(p)
    except Exception as exc:  # pyogrio raises DataSourceError and friends
        raise InputError(f"is not a vector file OGR can read ({' '.join(str(exc).split())[:160]}).", path=path,
                         fix="pass a Shapefile, GeoJSON or GeoPackage as --labels.") from None
    if layer is not None:
        names = [str(n) for n in layers[:, 0]]
        if isinstance(layer, str) and layer not in names and not layer.isdigit():
            raise InputError(f"--layer {layer!r} is not in the file (layers: {', '.join(names)}).", path=path,
                             fix="pick one of the listed layers.")
        if isinstance(layer, str) and layer.isdigit():
            layer = int(layer)
    elif len(layers) > 1:
        log.warning("%s has %d layers; reading the first (%s). Use --layer to choose.", p, len(layers), layers[0, 0])
    try:
        info = pyogrio.read_info(p, layer=layer)
    except Exception as exc:
        raise InputError(f"cannot read its layer ({' '.join(str(exc).split())[:160]}).", path=path,
                         fix="check --layer.") from None
    fields = [str(f) for f in info["fields"]]
    if class_field is not None and class_field not in fields:
        raise InputError(f"--class-field {class_field!r} is not a field of the labels (fields: "
                         f"{', '.join(fields) or 'none'}).", path=path, fix="pick one of the listed fields.")
    if info["features"] == 0:
        raise InputError("the label file holds no features.", path=path,
                         fix="check that you passed the right file, or that the export did not fail.")
    if info["crs"] is None:
        raise InputError("the labels have no CRS, so they cannot be placed on the imagery.", path=path,
                         fix="assign the CRS they were digitised in, e.g. `ogr2ogr -a_srs EPSG:4326 fixed.gpkg "
                             f"{p.name}` (or save a .prj beside a Shapefile).")
    try:
        df = pyogrio.read_dataframe(p, layer=layer, columns=[class_field] if class_field else [],
                                    use_arrow=False)
    except Exception as exc:
        raise InputError(f"cannot read features ({' '.join(str(exc).split())[:160]}).", path=path,
                         fix="open it in QGIS and re-export it.") from None
    geoms = np.asarray(df.geometry.values, dtype=object)
    n_read = len(geoms)
    empty = shapely.is_missing(geoms) | shapely.is_empty(geoms)
    n_empty = int(empty.sum())
    invalid = ~empty & ~shapely.is_valid(geoms)
    n_repaired = 0
    n_bad = 0
    if invalid.any():
        repaired = shapely.make_valid(geoms[invalid])
        # make_valid of a polygon may return a collection with stray lines/points: keep the areal part
        repaired = np.array([_areal_part(g) for g in repaired], dtype=object)
        ok = ~(shapely.is_missing(repaired) | shapely.is_empty(repaired))
        geoms[invalid] = repaired
        n_repaired = int(ok.sum())
        n_bad = int((~ok).sum())
        invalid_idx = np.flatnonzero(invalid)
        empty[invalid_idx[~ok]] = True
    keep = ~empty
    geoms = geoms[keep]
    if class_field:
        names = df[class_field].astype("string").fillna("").to_numpy()[keep]
        names = np.array([str(n).strip() for n in names], dtype=object)
        if (names == "").any():
            n_missing = int((names == "").sum())
            raise InputError(f"{n_missing} feature(s) have no value in --class-field {class_field!r}.", path=path,
                             fix="fill the field, or drop those features.")
    else:
        names = np.full(len(geoms), p.stem, dtype=object)
    if classes is None:
        class_list = sorted(set(names.tolist()))
    else:
        class_list = list(classes)
        unknown = sorted(set(names.tolist()) - set(class_list))
        if unknown:
            raise InputError(f"classes {unknown} are not among the model's classes {class_list}.", path=path,
                             fix="use --class-field/--class-map so the names match.")
    lookup = {n: i + 1 for i, n in enumerate(class_list)}
    class_ids = np.array([lookup[n] for n in names], dtype=np.int64)
    if len(geoms) == 0:
        raise InputError(f"none of the {n_read} features has a usable geometry ({n_empty} empty or "
                         "unrepairable).", path=path, fix="check the file in QGIS.")
    if n_empty:
        log.warning("%s: dropped %d feature(s) with empty or unrepairable geometry", p, n_empty)
    if n_repaired:
        log.info("%s: repaired %d invalid geometr%s with make_valid", p, n_repaired, "y" if n_repaired == 1 else "ies")
    gtypes = shapely.get_type_id(geoms)
    is_point = (gtypes == shapely.GeometryType.POINT) | (gtypes == shapely.GeometryType.MULTIPOINT)
    is_line = np.isin(gtypes, [shapely.GeometryType.LINESTRING, shapely.GeometryType.LINEARRING,
                               shapely.GeometryType.MULTILINESTRING])
    if is_line.any():
        raise InputError(f"{int(is_line.sum())} of the {len(geoms)} labels are lines, which have no box (a line's "
                         "envelope is a sliver).", path=path,
                         fix="digitise the objects as polygons (or points with --point-size), or buffer the lines "
                             "into polygons first (QGIS: Vector > Geoprocessing Tools > Buffer).")
    return LabelSet(path=str(p), crs=CRS.from_user_input(info["crs"]).to_wkt(), geometries=geoms,
                    class_ids=class_ids, classes=class_list, n_read=n_read, n_empty=n_empty,
                    n_repaired=n_repaired, n_dropped_invalid=n_bad, is_point=is_point)


def _areal_part(geom):
    """The polygonal part of a ``make_valid`` result, or the geometry itself when it has none."""
    if geom is None or geom.is_empty:
        return geom
    if geom.geom_type == "GeometryCollection":
        polys = [g for g in geom.geoms if g.geom_type in ("Polygon", "MultiPolygon")]
        if polys:
            return shapely.union_all(polys)
        return shapely.union_all(list(geom.geoms))
    return geom


@dataclass
class RasterBoxes:
    """The labels that touch one raster, as pixel-frame boxes (see :mod:`geonet.georef`).

    Attributes:
        boxes: float64 ``[N, 4]`` ``[x1, y1, x2, y2]`` in the raster's pixel frame (may extend past
            the raster's edges).
        class_ids: int64 ``[N]`` in ``1..K``.
        label_idx: int64 ``[N]``, index of each box's feature in the :class:`LabelSet`.
        n_degenerate: labels dropped because their box is under :data:`MIN_SIDE_PX` wide or high.
    """

    boxes: np.ndarray
    class_ids: np.ndarray
    label_idx: np.ndarray
    n_degenerate: int = 0
    _tree: shapely.STRtree | None = field(default=None, repr=False)

    @property
    def tree(self) -> shapely.STRtree:
        if self._tree is None:
            self._tree = shapely.STRtree(shapely.box(*self.boxes.T) if len(self.boxes) else np.array([], object))
        return self._tree

    def query(self, x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
        """Indexes of the boxes that overlap ``[x1, y1, x2, y2]`` with positive area."""
        if len(self.boxes) == 0:
            return np.zeros(0, dtype=np.int64)
        idx = self.tree.query(shapely.box(x1, y1, x2, y2))
        b = self.boxes[idx]
        ok = (np.minimum(b[:, 2], x2) > np.maximum(b[:, 0], x1)) & (np.minimum(b[:, 3], y2) > np.maximum(b[:, 1], y1))
        return np.sort(idx[ok])


class LabelIndex:
    """A :class:`LabelSet` reprojected once per raster CRS and indexed with an STR-tree.

    Args:
        labels: the labels.
        point_size: side in metres of the square box given to point labels (required when there are any).

    Raises:
        InputError: point labels without ``point_size``.
    """

    def __init__(self, labels: LabelSet, *, point_size: float | None = None):
        if point_size is None and len(labels.is_point) and labels.is_point.any():
            raise InputError(f"{int(labels.is_point.sum())} of the {len(labels)} labels are points, which have no "
                             "size.", path=labels.path,
                             fix="pass --point-size METRES (the typical object width) to give each point a square "
                                 "box, or label the objects as polygons.")
        self.labels = labels
        self.point_size = None if point_size is None else float(point_size)
        self._by_crs: dict[str, tuple[np.ndarray, shapely.STRtree]] = {}

    def _in_crs(self, crs_wkt: str) -> tuple[np.ndarray, shapely.STRtree]:
        if crs_wkt not in self._by_crs:
            geoms = to_crs(self.labels.geometries, self.labels.crs, crs_wkt)
            self._by_crs[crs_wkt] = (geoms, shapely.STRtree(geoms))
        return self._by_crs[crs_wkt]

    def for_raster(self, info: RasterInfo) -> RasterBoxes:
        """Pixel boxes of the labels that touch ``info``'s footprint (see :func:`raster_boxes`)."""
        return raster_boxes(self, info)


def raster_boxes(index: LabelIndex, info: RasterInfo) -> RasterBoxes:
    """Pixel-frame boxes of the labels that intersect a raster.

    Each geometry is reprojected to the raster CRS, mapped vertex by vertex to the pixel frame
    through ``~transform``, and replaced by its envelope there. Points become squares of
    ``index.point_size`` metres.

    Raises:
        InputError: the raster has no CRS.
    """
    if info.crs is None:
        raise InputError("the raster has no CRS, so labels cannot be placed on it.", path=info.path,
                         fix="assign one with `gdal_edit.py -a_srs EPSG:XXXX` (or pass a georeferenced copy).")
    geoms, tree = index._in_crs(info.crs)
    hits = np.sort(tree.query(info.footprint(), predicate="intersects"))
    if len(hits) == 0:
        return RasterBoxes(np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, np.int64))
    px = geometries_to_pixel(geoms[hits], info.transform)
    boxes = shapely.bounds(px)  # [N, 4] xmin, ymin, xmax, ymax in pixels
    pts = index.labels.is_point[hits] if len(index.labels.is_point) else np.zeros(len(hits), bool)
    if pts.any():
        gx, gy = info.gsd or (1.0, 1.0)
        hw = 0.5 * index.point_size / gx
        hh = 0.5 * index.point_size / gy
        cx = (boxes[pts, 0] + boxes[pts, 2]) / 2
        cy = (boxes[pts, 1] + boxes[pts, 3]) / 2
        boxes[pts] = np.column_stack([cx - hw, cy - hh, cx + hw, cy + hh])
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    ok = (w >= MIN_SIDE_PX) & (h >= MIN_SIDE_PX) & np.isfinite(boxes).all(axis=1)
    n_deg = int((~ok).sum())
    return RasterBoxes(boxes=boxes[ok], class_ids=index.labels.class_ids[hits][ok], label_idx=hits[ok],
                       n_degenerate=n_deg)


@dataclass
class WindowLabels:
    """Targets of one window, in the window's own pixel frame.

    Attributes:
        boxes: float64 ``[N, 4]`` clipped target boxes ``[x1, y1, x2, y2]``.
        class_ids: int64 ``[N]``.
        label_idx: int64 ``[N]`` feature index of each target in the :class:`LabelSet`.
        ignore: float64 ``[M, 4]`` ignore regions (clipped parts of boxes below ``min_visible``).
        ignore_class_ids: int64 ``[M]``.
        n_slivers: visible parts kept by the ``min_visible`` rule but under :data:`MIN_SIDE_PX` on a side,
            dropped.
    """

    boxes: np.ndarray
    class_ids: np.ndarray
    label_idx: np.ndarray
    ignore: np.ndarray
    ignore_class_ids: np.ndarray
    n_slivers: int = 0

    @property
    def is_negative(self) -> bool:
        return len(self.boxes) == 0


def label_window(rb: RasterBoxes, col_off: float, row_off: float, width: float, height: float, *,
                 clip: tuple[float, float, float, float], min_visible: float = 0.5) -> WindowLabels:
    """Apply the chip-edge rule (module docstring) to one window.

    Args:
        rb: the raster's boxes.
        col_off, row_off, width, height: the window in the raster's pixel frame; it may extend past
            the raster (padding).
        clip: ``(x1, y1, x2, y2)`` in the raster's pixel frame that the window may show: the raster
            itself, or the split block the window lies in. Boxes are clipped to it too, and what
            lies outside it counts as not visible.
        min_visible: minimum visible fraction of a box's area for it to stay a target.

    Returns:
        A :class:`WindowLabels` in window coordinates (``x - col_off``, ``y - row_off``).
    """
    x1 = max(col_off, clip[0])
    y1 = max(row_off, clip[1])
    x2 = min(col_off + width, clip[2])
    y2 = min(row_off + height, clip[3])
    idx = rb.query(x1, y1, x2, y2)
    b = rb.boxes[idx]
    clipped = np.column_stack([np.maximum(b[:, 0], x1), np.maximum(b[:, 1], y1),
                               np.minimum(b[:, 2], x2), np.minimum(b[:, 3], y2)]) if len(idx) else np.zeros((0, 4))
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    vis_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = vis_area >= min_visible * area - 1e-9
    sliver = keep & ((clipped[:, 2] - clipped[:, 0] < MIN_SIDE_PX) | (clipped[:, 3] - clipped[:, 1] < MIN_SIDE_PX))
    target = keep & ~sliver
    offset = np.array([col_off, row_off, col_off, row_off])
    return WindowLabels(
        boxes=clipped[target] - offset,
        class_ids=rb.class_ids[idx][target],
        label_idx=rb.label_idx[idx][target],
        ignore=clipped[~keep] - offset,
        ignore_class_ids=rb.class_ids[idx][~keep],
        n_slivers=int(sliver.sum()),
    )
