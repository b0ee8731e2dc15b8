"""Evaluation: pycocotools-identical numbers, map space, CRSs, operating point, faults."""

import contextlib
import io
import json

import geopandas as gpd
import pandas as pd
import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from geonet.boxes import near_duplicate_pairs
from geonet.chip import ChipConfig, plan_chips, write_chips
from geonet.cli.main import cli
from geonet.errors import InputError
from geonet.evaluate import ClassMismatch, EvalConfig, evaluate, evaluate_coco, group_images
from geonet.labels import LabelIndex, read_labels
from geonet.raster import describe_raster
from synth import make_scene


def _noisy_predictions(gt, rng, *, drop=0.2, jitter=1.5, fp_per_image=3):
    dets = []
    for a in gt["annotations"]:
        if a.get("iscrowd") or rng.random() < drop:
            continue
        x, y, w, h = a["bbox"]
        j = rng.normal(0, jitter, 4)
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + j[0], y + j[1], max(1, w + j[2]), max(1, h + j[3])], "score": float(rng.uniform(.3, 1))})
    for im in gt["images"]:
        for _ in range(fp_per_image):
            x, y = rng.uniform(0, im["width"] - 20, 2)
            dets.append({"image_id": im["id"], "category_id": 1, "bbox": [x, y, 15, 15],
                         "score": float(rng.uniform(0, 0.8))})
    return dets


def test_coco_pair_equals_pycocotools(tmp_path):
    r, lab, _ = make_scene(tmp_path, width=300, height=300, n=25, max_side=40)
    cfg = ChipConfig(size=128, stride=100)
    write_chips(plan_chips([describe_raster(r)], LabelIndex(read_labels(lab)), cfg), tmp_path / "chips", cfg)
    gt_path = tmp_path / "chips" / "annotations.json"
    gt = json.loads(gt_path.read_text())
    dets = _noisy_predictions(gt, np.random.default_rng(0))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    rep = evaluate_coco(gt_path, tmp_path / "dets.json", out_dir=tmp_path / "rep")
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(str(gt_path))
        ev = COCOeval(cg, cg.loadRes(str(tmp_path / "dets.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    m = rep.metrics
    ours = [m["AP"], m["AP50"], m["AP75"], m["AP_small"], m["AP_medium"], m["AP_large"], m["AR@1"], m["AR@10"],
            m["AR@100"]]
    theirs = [s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
    assert 0.2 < m["AP"] < 0.95
    assert (tmp_path / "rep" / "report.json").exists() and (tmp_path / "rep" / "pr_scene.png").exists()


def _truth_and_preds(tmp_path, n=40, crs="EPSG:32618"):
    rng = np.random.default_rng(1)
    x0, y0 = 500000.0, 4500000.0
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(2, 12, (n, 2))
    boxes = np.column_stack([x0 + xy[:, 0], y0 + xy[:, 1], x0 + xy[:, 0] + wh[:, 0], y0 + xy[:, 1] + wh[:, 1]])
    truth = gpd.GeoDataFrame({"kind": ["tree"] * n}, geometry=list(shapely.box(*boxes.T)), crs=crs)
    return truth, boxes


def _write_preds(path, boxes, scores, crs="EPSG:32618", label="tree"):
    gpd.GeoDataFrame({"label": [label] * len(boxes), "score": scores}, geometry=list(shapely.box(*boxes.T)),
                     crs=crs).to_file(path)
    return path


def test_perfect_and_shuffled(tmp_path):
    truth, boxes = _truth_and_preds(tmp_path)
    truth.to_file(tmp_path / "truth.gpkg")
    perfect = _write_preds(tmp_path / "perfect.geojson", boxes, np.linspace(0.5, 1, len(boxes)))
    rep = evaluate([str(perfect)], str(tmp_path / "truth.gpkg"), EvalConfig())
    assert rep.metrics["AP"] == pytest.approx(1.0) and rep.metrics["AP50"] == pytest.approx(1.0)
    assert rep.operating["f1"] == pytest.approx(1.0) and rep.operating["fp"] == 0
    rng = np.random.default_rng(2)
    shuffled = boxes.copy()
    wh = shuffled[:, 2:] - shuffled[:, :2]
    shuffled[:, :2] = shuffled[rng.permutation(len(boxes)), :2]  # positions of other objects
    shuffled[:, 2:] = shuffled[:, :2] + wh
    sh = _write_preds(tmp_path / "shuffled.geojson", shuffled, rng.uniform(0, 1, len(boxes)))
    rep = evaluate([str(sh)], str(tmp_path / "truth.gpkg"), EvalConfig())
    assert rep.metrics["AP"] < 0.1


def test_truth_in_another_crs_gives_same_numbers(tmp_path):
    truth, boxes = _truth_and_preds(tmp_path)
    rng = np.random.default_rng(3)
    noisy = boxes + rng.normal(0, 0.5, boxes.shape)
    preds = _write_preds(tmp_path / "p.geojson", noisy, rng.uniform(0, 1, len(boxes)))
    truth.to_crs("EPSG:4326").to_file(tmp_path / "t4326.geojson")
    gpd.read_file(tmp_path / "t4326.geojson").to_crs("EPSG:32618").to_file(tmp_path / "t_utm.gpkg")
    a = evaluate([str(preds)], str(tmp_path / "t4326.geojson"), EvalConfig())
    b = evaluate([str(preds)], str(tmp_path / "t_utm.gpkg"), EvalConfig())
    for k in ("AP", "AP50", "AP75", "AR@100"):
        assert a.metrics[k] == pytest.approx(b.metrics[k], abs=1e-9)
    assert a.operating["tp"] == b.operating["tp"] and a.crs == b.crs == "EPSG:32618"


def test_operating_point_and_inspection_layers(tmp_path):
    truth, boxes = _truth_and_preds(tmp_path)
    truth.to_file(tmp_path / "truth.gpkg")
    rng = np.random.default_rng(4)
    keep = rng.random(len(boxes)) > 0.25
    extra = boxes[:8] + 40
    preds = np.concatenate([boxes[keep] + rng.normal(0, 0.3, (keep.sum(), 4)), extra])
    scores = np.concatenate([rng.uniform(0.5, 1, keep.sum()), rng.uniform(0, 0.6, 8)])
    p = _write_preds(tmp_path / "p.geojson", preds, scores)
    for iou in (0.4, 0.5):
        rep = evaluate([str(p)], str(tmp_path / "truth.gpkg"), EvalConfig(iou=iou), tmp_path / f"r{iou}")
        op = rep.operating
        assert op["iou"] == iou
        assert op["tp"] + op["fn"] == rep.n_truth == len(boxes)
        assert op["tp"] + op["fp"] == int((scores >= op["score_thresh"]).sum())
        for layer, n in (("tp", op["tp"]), ("fp", op["fp"]), ("fn", op["fn"])):
            assert len(gpd.read_file(tmp_path / f"r{iou}" / "inspection.gpkg", layer=layer)) == n
        md = (tmp_path / f"r{iou}" / "report.md").read_text()
        assert "AP50" in md and f"IoU {iou:g}" in md and "small < 10 <= medium < 100 <= large" in md


def test_report_counts_stacked_boxes(tmp_path):
    truth, boxes = _truth_and_preds(tmp_path)
    truth.to_file(tmp_path / "truth.gpkg")
    shifted = boxes[:3].copy()
    shifted[:, [0, 2]] += 0.2 * (boxes[:3, 2] - boxes[:3, 0])[:, None]  # IoU 0.67 with its original
    preds = np.concatenate([boxes, shifted])
    scores = np.r_[np.ones(len(boxes)), np.full(3, 0.9)]
    p = _write_preds(tmp_path / "p.geojson", preds, scores)
    rep = evaluate([str(p)], str(tmp_path / "truth.gpkg"), EvalConfig(score_thresh=0.5), tmp_path / "r")
    want = near_duplicate_pairs(boxes)  # the random truth overlaps itself here and there
    assert rep.operating["truth_pairs"] == want
    assert rep.operating["pairs"] >= want + 3
    assert f"{rep.operating['pairs']} among the predictions" in (tmp_path / "r" / "report.md").read_text()
    assert evaluate([str(p)], str(tmp_path / "truth.gpkg"), EvalConfig(score_thresh=0.95)).operating["pairs"] == want


def test_area_bins_in_square_metres(tmp_path):
    truth, boxes = _truth_and_preds(tmp_path)
    truth.to_file(tmp_path / "truth.gpkg")
    p = _write_preds(tmp_path / "p.geojson", boxes, np.ones(len(boxes)))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    rep = evaluate([str(p)], str(tmp_path / "truth.gpkg"), EvalConfig(area_bins=(20.0, 60.0)))
    for name, sel in (("small", area < 20), ("medium", (area >= 20) & (area < 60)), ("large", area >= 60)):
        assert rep.metrics[f"AP_{name}"] == (pytest.approx(1.0) if sel.any() else -1)


def test_no_overlap_no_score_and_class_map(tmp_path):
    truth, boxes = _truth_and_preds(tmp_path)
    truth.to_file(tmp_path / "truth.gpkg")
    far = _write_preds(tmp_path / "far.geojson", boxes + 10_000, np.ones(len(boxes)))
    with pytest.raises(InputError, match="do not overlap") as ei:
        evaluate([str(far)], str(tmp_path / "truth.gpkg"), EvalConfig())
    assert str(ei.value).count("lon") == 2  # both extents
    gpd.GeoDataFrame({"label": ["tree"] * len(boxes)}, geometry=list(shapely.box(*boxes.T)),
                     crs="EPSG:32618").to_file(tmp_path / "noscore.geojson")
    with pytest.raises(InputError, match="no score field"):
        evaluate([str(tmp_path / "noscore.geojson")], str(tmp_path / "truth.gpkg"), EvalConfig())
    p = _write_preds(tmp_path / "p.geojson", boxes, np.ones(len(boxes)), label="Tree")
    # one class on each side: matched whatever the names
    rep = evaluate([str(p)], str(tmp_path / "truth.gpkg"), EvalConfig(class_field="kind"))
    assert rep.metrics["AP"] == pytest.approx(1.0) and rep.class_map == {"Tree": "tree"}
    two = truth.assign(kind=["tree", "shrub"] * (len(truth) // 2))
    two.to_file(tmp_path / "two.gpkg")
    with pytest.raises(ClassMismatch) as ei:
        evaluate([str(p)], str(tmp_path / "two.gpkg"), EvalConfig(class_field="kind"))
    assert "Tree" in ei.value.table and "tree" in ei.value.table and "shrub" in ei.value.table
    trees_only = _write_preds(tmp_path / "p2.geojson", boxes[::2], np.ones(len(boxes[::2])), label="Tree")
    rep = evaluate([str(trees_only)], str(tmp_path / "two.gpkg"),
                   EvalConfig(class_field="kind", class_map={"Tree": "tree"}))
    assert rep.metrics["per_class"]["tree"]["AP"] == pytest.approx(1.0)
    assert rep.metrics["per_class"]["shrub"]["AP"] == 0.0


def test_cli_mismatch_prints_table_and_class_map_fixes(tmp_path):
    truth, boxes = _truth_and_preds(tmp_path)
    truth = truth.assign(kind=["tree", "shrub"] * (len(truth) // 2))
    truth.to_file(tmp_path / "truth.gpkg")
    p = _write_preds(tmp_path / "p.geojson", boxes, np.ones(len(boxes)), label="Tree")
    base = ["evaluate", str(p), "--truth", str(tmp_path / "truth.gpkg"), "--class-field", "kind", "-o",
            str(tmp_path / "rep")]
    res = CliRunner().invoke(cli, base)
    assert res.exit_code == 2 and "predicted" in res.output and "--class-map" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "rep").exists()
    res = CliRunner().invoke(cli, base + ["--class-map", "Tree=tree", "--iou", "0.4"])
    assert res.exit_code == 0, res.output
    assert "IoU 0.4" in res.output and "recall 0.500" in res.output  # the shrubs are never predicted


def test_grouping_into_images_does_not_change_the_numbers(tmp_path, monkeypatch):
    import geonet.evaluate as E

    truth, boxes = _truth_and_preds(tmp_path, n=120)
    truth.to_file(tmp_path / "truth.gpkg")
    rng = np.random.default_rng(9)
    preds = np.concatenate([boxes + rng.normal(0, 0.6, boxes.shape), boxes[:30] + rng.normal(0, 3, (30, 4))])
    p = _write_preds(tmp_path / "p.geojson", preds, rng.uniform(0, 1, len(preds)))
    grouped = evaluate([str(p)], str(tmp_path / "truth.gpkg"), EvalConfig())
    monkeypatch.setattr(E, "IMAGE_MAX_PREDICTIONS", 10**9)  # one image holding everything
    single = evaluate([str(p)], str(tmp_path / "truth.gpkg"), EvalConfig())
    for k in ("AP", "AP50", "AP75"):
        assert grouped.metrics[k] == pytest.approx(single.metrics[k], abs=1e-12), k
    # recall over all predictions: AR@100 when images hold at most 10, AR@<all> for one image
    last = [k for k in single.metrics if k.startswith("AR@")][-1]  # maxDets: every prediction of the one image
    assert int(last[3:]) == single.n_predictions
    assert grouped.metrics["AR@100"] == pytest.approx(single.metrics[last], abs=1e-12)
    assert grouped.operating["tp"] == single.operating["tp"]


def test_group_images_never_splits_overlaps():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, (3000, 2))
    b = np.column_stack([xy, xy + rng.uniform(1, 15, (3000, 2))])
    p, t = b[:1500], b[1500:]
    pi, ti = group_images(p, t, max_predictions=50)
    allb = np.concatenate([p, t])
    img = np.concatenate([pi, ti])
    tree = shapely.STRtree(shapely.box(*allb.T))
    a, c = tree.query(shapely.box(*p.T), predicate="intersects")
    assert (img[a] == img[c]).all()
    sizes = np.bincount(pi)
    assert len(sizes) > 20  # really split into many images


def test_empty_predictions_score_zero(tmp_path):
    truth, boxes = _truth_and_preds(tmp_path)
    truth.to_file(tmp_path / "truth.gpkg")
    p = _write_preds(tmp_path / "empty.geojson", np.zeros((0, 4)), np.zeros(0))
    rep = evaluate([str(p)], str(tmp_path / "truth.gpkg"), EvalConfig(), tmp_path / "rep")
    assert rep.metrics["AP"] == 0.0 and rep.operating["fn"] == len(boxes) and rep.operating["tp"] == 0


def test_cli_detect_then_evaluate(tmp_path):
    from test_detect import make_ckpt, scene

    # an operating point of 0.9 must not cut the detections that evaluation scores
    ck = make_ckpt(tmp_path / "m.pt", metrics={"operating_point": {"iou": 0.5, "score_thresh": 0.9}})
    objects = np.array([[10.0, 10, 30, 30], [100, 120, 140, 150]])
    s = scene(tmp_path, objects, 256, 256)
    from geonet.georef import pixel_boxes_to_polygons
    from affine import Affine
    polys = pixel_boxes_to_polygons(objects, Affine(0.1, 0, 500000, 0, -0.1, 4500000))
    gpd.GeoDataFrame({"kind": ["thing"] * 2}, geometry=list(polys), crs="EPSG:32618").to_file(tmp_path / "t.gpkg")
    res = CliRunner().invoke(cli, ["evaluate", "--model", str(ck), "--imagery", str(s), "--truth",
                                   str(tmp_path / "t.gpkg"), "-o", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep-detections" / "scene.geojson").exists()
    assert "2 truth objects" in res.output
    meta = json.loads((tmp_path / "rep-detections" / "scene.geojson").read_text())["geonet"]
    assert meta["score_thresh"] == pytest.approx(0.05) and meta["tta"] is False
    # a stray file in the detections folder is not evaluated
    (tmp_path / "rep-detections" / "other.geojson").write_text("not json")
    res = CliRunner().invoke(cli, ["evaluate", "--model", str(ck), "--imagery", str(s), "--truth",
                                   str(tmp_path / "t.gpkg"), "-o", str(tmp_path / "rep"), "--overwrite"])
    assert res.exit_code == 0, res.output
    # --tta detects as `geonet detect --tta` does, and says so in the detections' metadata
    res = CliRunner().invoke(cli, ["evaluate", "--model", str(ck), "--imagery", str(s), "--truth",
                                   str(tmp_path / "t.gpkg"), "-o", str(tmp_path / "rep-tta"), "--tta"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "rep-tta-detections" / "scene.geojson").read_text())["geonet"]
    assert meta["tta"] is True and meta["tta_nms_iou"] <= 0.3
    # without --model there is nothing to detect: a usage error naming the fix
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "rep-tta-detections" / "scene.geojson"), "--truth",
                                   str(tmp_path / "t.gpkg"), "-o", str(tmp_path / "rep2"), "--tta"])
    assert res.exit_code == 2 and "--tta" in res.output and "Traceback" not in res.output, res.output
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "rep-tta-detections" / "scene.geojson"), "--truth",
                                   str(tmp_path / "t.gpkg"), "-o", str(tmp_path / "rep2"), "--imagery", str(s)])
    assert res.exit_code == 2 and "--imagery" in res.output and not (tmp_path / "rep2").exists(), res.output


def test_sites_in_several_utm_zones(tmp_path):
    """NEON-like: sites thousands of km apart are each measured in their own UTM zone."""
    from geonet.evaluate import _utm_zone

    assert list(_utm_zone(np.array([-72.2, -119.7, 32.6, 10.0]), np.array([42.5, 37.1, 0.35, -5.0]))) == \
        ["EPSG:32618", "EPSG:32611", "EPSG:32636", "EPSG:32732"]
    rng = np.random.default_rng(5)
    frames = []
    for epsg, x0, y0 in ((32618, 730000.0, 4701000.0), (32611, 257000.0, 4110000.0)):
        xy = rng.uniform(0, 100, (30, 2))
        wh = rng.uniform(2, 10, (30, 2))
        b = np.column_stack([x0 + xy[:, 0], y0 + xy[:, 1], x0 + xy[:, 0] + wh[:, 0], y0 + xy[:, 1] + wh[:, 1]])
        frames.append(gpd.GeoDataFrame({"kind": ["tree"] * 30}, geometry=list(shapely.box(*b.T)),
                                       crs=f"EPSG:{epsg}").to_crs("EPSG:4326"))
    truth = gpd.GeoDataFrame(pd.concat(frames), crs="EPSG:4326")
    truth.to_file(tmp_path / "truth.shp")
    preds = truth.assign(label="tree", score=np.linspace(0.2, 1, len(truth)))
    preds.to_file(tmp_path / "p.geojson")
    rep = evaluate([str(tmp_path / "p.geojson")], str(tmp_path / "truth.shp"), EvalConfig(), tmp_path / "rep")
    assert rep.metrics["AP"] == pytest.approx(1.0) and "EPSG:32611" in rep.crs and "EPSG:32618" in rep.crs
    assert gpd.read_file(tmp_path / "rep" / "inspection.gpkg", layer="tp").crs.to_epsg() == 4326
    # --crs puts everything in one CRS
    one = evaluate([str(tmp_path / "p.geojson")], str(tmp_path / "truth.shp"), EvalConfig(crs="EPSG:32615"))
    assert one.crs.startswith("EPSG:32615") and one.metrics["AP"] == pytest.approx(1.0)


def test_cli_json_summary(tmp_path):
    import json

    truth, boxes = _truth_and_preds(tmp_path, n=20)
    truth.to_file(tmp_path / "truth.gpkg")
    p = _write_preds(tmp_path / "p.geojson", boxes, np.linspace(0.5, 1, len(boxes)))
    res = CliRunner().invoke(cli, ["evaluate", str(p), "--truth", str(tmp_path / "truth.gpkg"), "-o",
                                   str(tmp_path / "rep"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["metrics"]["AP50"] == pytest.approx(1.0) and rep["out_dir"].endswith("rep")
