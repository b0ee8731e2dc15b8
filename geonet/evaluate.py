"""Evaluation: COCO-style AP in map space against vector ground truth (``geonet evaluate``).

Predictions (any vector file geonet writes, or any OGR file with a score field) and ground truth
(any OGR file, any CRS) are compared as their envelopes (axis-aligned boxes in metres) in a metric
CRS: the local WGS 84 / UTM zone of each object (the zone of its centre), unless ``crs`` names one
CRS for everything. Sites far apart (NEON plots span UTM zones 11 to 18) are each measured in their
own zone -- one common zone would rotate distant boxes by the grid convergence (14 degrees 20
degrees of longitude away at 45 N) and inflate their envelopes -- and boxes of different zones are
never compared with each other.

* **AOI.** Only ground truth whose centre lies inside the area of interest counts, and only
  predictions whose centre lies inside it are scored. Default AOI: the footprint of the imagery the
  predictions came from (read from the prediction file's geonet metadata), else the truth's extent.
* **Metrics** come from pycocotools' ``COCOeval`` (:func:`geonet.metrics.coco_metrics`): AP@[.5:.95],
  AP50, AP75, AR@100, per class, and AP per size bin in square metres (default small < 10 m²,
  medium < 100 m², large). COCOeval's matching loops over detections x truths in Python, so the
  scene is split into independent "images": connected groups of boxes (a prediction and a truth are
  linked when they intersect) packed into images of at most 10 predictions. Boxes in different
  images never overlap, so no match is lost and AP is the same as for one image holding everything
  (tested); AR@100 is then the recall over all predictions. 10,000 predictions against 10,000 truths
  take 3.5 s here; in images of 100 predictions, 14 s (COCOeval's loop is detections x truths).
* **Operating point.** At one IoU (``iou``, default 0.5; DeepForest's NEON benchmark uses 0.4) and one
  score threshold (default: the score that maximises F1), precision, recall, F1 and the TP/FP/FN
  counts, from COCOeval's own greedy matching.

Outputs in ``out_dir``: ``report.json``, ``report.md``, ``pr_<class>.png`` (precision-recall curve
per class at ``iou``) and ``inspection.gpkg`` with layers ``tp``, ``fp`` and ``fn`` (in the metric CRS,
or in EPSG:4326 when objects span several UTM zones) to inspect in QGIS.

A COCO pair (ground truth ``annotations.json`` of chips + a COCO results list of detections) is
evaluated in pixel space with the same code (:func:`evaluate_coco`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyogrio
import shapely
import torch
from pyproj import CRS

from geonet.atomic import atomic_dir, check_output_dir
from geonet.boxes import STACK_IOU, connected_components, near_duplicate_pairs, pair_iou
from geonet.errors import InputError
from geonet.georef import to_crs
from geonet.labels import read_labels
from geonet.metrics import COCO_AREA_BINS, coco_annotations, coco_detections, coco_metrics, operating_point

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "evaluate", "evaluate_coco", "evaluate_model", "evaluate_files", "ClassMismatch",
           "operating_point", "group_images"]

#: Predictions packed into one COCO image (see the module docstring).
IMAGE_MAX_PREDICTIONS = 10


class ClassMismatch(InputError):
    """Prediction and truth class names do not match; ``table`` lists both sides."""

    def __init__(self, message, *, table: str, **kw):
        super().__init__(message, **kw)
        self.table = table


@dataclass
class EvalConfig:
    """Options of ``geonet evaluate``.

    Attributes:
        iou: IoU of the precision/recall/F1 operating point (DeepForest's NEON benchmark uses 0.4).
        score_thresh: score threshold of the operating point (default: the one maximising F1).
        score_source: how ``score_thresh`` was chosen, for the report (``"given"``).
        area_bins: upper bounds in square metres of the small and medium size bins.
        crs: one metric CRS to compare in (default: each object's local UTM zone).
        class_field, layer: of the truth file.
        score_field, pred_class_field: of the prediction files.
        class_map: predicted class name -> truth class name.
        aoi: polygons of the area of interest (default: the predictions' imagery footprint, else the
            truth extent).
    """

    iou: float = 0.5
    score_thresh: float | None = None
    score_source: str = "given"
    area_bins: tuple[float, float] = (10.0, 100.0)
    crs: str | None = None
    class_field: str | None = None
    layer: str | None = None
    score_field: str = "score"
    pred_class_field: str = "label"
    class_map: dict[str, str] = field(default_factory=dict)
    aoi: str | None = None

    def validate(self) -> None:
        if not 0 < self.iou < 1:
            raise InputError(f"--iou must be in (0, 1), got {self.iou}.", fix="e.g. --iou 0.5 (or 0.4).")
        lo, hi = self.area_bins
        if not 0 < lo < hi:
            raise InputError(f"--area-bins {lo:g},{hi:g}: need 0 < small < medium (square metres).",
                             fix=f"e.g. --area-bins {min(lo, hi):g},{max(lo, hi):g}." if lo > 0 and hi > 0 and lo != hi
                             else "e.g. --area-bins 10,100.")
        if self.score_thresh is not None and not 0 <= self.score_thresh <= 1:
            raise InputError(f"--score-thresh must be in [0, 1], got {self.score_thresh}.", fix="e.g. --score-thresh 0.3.")


def parse_class_map(items: Sequence[str]) -> dict[str, str]:
    """``["pool=swimming pool", ...]`` -> ``{"pool": "swimming pool"}`` (prediction name -> truth name)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--class-map {item!r}: use PREDICTED=TRUTH, e.g. --class-map Tree=trees.")
        a, b = item.split("=", 1)
        out[a.strip()] = b.strip()
    return out


# ----------------------------------------------------------------------------- reading


@dataclass
class _Layer:
    boxes: np.ndarray  # [N, 4] xmin, ymin, xmax, ymax in metres, in each object's metric CRS
    zones: np.ndarray  # [N] metric CRS of each object ("EPSG:n" or the --crs text)
    ll: np.ndarray  # [N, 2] lon/lat of each object's centre
    names: np.ndarray  # [N] class names
    scores: np.ndarray  # [N] (1 for truth)

    @staticmethod
    def empty() -> _Layer:
        return _Layer(np.zeros((0, 4)), np.zeros(0, object), np.zeros((0, 2)), np.zeros(0, object), np.zeros(0))

    @staticmethod
    def cat(parts: list[_Layer]) -> _Layer:
        if not parts:
            return _Layer.empty()
        return _Layer(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("boxes", "zones", "ll", "names",
                                                                                  "scores")))


def _utm_zone(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """``"EPSG:326zz"`` / ``"EPSG:327zz"``: the WGS 84 / UTM zone of each lon/lat (standard 6-degree zones)."""
    zone = (np.floor((np.asarray(lon) + 180.0) / 6.0).astype(int) % 60) + 1
    base = np.where(np.asarray(lat) >= 0, 32600, 32700)
    return np.array([f"EPSG:{b + z}" for b, z in zip(base, zone)], dtype=object)


def _to_metric(geoms: np.ndarray, crs, fixed: CRS | None) -> _Layer:
    """Envelopes in metres of ``geoms`` (in ``crs``), each in its local UTM zone or in ``fixed``."""
    g = np.asarray(geoms, dtype=object)
    ok = ~(shapely.is_missing(g) | shapely.is_empty(g))
    g = g[ok]
    ll = shapely.get_coordinates(to_crs(shapely.centroid(g), crs, "EPSG:4326")).reshape(-1, 2)
    zones = np.full(len(g), fixed.to_string(), dtype=object) if fixed is not None else _utm_zone(ll[:, 0], ll[:, 1])
    boxes = np.zeros((len(g), 4))
    for z in np.unique(zones):
        sel = zones == z
        boxes[sel] = shapely.bounds(to_crs(g[sel], crs, z))
    layer = _Layer(boxes, zones, ll, np.zeros(len(g), object), np.ones(len(g)))
    layer.ok = ok  # type: ignore[attr-defined]
    return layer


def _read_predictions(paths: Sequence[str], cfg: EvalConfig, fixed: CRS | None) -> tuple[_Layer, list]:
    parts, footprints = [], []
    for p in paths:
        if not Path(p).exists():
            raise InputError("no such predictions file.", path=p, fix="check the path.")
        try:
            info, frame = _vector_info(p)
        except Exception as exc:
            raise InputError(f"is not a vector file OGR can read ({' '.join(str(exc).split())[:120]}).", path=p,
                             fix="pass the output of `geonet detect` or another OGR file with a score field.") from None
        fields = [str(f) for f in info["fields"]]
        meta = _geonet_metadata(p, info)
        footprints.extend(_scene_footprints(meta))
        if meta and float(meta.get("score_thresh") or 0) > 0.05 + 1e-9:
            log.warning("%s holds detections with score >= %.3f only: AP is a lower bound. For the whole "
                        "precision-recall curve, detect with --score-thresh 0.05.", p, float(meta["score_thresh"]))
        if info["features"] == 0:  # an empty GeoJSON carries no field names at all
            continue
        if cfg.score_field not in fields:
            raise InputError(f"has no score field {cfg.score_field!r} (fields: {', '.join(fields) or 'none'}).",
                             path=p, fix="pass --score-field with the field that holds detection scores.")
        if info["crs"] is None:
            raise InputError("the predictions have no CRS.", path=p, fix="assign one with ogr2ogr -a_srs.")
        cols = [cfg.score_field] + ([cfg.pred_class_field] if cfg.pred_class_field in fields else [])
        df = frame if frame is not None else pyogrio.read_dataframe(p, columns=cols)
        layer = _to_metric(df.geometry.values, info["crs"], fixed)
        ok = layer.ok
        layer.names = (df[cfg.pred_class_field].astype(str).to_numpy()[ok] if cfg.pred_class_field in fields
                       else np.full(int(ok.sum()), "object", dtype=object))
        layer.scores = _scores(df[cfg.score_field], p, cfg.score_field)[ok]
        parts.append(layer)
    return _Layer.cat(parts), footprints


def _vector_info(path):
    """``(pyogrio.read_info-like dict, GeoDataFrame or None)``; GeoParquet is read with geopandas (the GDAL
    here has no Parquet driver), everything else with OGR."""
    if str(path).lower().endswith(".parquet"):
        import geopandas as gpd
        import pyarrow.parquet as pq

        df = gpd.read_parquet(path)
        meta = (pq.read_schema(path).metadata or {}).get(b"geonet")
        info = {"fields": [c for c in df.columns if c != df.geometry.name], "features": len(df),
                "crs": df.crs.to_wkt() if df.crs is not None else None,
                "layer_metadata": {"geonet": meta.decode()} if meta else {}}
        return info, df
    return pyogrio.read_info(path), None


def _scores(col, path, field: str) -> np.ndarray:
    """The score column as float64 ``[N]`` in [0, 1].

    Raises:
        InputError: a null, non-numeric or out-of-range score, naming the field.
    """
    import pandas as pd

    values = pd.to_numeric(col, errors="coerce")
    bad = values.isna() & ~col.isna()
    if bad.any():
        raise InputError(f"the score field {field!r} holds non-numeric values (e.g. {col[bad].iloc[0]!r}).", path=path,
                         fix="pass --score-field with the field that holds numeric detection scores.")
    if values.isna().any():
        raise InputError(f"the score field {field!r} is empty for {int(values.isna().sum())} of {len(values)} "
                         "features.", path=path, fix="give every prediction a score, or pass --score-field.")
    v = values.to_numpy(dtype=np.float64)
    if (v < 0).any() or (v > 1).any() or not np.isfinite(v).all():
        raise InputError(f"the score field {field!r} holds values outside [0, 1] (min {v.min():g}, max {v.max():g}).",
                         path=path, fix="pass --score-field with the field that holds detection scores in [0, 1].")
    return v


def _geonet_metadata(path, info) -> dict | None:
    """The ``geonet`` provenance metadata of a file geonet wrote (GeoJSON member or GPKG layer metadata)."""
    meta = None
    if str(path).lower().endswith((".geojson", ".json")):
        try:
            with open(path) as f:
                head = f.read(1 << 16)
            start = head.find('"geonet"')
            if start >= 0:
                obj, _ = json.JSONDecoder().raw_decode(head[head.index("{", start):])
                meta = obj
        except (OSError, ValueError):
            meta = None
    elif Path(path).with_suffix(".geonet.json").exists():  # Shapefile and FlatGeobuf sidecar
        try:
            meta = json.loads(Path(path).with_suffix(".geonet.json").read_text())
        except (OSError, ValueError):
            meta = None
    else:
        lm = info.get("layer_metadata") or {}
        if "geonet" in lm:
            try:
                meta = json.loads(lm["geonet"])
            except ValueError:
                meta = None
    return meta if isinstance(meta, dict) else None


def _scene_footprints(meta: dict | None) -> list:
    """Footprint (EPSG:4326) of the scene a geonet output came from, if that raster is readable."""
    if not meta or not meta.get("scene"):
        return []
    try:
        from geonet.raster import describe_raster

        r = describe_raster(meta["scene"])
    except Exception:
        return []
    if r.crs is None:
        return []
    return [r.footprint(crs="EPSG:4326")]


def _fixed_crs(cfg: EvalConfig) -> CRS | None:
    """``--crs`` as a CRS (``None``: each object's local UTM zone)."""
    if not cfg.crs:
        return None
    try:
        crs = CRS.from_user_input(cfg.crs)
    except Exception:
        raise InputError(f"--crs {cfg.crs!r} is not a CRS pyproj knows.", fix="e.g. --crs EPSG:32618.") from None
    if not crs.is_projected:
        raise InputError(f"--crs {cfg.crs}: evaluation needs a projected CRS in metres.", fix="e.g. a UTM zone.")
    return crs


# ----------------------------------------------------------------------------- grouping into images


def group_images(pred_boxes: np.ndarray, truth_boxes: np.ndarray, *, max_predictions: int = IMAGE_MAX_PREDICTIONS
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Assign boxes to COCO "images" so that no two intersecting boxes are in different images.

    Connected components of the intersection graph (prediction-truth and prediction-prediction
    edges) are packed, in order of their x position, into images of at most ``max_predictions``
    predictions (a larger component is one image on its own).

    Returns:
        ``(pred_image_ids, truth_image_ids)``: int arrays, ids from 1.
    """
    n_p = len(pred_boxes)
    allb = np.concatenate([pred_boxes, truth_boxes]).reshape(-1, 4)
    a = b = np.zeros(0, dtype=np.int64)
    if n_p:
        a, b = shapely.STRtree(shapely.box(*allb.T)).query(shapely.box(*allb[:n_p].T), predicate="intersects")
    comps: dict[int, list[int]] = {}
    for i, r in enumerate(connected_components(len(allb), a, b).tolist()):
        comps.setdefault(r, []).append(i)
    order = sorted(comps.values(), key=lambda m: (allb[m, 0].min(), allb[m, 1].min()))
    image = np.zeros(len(allb), dtype=np.int64)
    current, count = 1, 0
    for members in order:
        npred = sum(1 for m in members if m < n_p)
        if count and count + npred > max_predictions:
            current, count = current + 1, 0
        image[members] = current
        count += npred
    return image[:n_p], image[n_p:]


# ----------------------------------------------------------------------------- operating point


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalReport:
    """Result of :func:`evaluate` (also written as ``report.json``)."""

    metrics: dict
    operating: dict
    per_class_operating: dict
    crs: str
    n_predictions: int
    n_truth: int
    aoi: str
    seconds: float
    out_dir: str | None = None
    class_map: dict = field(default_factory=dict)
    area_bins: tuple[float, float] = (10.0, 100.0)  # small < lo <= medium < hi <= large
    area_unit: str = "m²"

    def to_dict(self) -> dict:
        m = {k: v for k, v in self.metrics.items() if k not in ("precision", "_eval")}
        op = {k: v for k, v in self.operating.items() if k != "curve"}
        pco = {c: {k: v for k, v in o.items() if k != "curve"} for c, o in self.per_class_operating.items()}
        return {"metrics": m, "operating_point": op, "per_class_operating_point": pco, "crs": self.crs,
                "n_predictions": self.n_predictions, "n_truth": self.n_truth, "aoi": self.aoi,
                "seconds": self.seconds, "class_map": self.class_map,
                "area_bins": {"small": [0, self.area_bins[0]], "medium": list(self.area_bins),
                              "large": [self.area_bins[1], None], "unit": self.area_unit}}


def _reconcile_classes(pred_names: np.ndarray, truth_classes: list[str], cfg: EvalConfig) -> tuple[np.ndarray, dict]:
    mapping = dict(cfg.class_map)
    names = np.array([mapping.get(n, n) for n in pred_names.tolist()], dtype=object)
    pset = sorted(set(names.tolist()))
    if len(truth_classes) == 1 and len(pset) == 1 and pset[0] != truth_classes[0] and not cfg.class_map:
        log.info("one predicted class (%s) and one truth class (%s): matched", pset[0], truth_classes[0])
        mapping[pset[0]] = truth_classes[0]
        names = np.full(len(names), truth_classes[0], dtype=object)
        pset = [truth_classes[0]]
    unknown = [n for n in pset if n not in truth_classes]
    if unknown:
        width = max([len(x) for x in pset + truth_classes] + [9])
        rows = [f"  {'predicted':<{width}}  {'truth':<{width}}"]
        for k in range(max(len(pset), len(truth_classes))):
            a = pset[k] if k < len(pset) else ""
            b = truth_classes[k] if k < len(truth_classes) else ""
            rows.append(f"  {a:<{width}}  {b:<{width}}")
        table = "\n".join(rows)
        raise ClassMismatch(f"predicted classes {unknown} are not truth classes {truth_classes}.", table=table,
                            fix=f"map them, e.g. --class-map '{unknown[0]}={truth_classes[0]}' (repeat per class), "
                                "or pass --class-field for the truth.")
    return names, mapping


def _extent_ll(ll: np.ndarray) -> str:
    """Lon/lat extent of object centres ``[N, 2]``, for messages."""
    if len(ll) == 0:
        return "empty"
    return (f"lon {ll[:, 0].min():.5f}..{ll[:, 0].max():.5f}, lat {ll[:, 1].min():.5f}..{ll[:, 1].max():.5f}")


def evaluate(predictions: Sequence[str], truth: str, cfg: EvalConfig, out_dir: str | os.PathLike[str] | None = None,
             *, overwrite: bool = False) -> EvalReport:
    """Evaluate prediction files against a truth layer in map space (module docstring).

    Raises:
        InputError: unreadable inputs, no score field, no overlap between predictions and truth
            (the message gives both extents), class names that do not match (:class:`ClassMismatch`).
    """
    cfg.validate()
    t0 = time.perf_counter()
    if out_dir is not None:
        check_output_dir(out_dir, overwrite=overwrite)
    labels = read_labels(truth, layer=cfg.layer, class_field=cfg.class_field)
    fixed = _fixed_crs(cfg)
    truth_l = _to_metric(labels.geometries, labels.crs, fixed)
    truth_l.names = np.array([labels.classes[i - 1] for i in labels.class_ids], dtype=object)[truth_l.ok]
    preds, footprints = _read_predictions(predictions, cfg, fixed)
    pnames, mapping = _reconcile_classes(preds.names, labels.classes, cfg)
    # AOI, in lon/lat; objects count when their centre lies inside it
    if cfg.aoi:
        aoi_l = read_labels(cfg.aoi)
        aoi = shapely.union_all(to_crs(aoi_l.geometries, aoi_l.crs, "EPSG:4326"))
        aoi_desc = f"--aoi {cfg.aoi}"
    elif footprints:
        aoi = shapely.union_all(np.array(footprints, dtype=object))
        aoi_desc = "footprint of the imagery the predictions came from"
    else:
        aoi = shapely.union_all(to_crs(shapely.envelope(labels.geometries), labels.crs, "EPSG:4326"))
        aoi_desc = "extent of the truth"
    shapely.prepare(aoi)

    def inside(layer: _Layer) -> np.ndarray:
        return shapely.contains_xy(aoi, layer.ll[:, 0], layer.ll[:, 1]) if len(layer.ll) else np.zeros(0, bool)

    def extent(ll):
        return shapely.box(ll[:, 0].min(), ll[:, 1].min(), ll[:, 0].max(), ll[:, 1].max())

    if len(preds.ll) and not shapely.intersects(extent(preds.ll).buffer(1e-3), extent(truth_l.ll).buffer(1e-3)):
        raise InputError(
            f"the predictions and the truth do not overlap: predictions {_extent_ll(preds.ll)}, truth "
            f"{_extent_ll(truth_l.ll)}.",
            fix="check that both cover the same imagery; a wrong CRS on either file is the usual cause.")
    tin, pin = inside(truth_l), inside(preds)
    if not tin.any():
        raise InputError(f"no truth object lies inside the AOI ({aoi_desc}): truth {_extent_ll(truth_l.ll)}.",
                         fix="pass --aoi polygons that cover the truth, or check the CRS of the truth.")
    if len(preds.ll) == 0 or not pin.any():
        log.warning("no prediction inside the AOI: every metric is 0")
    pb, ps, pn, pz = preds.boxes[pin], preds.scores[pin], pnames[pin], preds.zones[pin]
    tb, tn, tz = truth_l.boxes[tin], truth_l.names[tin], truth_l.zones[tin]
    # COCO "images": groups of intersecting boxes, never mixing metric CRSs
    pimg = np.zeros(len(pb), dtype=np.int64)
    timg = np.zeros(len(tb), dtype=np.int64)
    offset = 0
    for z in np.unique(np.concatenate([pz, tz])):
        ps_sel, ts_sel = pz == z, tz == z
        a, b = group_images(pb[ps_sel], tb[ts_sel], max_predictions=IMAGE_MAX_PREDICTIONS)
        pimg[ps_sel], timg[ts_sel] = a + offset, b + offset
        offset = int(max(offset, pimg.max(initial=0), timg.max(initial=0)))
    classes = list(labels.classes)
    cid = {n: i + 1 for i, n in enumerate(classes)}
    n_images = int(max(pimg.max(initial=0), timg.max(initial=0)))
    gt = {"images": [{"id": i} for i in range(1, n_images + 1)],
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)],
          "annotations": coco_annotations(timg, tb, [cid[n] for n in tn])}
    dets = coco_detections(pimg, pb, [cid[n] for n in pn], ps)
    zones = sorted(set(np.concatenate([pz, tz]).tolist()))
    crs_desc = zones[0] if len(zones) == 1 else f"local UTM zone of each object ({', '.join(zones)})"
    lo, hi = cfg.area_bins
    bins = (("small", 0.0, lo), ("medium", lo, hi), ("large", hi, 1e30))
    # the last maxDets must hold every prediction of the fullest image (a connected group can exceed 100)
    per_image = np.bincount(pimg).max(initial=0) if len(pimg) else 0
    md = (1, 10, 100) + ((int(per_image),) if per_image > 100 else ())
    metrics = coco_metrics(gt, dets, area_bins=bins, max_dets=md)
    op_metrics = coco_metrics(gt, dets, iou_thresholds=[cfg.iou], area_bins=bins, max_dets=md, keep_eval=True)
    ev = op_metrics["_eval"]
    op = operating_point(ev, cfg.iou, score_thresh=cfg.score_thresh)
    if cfg.score_thresh is not None:
        op["chosen"] = cfg.score_source
    per_class = {c: operating_point(ev, cfg.iou, score_thresh=op["score_thresh"], cat_ids=[cid[c]]) for c in classes}
    # boxes stacked on one object: same-class pairs at IoU > 0.3 among the predictions kept at the threshold
    kept = ps >= op["score_thresh"]
    op["pairs"] = sum(near_duplicate_pairs(pb[kept & (pz == z)], pn[kept & (pz == z)], STACK_IOU) for z in zones)
    op["truth_pairs"] = sum(near_duplicate_pairs(tb[tz == z], tn[tz == z], STACK_IOU) for z in zones)
    rep = EvalReport(metrics=metrics, operating=op, per_class_operating=per_class, crs=crs_desc, area_bins=(lo, hi),
                     n_predictions=len(pb), n_truth=len(tb), aoi=aoi_desc, seconds=0.0, class_map=mapping)
    if out_dir is not None:
        matches = _matches(ev, cfg.iou, op["score_thresh"], dets, gt)
        _write_report(out_dir, rep, classes, (pb, pz), ps, pn, (tb, tz), tn, matches, overwrite=overwrite)
        rep.out_dir = str(out_dir)
    rep.seconds = time.perf_counter() - t0
    return rep


def _matches(ev, iou, thr, dets, gt) -> tuple[set[int], dict[int, int]]:
    """``(tp detection indexes, {truth index: detection index})`` at one IoU and score threshold."""
    t = int(np.flatnonzero(np.isclose(ev.params.iouThrs, iou))[0])
    tp, pair = set(), {}
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0] or e["maxDet"] != ev.params.maxDets[-1]:
            continue
        for j, d in enumerate(e["dtIds"]):
            m = int(np.asarray(e["dtMatches"])[t][j])
            if m > 0 and e["dtScores"][j] >= thr:
                tp.add(d - 1)
                pair[m - 1] = d - 1
    return tp, pair


def _polygons(boxes: np.ndarray, zones: np.ndarray, out_crs: str) -> np.ndarray:
    """Boxes (each in its own metric CRS) as polygons in ``out_crs``."""
    polys = shapely.box(*boxes.T) if len(boxes) else np.zeros(0, object)
    out = np.empty(len(boxes), dtype=object)
    for z in np.unique(zones):
        sel = zones == z
        out[sel] = to_crs(polys[sel], z, out_crs)
    return out


def _write_report(out_dir, rep: EvalReport, classes, preds, ps, pn, truth, tn, matches, *, overwrite) -> None:
    import geopandas as gpd

    (pb, pz), (tb, tz) = preds, truth
    zones = set(pz.tolist()) | set(tz.tolist())
    out_crs = next(iter(zones)) if len(zones) == 1 else "EPSG:4326"
    tp, pair = matches
    thr = rep.operating["score_thresh"]
    with atomic_dir(out_dir) as tmp:
        (tmp / "report.json").write_text(json.dumps(rep.to_dict(), indent=2, default=float))
        (tmp / "report.md").write_text(_markdown(rep, classes))
        for c in classes:
            _pr_png(tmp / f"pr_{_slug(c)}.png", rep.per_class_operating[c], c, rep)
        above = ps >= thr
        idx = np.arange(len(pb))
        tp_idx = np.array(sorted(tp), dtype=np.int64)
        fp_idx = idx[above & ~np.isin(idx, tp_idx)]
        fn_idx = np.array([k for k in range(len(tb)) if k not in pair], dtype=np.int64)
        det_of = {d: g for g, d in pair.items()}
        tp_iou = pair_iou(torch.as_tensor(pb[tp_idx]).reshape(-1, 4),
                          torch.as_tensor(tb[[det_of[d] for d in tp_idx]]).reshape(-1, 4))

        layers = {
            "tp": gpd.GeoDataFrame({"label": pn[tp_idx].astype(str), "score": ps[tp_idx],
                                    "iou": tp_iou.numpy()},
                                   geometry=list(_polygons(pb[tp_idx], pz[tp_idx], out_crs)), crs=out_crs),
            "fp": gpd.GeoDataFrame({"label": pn[fp_idx].astype(str), "score": ps[fp_idx]},
                                   geometry=list(_polygons(pb[fp_idx], pz[fp_idx], out_crs)), crs=out_crs),
            "fn": gpd.GeoDataFrame({"label": tn[fn_idx].astype(str)},
                                   geometry=list(_polygons(tb[fn_idx], tz[fn_idx], out_crs)), crs=out_crs),
        }
        for name, gdf in layers.items():
            gdf.to_file(tmp / "inspection.gpkg", layer=name, driver="GPKG", engine="pyogrio")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "class"


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v < 0) else f"{v:.3f}"


def _markdown(rep: EvalReport, classes: list[str]) -> str:
    m, op = rep.metrics, rep.operating
    lines = [
        "# geonet evaluation", "",
        f"- truth objects in the AOI: {rep.n_truth}; predictions scored: {rep.n_predictions}",
        f"- metric CRS: {rep.crs}; AOI: {rep.aoi}",
        f"- area bins ({rep.area_unit}): small < {rep.area_bins[0]:g} <= medium < {rep.area_bins[1]:g} <= large", "",
        "| metric | value |", "|---|---|",
        f"| AP@[.5:.95] | {_fmt(m['AP'])} |", f"| AP50 | {_fmt(m['AP50'])} |", f"| AP75 | {_fmt(m['AP75'])} |",
        f"| AR@100 | {_fmt(m.get('AR@100'))} |",
    ]
    for k, v in m.items():
        if k.startswith("AP_"):
            lines.append(f"| AP {k[3:]} | {_fmt(v)} |")
    lines += ["", f"## At IoU {op['iou']:g}, score >= {op['score_thresh']:.3f} ({op['chosen']})", "",
              "| class | precision | recall | F1 | TP | FP | FN | AP | AP50 |", "|---|---|---|---|---|---|---|---|---|",
              f"| all | {op['precision']:.3f} | {op['recall']:.3f} | {op['f1']:.3f} | {op['tp']} | {op['fp']} | "
              f"{op['fn']} | {_fmt(m['AP'])} | {_fmt(m['AP50'])} |"]
    for c in classes:
        o = rep.per_class_operating[c]
        pc = m["per_class"][c]
        lines.append(f"| {c} | {o['precision']:.3f} | {o['recall']:.3f} | {o['f1']:.3f} | {o['tp']} | {o['fp']} | "
                     f"{o['fn']} | {_fmt(pc['AP'])} | {_fmt(pc['AP50'])} |")
    if "pairs" in op:
        lines += ["", f"Stacked boxes (same-class pairs at IoU > {STACK_IOU:g}): {op['pairs']} among the predictions "
                  f"kept at the threshold, {op['truth_pairs']} in the truth."]
    lines += ["", "Computed with pycocotools' COCOeval on box envelopes in the metric CRS; `inspection.gpkg` holds the "
              "tp, fp and fn boxes."]
    return "\n".join(lines) + "\n"


def _pr_png(path: Path, op: dict, name: str, rep: EvalReport) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    c = op["curve"]
    if c["recall"]:
        ax.plot(c["recall"], c["precision"], lw=1.5)
        ax.scatter([op["recall"]], [op["precision"]], color="red", zorder=3,
                   label=f"score >= {op['score_thresh']:.2f}: P {op['precision']:.2f} R {op['recall']:.2f}")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{name}: IoU {op['iou']:g}, {op['n_truth']} truth objects")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_coco(gt_path: str | os.PathLike[str], dt_path: str | os.PathLike[str], cfg: EvalConfig | None = None,
                  out_dir: str | os.PathLike[str] | None = None, *, overwrite: bool = False) -> EvalReport:
    """Evaluate a COCO pair in pixel space: ground truth JSON (e.g. chips' ``annotations.json``) and a
    COCO results list ``[{"image_id", "category_id", "bbox", "score"}]``. COCO's own area bins (px²)
    and ``maxDets`` (1, 10, 100) are used, so the numbers are COCOeval's.
    """
    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    if out_dir is not None:
        check_output_dir(out_dir, overwrite=overwrite)
    try:
        gt = json.loads(Path(gt_path).read_text())
        dets = json.loads(Path(dt_path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the COCO pair ({exc}).", fix="pass a COCO ground-truth JSON and a COCO "
                         "results JSON list.") from None
    if isinstance(dets, dict) and "annotations" in dets:
        dets = dets["annotations"]
    if not isinstance(dets, list) or (dets and "score" not in dets[0]):
        raise InputError("the predictions are not a COCO results list with scores.", path=dt_path,
                         fix="each detection needs image_id, category_id, bbox and score.")
    metrics = coco_metrics(gt, dets)
    op_m = coco_metrics(gt, dets, iou_thresholds=[cfg.iou], keep_eval=True)
    op = operating_point(op_m["_eval"], cfg.iou, score_thresh=cfg.score_thresh)
    classes = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    ids = {c["name"]: c["id"] for c in gt["categories"]}
    per_class = {c: operating_point(op_m["_eval"], cfg.iou, score_thresh=op["score_thresh"], cat_ids=[ids[c]])
                 for c in classes}
    rep = EvalReport(metrics=metrics, operating=op, per_class_operating=per_class, crs="pixels",
                     n_predictions=len(dets), n_truth=metrics["n_truth"], aoi="COCO images", seconds=0.0,
                     area_bins=(COCO_AREA_BINS[0][2], COCO_AREA_BINS[1][2]), area_unit="px²")
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp:
            (tmp / "report.json").write_text(json.dumps(rep.to_dict(), indent=2, default=float))
            (tmp / "report.md").write_text(_markdown(rep, classes))
            for c in classes:
                _pr_png(tmp / f"pr_{_slug(c)}.png", per_class[c], c, rep)
        rep.out_dir = str(out_dir)
    rep.seconds = time.perf_counter() - t0
    return rep


def is_coco_json(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is COCO ground truth: a ``.json`` object with ``images`` and ``annotations``."""
    p = Path(path)
    if p.suffix.lower() != ".json" or not p.exists():
        return False
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "images" in d and "annotations" in d



def evaluate_files(predictions: Sequence[str], truth: str, cfg: EvalConfig, out_dir: str | os.PathLike[str], *,
                   overwrite: bool = False) -> EvalReport:
    """``geonet evaluate PREDICTIONS --truth TRUTH``: map-space evaluation (:func:`evaluate`), or a COCO pair
    (:func:`evaluate_coco`) when ``truth`` is COCO ground truth.

    Raises:
        InputError: see :func:`evaluate` and :func:`evaluate_coco`.
    """
    if not predictions:
        raise InputError("no PREDICTIONS given.", fix="pass the output of `geonet detect`, or --model with --imagery.")
    if is_coco_json(truth):
        if len(predictions) != 1:
            raise InputError("a COCO truth file takes one COCO results .json as PREDICTIONS.",
                             fix="pass exactly one COCO results .json.")
        return evaluate_coco(truth, predictions[0], cfg, out_dir, overwrite=overwrite)
    return evaluate(list(predictions), truth, cfg, out_dir, overwrite=overwrite)


def evaluate_model(model: str, imagery: Sequence[str], truth: str, cfg: EvalConfig, out_dir: str | os.PathLike[str],
                   *, overwrite: bool = False, show_progress: bool | None = None, tta: bool = False) -> EvalReport:
    """Detect on ``imagery`` with ``model``, then evaluate against ``truth`` (``geonet evaluate --model``).

    Detections go to ``OUT_DIR-detections/`` (one GeoJSON per scene), at the model's own low score
    threshold (0.05 by default), not its operating point: AP needs the whole precision-recall curve.
    Precision, recall and F1 are reported at the model's operating point (the threshold ``geonet detect``
    applies by default) unless ``cfg.score_thresh`` says otherwise.
    Scenes already detected there are kept (resume), unless ``overwrite`` (the model may have changed).
    ``tta`` detects with test-time flips (:class:`geonet.detect.DetectConfig` ``tta``), as ``geonet detect --tta``.

    Raises:
        InputError: bad inputs, or a scene that fails to detect.
    """
    from geonet.atomic import make_dir
    from geonet.checkpoint import read_checkpoint

    cfg.validate()
    check_output_dir(out_dir, overwrite=overwrite)  # before the detection, not after it
    header = read_checkpoint(model)[0]
    out = Path(out_dir)
    det_dir = out.parent / (out.name + "-detections")
    created = not det_dir.exists()
    make_dir(det_dir)
    try:
        return _detect_and_evaluate(model, header, imagery, truth, cfg, out_dir, det_dir, overwrite=overwrite,
                                    show_progress=show_progress, tta=tta)
    except BaseException:
        if created and not any(det_dir.iterdir()):
            det_dir.rmdir()  # nothing detected: leave nothing behind
        raise


def _detect_and_evaluate(model, header, imagery, truth, cfg: EvalConfig, out_dir, det_dir: Path, *, overwrite: bool,
                         show_progress: bool | None, tta: bool) -> EvalReport:
    from geonet.detect import DetectConfig, detect, resolve_outputs

    log.info("detecting into %s/", det_dir)
    low = float(header.model_config.score_thresh)
    rep = detect(list(imagery), str(det_dir) + "/", DetectConfig(model=model, format="geojson", resume=not overwrite,
                                                                 overwrite=overwrite, score_thresh=low, tta=tta),
                 show_progress=show_progress)
    if rep.failed:
        raise InputError(f"{rep.failed} scene(s) failed to detect (see above).", fix="fix or leave out those scenes.")
    predictions = [str(o) for o in resolve_outputs(list(imagery), str(det_dir) + "/", "geojson")[1]]
    op = header.operating_point
    if cfg.score_thresh is None and op is not None:
        # precision, recall and F1 where a user of the model gets them: at its own operating point
        cfg = dataclasses.replace(cfg, score_thresh=op.score_thresh, score_source="the model's validation operating point")
    return evaluate(predictions, truth, cfg, out_dir, overwrite=overwrite)
