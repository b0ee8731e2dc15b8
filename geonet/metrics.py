"""COCO detection metrics, computed by pycocotools' ``COCOeval`` (not re-implemented).

:func:`coco_metrics` takes ground truth and detections as COCO dicts/lists in any planar frame
(pixels of chips, or metres of a metric CRS in :mod:`geonet.evaluate`) and returns AP@[.5:.95],
AP50, AP75, AR at the largest ``max_dets``, per-size-bin AP and per-class AP, plus the raw
precision array for PR curves. Ignore regions are ground truth with ``iscrowd = 1``: COCOeval
matches detections to them last and counts them as neither true nor false positives.
:func:`operating_point` reads precision, recall and F1 at one IoU and score threshold (or the
max-F1 threshold) from the same COCOeval run.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from geonet.boxes import xyxy_to_xywh

__all__ = ["coco_metrics", "coco_from_dicts", "coco_annotations", "coco_detections", "operating_point",
           "COCO_AREA_BINS"]

#: COCO's own size bins in square pixels: small < 32^2, medium < 96^2, large.
COCO_AREA_BINS = (("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2), ("large", 96.0 ** 2, 1e10))


def coco_from_dicts(gt: dict) -> COCO:
    """A pycocotools COCO object from an in-memory dict (no file, no prints)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    for a in coco.dataset.get("annotations", []):
        if "area" not in a:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])
        a.setdefault("iscrowd", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_annotations(image_ids, boxes, class_ids, *, iscrowd: int = 0, first_id: int = 1,
                     decimals: int | None = None, skip_empty: bool = False) -> list[dict]:
    """COCO ground-truth annotations from xyxy boxes.

    Args:
        image_ids: ``[N]`` COCO image id of each box (or one int for all).
        boxes: ``[N, 4]`` ``[x1, y1, x2, y2]``; COCO's ``bbox`` is ``[x1, y1, x2 - x1, y2 - y1]``.
        class_ids: ``[N]`` category ids.
        iscrowd: 1 for ignore regions (also written as ``ignore``).
        first_id: annotation id of the first box (ids are consecutive).
        decimals: round ``bbox`` and ``area`` to this many decimals.
        skip_empty: leave out boxes with no width or height.

    Returns:
        ``[{"id", "image_id", "category_id", "bbox", "area", "iscrowd", "ignore"}, ...]``.
    """
    xywh = xyxy_to_xywh(boxes)
    n = len(xywh)
    ids = np.broadcast_to(np.asarray(image_ids), (n,))
    out = []
    for k, (b, img, cls) in enumerate(zip(xywh.tolist(), ids.tolist(), np.asarray(class_ids).tolist())):
        if skip_empty and (b[2] <= 0 or b[3] <= 0):
            continue
        area = b[2] * b[3]
        if decimals is not None:
            b, area = [round(v, decimals) for v in b], round(area, decimals)
        out.append({"id": first_id + len(out), "image_id": int(img), "category_id": int(cls), "bbox": b,
                    "area": area, "iscrowd": int(iscrowd), "ignore": int(iscrowd)})
    return out


def coco_detections(image_ids, boxes, class_ids, scores) -> list[dict]:
    """COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` from xyxy boxes
    ``[N, 4]`` with ``[N]`` image ids (or one int), category ids and scores."""
    xywh = xyxy_to_xywh(boxes)
    ids = np.broadcast_to(np.asarray(image_ids), (len(xywh),))
    return [{"image_id": int(i), "category_id": int(c), "bbox": b, "score": float(s)}
            for i, c, b, s in zip(ids.tolist(), np.asarray(class_ids).tolist(), xywh.tolist(),
                                  np.asarray(scores).tolist())]


def coco_metrics(gt: dict, detections: Sequence[dict], *, iou_thresholds: Sequence[float] | None = None,
                 area_bins: Sequence[tuple[str, float, float]] = COCO_AREA_BINS,
                 max_dets: Sequence[int] = (1, 10, 100), keep_eval: bool = False) -> dict:
    """COCO bbox metrics with pycocotools.

    Args:
        gt: COCO dict with ``images``, ``annotations`` (``bbox`` ``[x, y, w, h]``, ``iscrowd``) and
            ``categories``.
        detections: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.
        iou_thresholds: IoU thresholds (default COCO's 0.50:0.05:0.95). AP50/AP75 are reported when
            0.5/0.75 are among them.
        area_bins: ``(name, lo, hi)`` area ranges in the frame's squared units (default COCO's, in px²).
        max_dets: detections per image considered; AP uses the last, AR is reported for each.
        keep_eval: also return the COCOeval object under ``"_eval"``.

    Returns:
        ``{"AP", "AP50", "AP75", "AR@<m>" for each m, "AP_<bin>" for each bin, "per_class": {name: {"AP",
        "AP50", "AP75", "n_truth"}}, "n_truth", "n_detections", "iou_thresholds", "precision"}``, where
        ``precision`` is COCOeval's ``[T, R, K, A, M]`` array as nested lists. A metric with no ground
        truth is ``-1`` (COCO's convention).
    """
    coco_gt = coco_from_dicts(gt)
    cat_ids = sorted(c["id"] for c in gt["categories"])
    names = {c["id"]: c["name"] for c in gt["categories"]}
    n_truth = sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0))
    dets = [dict(d) for d in detections]
    params_iou = np.array(iou_thresholds if iou_thresholds is not None else np.linspace(0.5, 0.95, 10), dtype=float)
    if dets:
        for k, d in enumerate(dets):
            d.setdefault("id", k + 1)
            d["area"] = float(d["bbox"][2] * d["bbox"][3])
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dets)
    else:
        coco_dt = coco_from_dicts({"images": gt["images"], "annotations": [], "categories": gt["categories"]})
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.imgIds = sorted(im["id"] for im in gt["images"])
    ev.params.catIds = cat_ids
    ev.params.iouThrs = params_iou
    ev.params.maxDets = [int(m) for m in max_dets]
    ev.params.areaRng = [[float(lo), float(hi)] for _, lo, hi in (("all", 0.0, 1e30),) + tuple(area_bins)]
    ev.params.areaRngLbl = ["all"] + [name for name, _, _ in area_bins]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"]  # [T, R, K, A, M]
    rec = ev.eval["recall"]  # [T, K, A, M]

    def ap(t=None, k=None, a=0, m=-1):
        p = prec[:, :, :, a, m] if t is None else prec[[t], :, :, a, m]
        p = p if k is None else p[:, :, [k]]
        p = p[p > -1]
        return float(p.mean()) if p.size else -1.0

    def ar(k=None, a=0, m=-1):
        r = rec[:, :, a, m] if k is None else rec[:, [k], a, m]
        r = r[r > -1]
        return float(r.mean()) if r.size else -1.0

    def t_index(v):
        hits = np.flatnonzero(np.isclose(params_iou, v))
        return int(hits[0]) if hits.size else None

    t50, t75 = t_index(0.5), t_index(0.75)
    out = {"AP": ap(), "AP50": ap(t50) if t50 is not None else None, "AP75": ap(t75) if t75 is not None else None}
    for j, m in enumerate(ev.params.maxDets):
        out[f"AR@{m}"] = ar(m=j)
    for j, (name, _, _) in enumerate(area_bins, start=1):
        out[f"AP_{name}"] = ap(a=j)
    per_class = {}
    for k, cid in enumerate(cat_ids):
        per_class[names[cid]] = {
            "AP": ap(k=k), "AP50": ap(t50, k=k) if t50 is not None else None,
            "AP75": ap(t75, k=k) if t75 is not None else None,
            "n_truth": sum(1 for a in gt["annotations"] if a["category_id"] == cid and not a.get("iscrowd", 0)),
        }
    out.update(per_class=per_class, n_truth=n_truth, n_detections=len(dets), iou_thresholds=params_iou.tolist())
    out["precision"] = prec
    if keep_eval:
        out["_eval"] = ev
    return out


def operating_point(ev, iou: float, *, score_thresh: float | None = None, cat_ids=None) -> dict:
    """Precision/recall/F1 and TP/FP/FN at one IoU from a COCOeval run whose ``iouThrs`` include ``iou``.

    COCOeval matches greedily by descending score, so the matches of the detections above a score
    threshold are the same as if only those detections existed: one pass gives the whole
    precision-recall curve. The area range is "all" and the detection limit the last ``maxDets``.

    Returns:
        ``{"iou", "score_thresh", "precision", "recall", "f1", "tp", "fp", "fn", "curve": {...}}``;
        ``score_thresh`` is the given one or the score that maximises F1.
    """
    p = ev.params
    t = int(np.flatnonzero(np.isclose(p.iouThrs, iou))[0])
    scores, tps, n_gt = [], [], 0
    cats = cat_ids if cat_ids is not None else p.catIds
    for e in ev.evalImgs:
        if e is None or e["aRng"] != p.areaRng[0] or e["maxDet"] != p.maxDets[-1] or e["category_id"] not in cats:
            continue
        dt_ig = np.asarray(e["dtIgnore"])[t] if len(e["dtIds"]) else np.zeros(0, bool)
        dt_m = np.asarray(e["dtMatches"])[t] if len(e["dtIds"]) else np.zeros(0)
        keep = ~dt_ig.astype(bool)
        scores.extend(np.asarray(e["dtScores"])[keep].tolist())
        tps.extend((dt_m[keep] > 0).tolist())
        n_gt += int((~np.asarray(e["gtIgnore"]).astype(bool)).sum())
    scores = np.asarray(scores, dtype=float)
    tps = np.asarray(tps, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    scores, tps = scores[order], tps[order]
    ctp = np.cumsum(tps)
    cfp = np.cumsum(~tps)
    prec = ctp / np.maximum(ctp + cfp, 1)
    rec = ctp / max(n_gt, 1)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    if score_thresh is None:
        if len(scores):
            # only the last detection of a run of equal scores is a valid cut
            valid = np.r_[scores[1:] != scores[:-1], True]
            k = int(np.argmax(np.where(valid, f1, -1)))
            thr = float(scores[k])
        else:
            thr = 1.0
    else:
        thr = float(score_thresh)
    n_kept = int((scores >= thr).sum())
    tp = int(ctp[n_kept - 1]) if n_kept else 0
    fp = int(cfp[n_kept - 1]) if n_kept else 0
    fn = n_gt - tp
    P = tp / (tp + fp) if tp + fp else 0.0
    R = tp / n_gt if n_gt else 0.0
    F = 2 * P * R / (P + R) if P + R else 0.0
    return {"iou": iou, "score_thresh": thr, "chosen": "max F1" if score_thresh is None else "given",
            "precision": P, "recall": R, "f1": F, "tp": tp, "fp": fp, "fn": fn, "n_truth": n_gt,
            "curve": {"precision": prec.tolist(), "recall": rec.tolist(), "score": scores.tolist()}}
