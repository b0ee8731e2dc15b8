"""Detection end to end: tiling, nodata, GSD resampling, seam merge, outputs, faults.

Most tests use an *oracle* detector on a synthetic 16-bit scene whose objects carry unique pixel
values: for each tile it returns the visible part of each object, exactly what a perfect detector
sees. So the whole pipeline -- reading, tiling, merging, georeferencing, writing -- is checked
against known ground truth, without training a model.
"""

import json
import os
import sqlite3
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from click.testing import CliRunner

from geonet.checkpoint import CheckpointHeader, save_checkpoint
from geonet.cli.main import cli
from geonet.detect import DetectConfig, Detector, detect_scene, plan_scene
from geonet.georef import geometries_to_pixel, pixel_boxes_to_polygons
from geonet.tiling import TileGrid
from geonet.model import ModelConfig, build_model
from seams import count_errors, seam_objects

BASE = 1000  # object k has pixel value BASE + 100 * k


def make_ckpt(path, *, bands=1, dtype="uint16", gsd=0.1, chip=128, max_box=40, classes=("thing",), metrics=None,
              busy=False, spread=False):
    """A random ResNet-18 RetinaNet checkpoint; ``busy``: classification bias 0, so scores spread over (0, 1) and
    a scene gets many boxes; ``spread``: classification weights drawn wider (std 0.05, bias -1), so scores differ
    from box to box (about 0.3-0.5) instead of tying, for tests that compare detections."""
    cfg = ModelConfig(backbone="resnet18", num_classes=len(classes), in_channels=bands, mean=[100.0] * bands,
                      std=[50.0] * bands, anchor_sizes=(16, 32, 64, 128, 256))
    torch.manual_seed(0)
    model = build_model(cfg)
    if busy:
        torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)
    if spread:
        torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.05)
        torch.nn.init.constant_(model.head.classification_head.cls_logits.bias, -1.0)
    stats = [5, 8, 20, 35, max_box]
    save_checkpoint(path, model, CheckpointHeader(
        model_config=cfg, classes=list(classes), bands=list(range(1, bands + 1)), dtype=dtype, gsd=[gsd, gsd],
        chip_size=chip, box_stats={"width": stats, "height": stats, "side": stats}, metrics=metrics or {}, epoch=0))
    return path


def assert_same_detections(a, b, *, px=1e-3, score=1e-5):
    """Two detection dicts hold the same boxes (within ``px`` pixels), scores (within ``score``) and labels.

    Rows may come in another order where scores tie: each box of ``a`` is matched to its nearest in ``b``.
    """
    assert len(a["boxes"]) == len(b["boxes"])
    if not len(a["boxes"]):
        return
    d = (a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(-1)  # [N, N] px
    j = d.argmin(1)
    assert d.min(1).values.max() < px and len(set(j.tolist())) == len(j)
    assert torch.allclose(a["scores"], b["scores"][j], atol=score) and torch.equal(a["labels"], b["labels"][j])


def assert_same_detections_bf16(ref, got, *, matched=0.85, score=0.01, iou=0.9):
    """``got`` (bf16 autocast) gives ``ref``'s (fp32) detections within bf16's tolerance.

    bf16 keeps 8 bits of mantissa, so near-tied scores can reorder and a box at the top-k or NMS margin can
    swap for its neighbour: at least ``matched`` of ``ref``'s boxes must have a box of the same label in ``got``
    at IoU > ``iou``, with a score within ``score``.
    """
    from torchvision.ops import box_iou

    assert abs(len(ref["boxes"]) - len(got["boxes"])) <= (1 - matched) * len(ref["boxes"])
    if not len(ref["boxes"]):
        return
    overlap = box_iou(ref["boxes"], got["boxes"])
    overlap[ref["labels"][:, None] != got["labels"][None, :]] = 0
    best, j = overlap.max(1)
    ok = best > iou
    assert ok.float().mean() >= matched
    assert (ref["scores"][ok] - got["scores"][j[ok]]).abs().max() < score


class Oracle(Detector):
    """Returns the visible part of every object in each tile (values BASE + 100 k)."""

    calls = 0

    def __call__(self, batch):
        Oracle.calls += len(batch)
        out = []
        for tile in batch.numpy().astype(np.int64):
            img = tile[0]
            ids = np.unique(img[img >= BASE - 50])
            ids = np.unique(np.round((ids - BASE) / 100).astype(int))
            boxes = []
            for k in ids:
                ys, xs = np.nonzero(np.abs(img - (BASE + 100 * k)) < 20)
                if len(xs):
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": b, "scores": torch.full((len(b),), 0.9), "labels": torch.ones(len(b), dtype=torch.int64)})
        return out


def oracle(ckpt):
    return Oracle(ckpt)


def scene(tmp, objects, width, height, *, transform=None, crs="EPSG:32618", nodata=None, nodata_rect=None,
          name="scene.tif"):
    rng = np.random.default_rng(0)
    img = rng.integers(50, 150, size=(1, height, width)).astype(np.uint16)
    for k, (x1, y1, x2, y2) in enumerate(np.round(objects).astype(int)):
        img[0, y1:y2, x1:x2] = BASE + 100 * k
    if nodata_rect is not None:
        x1, y1, x2, y2 = nodata_rect
        img[0, y1:y2, x1:x2] = nodata
    t = transform or Affine(0.1, 0, 500000, 0, -0.1, 4500000)
    p = tmp / name
    with rasterio.open(p, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint16", crs=crs,
                       transform=t, nodata=nodata, tiled=True, blockxsize=64, blockysize=64) as dst:
        dst.write(img)
    return p


def read_pixel_boxes(out, scene_path):
    g = gpd.read_file(out)
    with rasterio.open(scene_path) as src:
        geoms = g.to_crs(src.crs).geometry.values
        return shapely.bounds(geometries_to_pixel(geoms, src.transform)), g


@pytest.mark.parametrize("overlap", [48, 64, 96])
def test_oracle_scene_seams_end_to_end(tmp_path, overlap):
    ck = make_ckpt(tmp_path / "m.pt")
    det = oracle(ck)
    grid = TileGrid.build(700, 560, 128, overlap)
    objects = np.round(seam_objects(grid, np.random.default_rng(overlap), size=(8, min(40, overlap - 6))))
    p = scene(tmp_path, objects, 700, 560)
    cfg = DetectConfig(model=str(ck), tile=128, overlap=overlap, workers=0, batch_size=3)
    res = detect_scene(p, det, cfg, tmp_path / "out.geojson")
    boxes, g = read_pixel_boxes(tmp_path / "out.geojson", p)
    # RFC 7946 precision 7 (1e-7 deg ~ 1 cm = 0.1 px here)
    assert count_errors(objects, boxes, tol=0.25) == (0, 0, 0)
    assert len(g) == len(objects) == res.detections
    assert set(g.columns) >= {"label", "class_id", "score", "scene", "model"}
    assert (g["label"] == "thing").all() and (g["scene"] == "scene.tif").all()


def test_rotated_scene_native_gpkg_exact(tmp_path):
    ck = make_ckpt(tmp_path / "m.pt")
    t = Affine(0.08, 0.03, 500000.0, 0.02, -0.12, 4500000.0)
    objects = np.array([[10.0, 10, 30, 40], [100, 60, 130, 90], [200, 150, 230, 180]])
    p = scene(tmp_path, objects, 260, 220, transform=t)
    rep = detect_scene(p, oracle(ck), DetectConfig(model=str(ck), workers=0, overlap=40), tmp_path / "o.gpkg")
    g = gpd.read_file(tmp_path / "o.gpkg", layer="o")
    assert g.crs.to_epsg() == 32618
    want = pixel_boxes_to_polygons(objects, t)
    got = sorted(g.geometry.values, key=lambda q: q.centroid.x)
    for a, b in zip(got, sorted(want, key=lambda q: q.centroid.x)):
        assert shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), tolerance=1e-6)
    assert rep.detections == 3
    con = sqlite3.connect(tmp_path / "o.gpkg")
    style = con.execute("SELECT styleQML, useAsDefault, f_table_name FROM layer_styles").fetchone()
    meta = con.execute("SELECT metadata FROM gpkg_metadata").fetchall()
    con.close()
    assert "graduatedSymbol" in style[0] and style[1] == 1 and style[2] == "o"
    assert any("model_sha256" in m[0] for m in meta)
    assert (tmp_path / "o.qml").exists()


def test_nodata_tiles_are_not_run(tmp_path):
    ck = make_ckpt(tmp_path / "m.pt")
    objects = np.array([[10.0, 10, 30, 30]])
    p = scene(tmp_path, objects, 512, 256, nodata=0, nodata_rect=(200, 0, 512, 256))
    Oracle.calls = 0
    res = detect_scene(p, oracle(ck), DetectConfig(model=str(ck), tile=128, workers=0, overlap=32), tmp_path / "o.geojson")
    assert res.tiles_skipped >= 2 and Oracle.calls == res.tiles
    assert res.tiles + res.tiles_skipped == plan_scene(p, oracle(ck), DetectConfig(model=str(ck), tile=128, overlap=32)).grid.n_tiles


def test_gsd_resampling(tmp_path):
    ck = make_ckpt(tmp_path / "m.pt", gsd=0.2)  # trained at 0.2 m, scene at 0.1 m: tiles read at half size
    objects = np.array([[20.0, 20, 80, 60], [300, 200, 360, 260], [500, 100, 560, 170]])
    p = scene(tmp_path, objects, 640, 400)
    det = oracle(ck)
    plan = plan_scene(p, det, DetectConfig(model=str(ck)))
    # geodesic GSD of a UTM scene is 0.10004 m (scale factor), so the frame is 320-321 px wide
    assert plan.scale == pytest.approx(2.0, rel=1e-3) and plan.grid.width in (320, 321)
    detect_scene(p, det, DetectConfig(model=str(ck), workers=0), tmp_path / "o.geojson")
    boxes, _ = read_pixel_boxes(tmp_path / "o.geojson", p)
    assert count_errors(objects, boxes, tol=2.5) == (0, 0, 0)  # 1 px at the model's GSD
    plan2 = plan_scene(p, det, DetectConfig(model=str(ck), resample=False))
    assert plan2.scale == 1.0 and any("--no-resample" in w for w in plan2.warnings)


def test_streaming_memory_is_bounded(tmp_path):
    ck = make_ckpt(tmp_path / "m.pt")
    grid = TileGrid.build(400, 6000, 128, 48)
    objects = np.round(seam_objects(grid, np.random.default_rng(3), size=(8, 30), per_seam=2))
    p = scene(tmp_path, objects, 400, 6000)
    res = detect_scene(p, oracle(ck), DetectConfig(model=str(ck), tile=128, workers=0, overlap=48), tmp_path / "o.geojson")
    assert res.detections == len(objects)
    assert res.max_boxes_held < len(objects) / 3  # a few tile rows, not the scene


def test_empty_output_is_valid(tmp_path):
    ck = make_ckpt(tmp_path / "m.pt")
    p = scene(tmp_path, np.zeros((0, 4)), 200, 200)
    for ext in (".geojson", ".gpkg", ".shp"):
        detect_scene(p, oracle(ck), DetectConfig(model=str(ck), workers=0), tmp_path / f"e{ext}")
        g = gpd.read_file(tmp_path / f"e{ext}", layer="e")
        assert len(g) == 0
    fc = json.loads((tmp_path / "e.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"] == [] and "geonet" in fc


def test_crash_leaves_no_partial_file(tmp_path, monkeypatch):
    ck = make_ckpt(tmp_path / "m.pt")
    p = scene(tmp_path, np.array([[10.0, 10, 30, 30]]), 600, 600)
    det = oracle(ck)
    calls = {"n": 0}

    def boom(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return Oracle.__call__(det, batch)

    monkeypatch.setattr(det, "__call__", boom)
    det.__class__ = type("Boom", (Oracle,), {"__call__": lambda self, b: boom(b)})
    with pytest.raises(KeyboardInterrupt):
        detect_scene(p, det, DetectConfig(model=str(ck), workers=0, batch_size=1), tmp_path / "o.geojson")
    assert not (tmp_path / "o.geojson").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".o.tmp")]


def test_preview_and_metadata(tmp_path):
    ck = make_ckpt(tmp_path / "m.pt")
    p = scene(tmp_path, np.array([[10.0, 10, 30, 30]]), 300, 300)
    res = detect_scene(p, oracle(ck), DetectConfig(model=str(ck), workers=0, preview=str(tmp_path / "p.png")),
                       tmp_path / "o.geojson")
    assert Path(res.preview).exists()
    fc = json.loads((tmp_path / "o.geojson").read_text())
    meta = fc["geonet"]
    for k in ("geonet_version", "model_sha256", "tile_px", "overlap_px", "score_thresh", "merge_iou"):
        assert k in meta
    assert meta["overlap_px"] == 40  # the largest training box


# ---------------------------------------------------------------- command line and bad input


def _cli(*args):
    return CliRunner().invoke(cli, ["detect", "--no-progress", "--workers", "0", *map(str, args)])


def test_cli_multi_scene_resume_and_corrupt(tmp_path):
    ck = make_ckpt(tmp_path / "m.pt")
    a = scene(tmp_path, np.array([[10.0, 10, 30, 30]]), 200, 200, name="a.tif")
    b = scene(tmp_path, np.array([[10.0, 10, 30, 30]]), 200, 200, name="b.tif")
    bad = tmp_path / "c.tif"
    bad.write_bytes(a.read_bytes()[: len(a.read_bytes()) // 3])
    out = tmp_path / "out"
    out.mkdir()
    res = _cli(a, b, bad, "-m", ck, "-o", out)
    assert res.exit_code == 1, res.output
    assert (out / "a.geojson").exists() and (out / "b.geojson").exists() and not (out / "c.geojson").exists()
    assert "c.tif" in res.output and "Traceback" not in res.output
    mtime = (out / "a.geojson").stat().st_mtime_ns
    res = _cli(a, b, "-m", ck, "-o", out, "--resume")
    assert res.exit_code == 0 and "already done" in res.output
    assert (out / "a.geojson").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("case", ["no-crs", "bands", "dtype", "ext", "outdir", "not-ckpt", "overlap"])
def test_cli_bad_input(tmp_path, case):
    ck = make_ckpt(tmp_path / "m.pt")
    s = scene(tmp_path, np.array([[10.0, 10, 30, 30]]), 200, 200)
    args = [s, "-m", ck, "-o", tmp_path / "o.geojson"]
    if case == "no-crs":
        s = scene(tmp_path, np.zeros((0, 4)), 100, 100, crs=None, name="nocrs.tif")
        args = [s, "-m", ck, "-o", tmp_path / "o.geojson"]
        needle = "--allow-no-crs"
    elif case == "bands":
        args[2] = make_ckpt(tmp_path / "m3.pt", bands=3, dtype="uint16")
        needle = "band"
    elif case == "dtype":
        args[2] = make_ckpt(tmp_path / "m8.pt", dtype="uint8")
        needle = "dtype"
    elif case == "ext":
        args[4] = tmp_path / "o.csv"
        needle = "unknown output extension"
    elif case == "outdir":
        (tmp_path / "afile").write_text("x")
        args[4] = tmp_path / "afile" / "o.geojson"
        needle = "cannot create the folder"
    elif case == "not-ckpt":
        junk = tmp_path / "junk.pt"
        torch.save({"weights": torch.zeros(2)}, junk)
        args[2] = junk
        needle = "not a geonet checkpoint"
    else:
        args += ["--overlap", "500"]
        needle = "--overlap"
    res = _cli(*args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o.geojson").exists()


def test_allow_no_crs_writes_pixels(tmp_path):
    ck = make_ckpt(tmp_path / "m.pt")
    s = scene(tmp_path, np.array([[10.0, 20, 30, 50]]), 100, 100, crs=None, name="nocrs.tif")
    det = oracle(ck)
    detect_scene(s, det, DetectConfig(model=str(ck), workers=0, allow_no_crs=True), tmp_path / "o.gpkg")
    g = gpd.read_file(tmp_path / "o.gpkg", layer="o")
    assert g.crs is None
    np.testing.assert_allclose(g.total_bounds, [10, 20, 30, 50])


def test_real_model_cli_runs(tmp_path):
    """A (random) real model through the CLI, with reader workers, GeoJSON + preview."""
    ck = make_ckpt(tmp_path / "m.pt")
    s = scene(tmp_path, np.array([[10.0, 10, 30, 30]]), 300, 300)
    res = CliRunner().invoke(cli, ["detect", str(s), "-m", str(ck), "-o", str(tmp_path / "o.geojson"), "--no-progress",
                                   "--workers", "2", "--preview", str(tmp_path / "p.png"), "--score-thresh", "0.5"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").exists() and (tmp_path / "o.qml").exists()


def test_default_score_threshold_is_the_validation_operating_point(tmp_path):
    plain = Detector(make_ckpt(tmp_path / "a.pt"))
    assert plain.model.score_thresh == pytest.approx(0.05) and plain.score_source == "model default"
    op = {"operating_point": {"iou": 0.5, "score_thresh": 0.37, "precision": 0.6, "recall": 0.5, "f1": 0.55}}
    ck = make_ckpt(tmp_path / "b.pt", metrics=op)
    det = Detector(ck)
    assert det.model.score_thresh == pytest.approx(0.37) and "max F1" in det.score_source
    given = Detector(ck, score_thresh=0.05)
    assert given.model.score_thresh == pytest.approx(0.05) and given.score_source == "given"
    assert det.nms_iou == pytest.approx(0.5)  # no NMS IoU chosen in this checkpoint: the model's


def test_default_nms_iou_is_the_validation_choice(tmp_path):
    op = {"operating_point": {"iou": 0.5, "score_thresh": 0.3, "precision": 0.6, "recall": 0.5, "f1": 0.55,
                              "nms_iou": 0.3}}
    ck = make_ckpt(tmp_path / "b.pt", metrics=op)
    assert Detector(ck).model.nms_thresh == pytest.approx(0.3)
    assert Detector(ck, nms_iou=0.6).nms_iou == pytest.approx(0.6)



@pytest.mark.parametrize("ext", [".fgb", ".parquet"])
def test_flatgeobuf_and_geoparquet_outputs(tmp_path, ext):
    """Same features and fields as GeoJSON, native CRS, provenance kept; evaluate reads them back."""
    import geopandas as gpd

    from geonet.evaluate import EvalConfig, evaluate

    from synth import random_boxes, write_labels

    objects = random_boxes(np.random.default_rng(2), 8, 300, 260, 10, 30)
    sc = scene(tmp_path, objects, 300, 260)
    labels = write_labels(tmp_path / "truth.geojson", objects, Affine(0.1, 0, 500000, 0, -0.1, 4500000), "EPSG:32618")
    ck = make_ckpt(tmp_path / "m.pt")
    det = oracle(ck)
    ref = detect_scene(sc, det, DetectConfig(model=str(ck), workers=0), tmp_path / "ref.geojson")
    res = detect_scene(sc, det, DetectConfig(model=str(ck), workers=0), tmp_path / f"out{ext}")
    g = gpd.read_parquet(tmp_path / f"out{ext}") if ext == ".parquet" else gpd.read_file(tmp_path / f"out{ext}")
    assert len(g) == res.detections == ref.detections > 0
    assert {"label", "class_id", "score", "scene", "model"} <= set(g.columns) and g.crs.to_epsg() == 32618
    rep = evaluate([str(tmp_path / f"out{ext}")], str(labels), EvalConfig())
    assert rep.n_predictions == len(g) and "footprint" in rep.aoi  # provenance read back


def test_tta_flips_boxes_back(tmp_path):
    """Each flipped view's boxes come back in the tile's own frame: all four views agree on one box."""
    det = Detector(make_ckpt(tmp_path / "m.pt"), tta=True)

    def bright_box(x, autocast=None):
        out = []
        for tile in x:
            ys, xs = torch.nonzero(tile[0] > 500, as_tuple=True)
            b = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": b, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out

    det.model.predict_batch = bright_box
    x = torch.zeros(1, 1, 64, 96, dtype=torch.int64)
    x[0, 0, 5:20, 60:90] = 1000
    out = det(x)[0]
    assert len(out["boxes"]) == 1 and out["boxes"][0].tolist() == [60, 5, 90, 20]


def test_tta_views_of_one_object_leave_one_box(tmp_path):
    """Flipped views put one object's box a few pixels apart (IoU 0.36): by default they are merged at IoU
    TTA_MERGE_IOU, not at the checkpoint's NMS IoU (0.5 here), so the map shows one box, not a stack; an NMS IoU
    the user gives is used as given."""
    from geonet.detector import TTA_MERGE_IOU

    ck = make_ckpt(tmp_path / "m.pt", metrics={"operating_point": {"iou": 0.5, "score_thresh": 0.3, "nms_iou": 0.5}})

    def shifted_box(x, autocast=None):  # the object's box, 7 px right in the view's own frame
        out = []
        for tile in x:
            ys, xs = torch.nonzero(tile[0] > 500, as_tuple=True)
            b = torch.tensor([[xs.min() + 7, ys.min(), xs.max() + 8, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": b, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out

    x = torch.zeros(1, 1, 64, 96, dtype=torch.int64)
    x[0, 0, 5:20, 60:90] = 1000
    det = Detector(ck, tta=True)
    det.model.predict_batch = shifted_box
    assert det.nms_iou == 0.5 and det.tta_nms_iou == TTA_MERGE_IOU < 0.36
    assert len(det(x)[0]["boxes"]) == 1
    det = Detector(ck, tta=True, nms_iou=0.5)
    det.model.predict_batch = shifted_box
    assert det.tta_nms_iou == 0.5 and len(det(x)[0]["boxes"]) == 2
    assert Detector(ck).tta_nms_iou is None


def test_json_summary_and_no_progress_frames_in_logs(tmp_path):
    """Not a terminal: no carriage-return frames; --json prints a summary a script can parse."""
    import json

    objects = np.array([[20.0, 20, 40, 40]])
    sc = scene(tmp_path, objects, 200, 160)
    ck = make_ckpt(tmp_path / "m.pt")
    res = CliRunner().invoke(cli, ["detect", str(sc), "-m", str(ck), "-o", str(tmp_path / "o.geojson"), "--json"])
    assert res.exit_code == 0, res.output
    assert "\r" not in res.output
    rep = json.loads(res.output)
    assert rep["failed"] == 0 and rep["scenes"][0]["output"].endswith("o.geojson") and "seconds" in rep


def test_scene_in_bands_joined_by_one_merge_equals_one_pass(tmp_path):
    """What ``--engine ray`` does with a large scene, without Ray: bands of tile batches detected apart (sent as
    NumPy with preview thumbnails), then joined in order by one seam merge. Same features and preview as one pass;
    no duplicates, truncated or missed objects at band seams."""
    from dataclasses import asdict

    from geonet.detect import tile_detections, write_scene
    from geonet.ray_engine import split_bands

    ck = make_ckpt(tmp_path / "m.pt")
    det = oracle(ck)
    grid = TileGrid.build(700, 560, 128, 48)
    objects = np.round(seam_objects(grid, np.random.default_rng(7), size=(8, 40)))
    p = scene(tmp_path, objects, 700, 560)
    cfg = DetectConfig(model=str(ck), tile=128, overlap=48, workers=1, batch_size=2, preview=str(tmp_path / "one.png"))
    one = detect_scene(p, det, cfg, tmp_path / "one.geojson")
    plan = plan_scene(p, det, cfg)
    bands = split_bands(plan, 2, 10)
    assert len(bands) >= 4 and [t for band in bands for b in band for t in b] == plan.grid.tiles()
    assert split_bands(plan, 2, 0) == split_bands(plan, 2, plan.grid.n_tiles) == [sum(bands, [])]
    parts = [td.to_host(plan.grid) for band in bands for td in tile_detections(p, det, plan, band, workers=1,
                                                                                           keep_data=True)]
    assert all(td.data is None and isinstance(b, np.ndarray) for td in parts for b in td.boxes)
    cfg_b = DetectConfig(**{**asdict(cfg), "preview": str(tmp_path / "bands.png")})
    res = write_scene(p, det, plan, cfg_b, tmp_path / "bands.geojson", iter(parts), run_on=("cuda", "bf16"))
    assert (res.detections, res.tiles) == (one.detections, one.tiles) and res.detections == len(objects)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.geojson", "bands.geojson"))
    assert [f["geometry"] for f in a["features"]] == [f["geometry"] for f in b["features"]]
    assert [f["properties"]["score"] for f in a["features"]] == [f["properties"]["score"] for f in b["features"]]
    boxes, _ = read_pixel_boxes(tmp_path / "bands.geojson", p)
    assert count_errors(objects, boxes, tol=0.25) == (0, 0, 0)
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "bands.png").read_bytes()
    assert (b["geonet"]["device"], b["geonet"]["precision"]) == ("cuda", "bf16")  # where the bands ran


def test_a_lost_ctrl_c_still_stops_detection(tmp_path):
    """Ctrl-C whose KeyboardInterrupt is swallowed (raised inside a finaliser) still stops detection at the next
    batch: the SIGINT handler notes it in geonet.interrupt, and the pipeline checks that note."""
    from geonet import interrupt

    class LostCtrlC(Oracle):
        def __call__(self, batch):
            if Oracle.calls >= 6:
                interrupt.request()  # what the CLI's SIGINT handler notes; its KeyboardInterrupt is lost
            return super().__call__(batch)

    ck = make_ckpt(tmp_path / "m.pt")
    p = scene(tmp_path, [[10, 10, 30, 30]], 700, 560)
    cfg = DetectConfig(model=str(ck), tile=128, overlap=32, workers=1, batch_size=2)
    out = tmp_path / "o.geojson"
    Oracle.calls = 0
    try:
        with pytest.raises((KeyboardInterrupt, RuntimeError)):  # RuntimeError: raised through Arrow's C stream
            detect_scene(p, LostCtrlC(ck), cfg, out)
        assert interrupt.requested()
    finally:
        interrupt.clear()
    assert Oracle.calls < plan_scene(p, oracle(ck), cfg).grid.n_tiles / 2
    assert not out.exists() and not list(tmp_path.glob(".o*tmp*"))


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_detector_fast_path_equals_the_reference_model(tmp_path, precision):
    """The Detector (folded norms, channels-last, bf16 where asked) gives the plain fp32 model's detections:
    within 1e-3 px and 1e-5 in score in fp32, within bf16's tolerance in bf16."""
    from geonet.checkpoint import load_checkpoint

    ck = make_ckpt(tmp_path / "m.pt", bands=3, dtype="uint8", chip=256, spread=True)
    x = torch.randint(0, 255, (4, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref_model, _ = load_checkpoint(ck)
    with torch.inference_mode():
        ref = ref_model.eval().predict_batch(x)
    got = Detector(ck, device="cpu", precision=precision)(x)
    assert all(len(r["boxes"]) > 50 for r in ref)  # the comparison is not vacuous
    for r, g in zip(ref, got):
        if precision == "32":
            assert_same_detections(r, g)
        else:
            assert_same_detections_bf16(r, g)
