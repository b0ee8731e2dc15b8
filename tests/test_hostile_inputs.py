"""Hostile inputs on every command: no traceback, the right exit code, one line that names the file or option
(with a Fix where there is one), no output left behind, and never a silent wrong result.

Every input is made here, seeded: truncated and header-only GeoTIFFs, rasters without a CRS or a
geotransform, rotated and EPSG:4326 rasters, 1x1 px, all nodata, NaN floats, uint16, 1/5-band scenes
against an RGB model, labels without CRS, empty, outside, null, invalid, lines and points, multi-layer
GeoPackages, unicode and spaces in paths, read-only and existing outputs, bad option values,
random-byte and pickle-payload checkpoints, string and null scores, truth that does not overlap.
The fault tests (SIGINT, SIGKILL, a failing writer) run the command line in a subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
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
from geonet.model import ModelConfig, build_model
from synth import make_scene, paint, write_raster

T = Affine(0.1, 0, 501000.0, 0, -0.1, 4500000.0)  # where make_scene(seed=1) puts the scene and its labels


# ----------------------------------------------------------------------------- the inputs


class World:
    """Inputs shared by the cases (made once per module in a temporary folder)."""

    def __init__(self, root: Path):
        self.root = root
        self.scene, self.labels, self.boxes = make_scene(root, "scene", width=160, height=160, n=8, seed=1)
        self.rgb_model = self.model("rgb.pt", bands=3, dtype="uint8")
        self.pan_model = self.model("pan.pt", bands=1, dtype="uint16")

    def model(self, name, *, bands, dtype):
        torch.manual_seed(0)
        cfg = ModelConfig(backbone="resnet18", in_channels=bands, mean=[60.0] * bands, std=[30.0] * bands,
                          anchor_sizes=(16, 32, 64, 128, 256), score_thresh=0.0)
        path = self.root / name
        stats = [8, 10, 16, 22, 24]
        save_checkpoint(path, build_model(cfg), CheckpointHeader(
            model_config=cfg, classes=["thing"], bands=list(range(1, bands + 1)), dtype=dtype, gsd=[0.1, 0.1],
            chip_size=64, box_stats={"width": stats, "height": stats, "side": stats}))
        return path

    def raster(self, name, *, width=64, height=64, bands=3, dtype="uint8", nodata=None, crs="EPSG:32618",
               transform=T, fill=None):
        data = paint(np.zeros((0, 4)), width, height, bands=bands, dtype=dtype)
        if fill is not None:
            data[:] = fill
        return write_raster(self.root / name, data, crs=crs, transform=transform, nodata=nodata)

    def vector(self, name, geoms, *, crs="EPSG:4326", **fields):
        p = self.root / name
        gpd.GeoDataFrame({**fields}, geometry=list(geoms), crs=crs).to_file(p)
        return p

    def scene_polys(self, crs="EPSG:4326"):
        return gpd.read_file(self.labels).to_crs(crs).geometry.values


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("hostile"))


def truncated(w: World, name="trunc.tif"):
    p, _, _ = make_scene(w.root, Path(name).stem, width=512, height=512, n=30, seed=3)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    return p


def header_only(w: World):
    src = w.raster("ho_src.tif", width=256, height=256)
    p = w.root / "header_only.tif"
    p.write_bytes(src.read_bytes()[:600])
    return p


def no_geotransform(w: World):
    p = w.root / "nogt.tif"
    data = paint(np.zeros((0, 4)), 64, 64)
    with rasterio.open(p, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs="EPSG:32618") as dst:
        dst.write(data)
    return p


def random_bytes(w: World, name):
    p = w.root / name
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p


class Payload:
    """A pickle that runs code when unpickled without ``weights_only``."""

    marker: Path = Path("/nonexistent")

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_payload(w: World, name):
    Payload.marker = w.root / "PWNED"
    p = w.root / name
    with open(p, "wb") as f:
        pickle.dump({"state_dict": Payload(), "epoch": 0, "global_step": 1}, f)
    return p


def read_only_dir(w: World, name):
    """A folder that takes no new files: read-only by permissions, or /sys for root (root ignores them)."""
    if os.geteuid() == 0:
        return Path("/sys")
    d = w.root / name
    d.mkdir(exist_ok=True)
    os.chmod(d, stat.S_IRUSR | stat.S_IXUSR)
    return d


def preds_file(w: World, name, scores):
    polys = w.scene_polys()
    return w.vector(name, polys[: len(scores)], score=list(scores), label=["thing"] * len(scores))


# ----------------------------------------------------------------------------- the cases
# Each case returns (args, expected exit code, text the one error line must contain, fix expected).
# Exit code 0 cases check their output instead (the silent-wrong-result cases).


def _out(w, name):
    return w.root / "out" / name


CASES: dict[str, callable] = {}


def case(name):
    def deco(f):
        CASES[name] = f
        return f
    return deco


# check -----------------------------------------------------------------------------------------------

@case("check/truncated")
def _(w):
    p = truncated(w, "check_trunc.tif")
    return ["check", "--imagery", p], 1, "check_trunc.tif", True


@case("check/header-only")
def _(w):
    return ["check", "--imagery", header_only(w)], 1, "header_only.tif", True


@case("check/no-label-on-any-raster")
def _(w):
    far = w.vector("far.geojson", [shapely.box(10, 10, 10.001, 10.001)])
    return ["check", "--imagery", w.scene, "--labels", far], 1, "none of the", True


@case("check/no-geotransform")
def _(w):
    return ["check", "--imagery", no_geotransform(w)], 1, "nogt.tif", True


@case("check/random-bytes")
def _(w):
    return ["check", "--imagery", random_bytes(w, "noise.tif")], 1, "noise.tif", True


@case("check/missing")
def _(w):
    return ["check", "--imagery", w.root / "nope.tif"], 2, "nope.tif", True


@case("check/points-without-size")
def _(w):
    pts = w.vector("pts.geojson", shapely.centroid(w.scene_polys()))
    return ["check", "--imagery", w.scene, "--labels", pts], 2, "--point-size", True


# chip ------------------------------------------------------------------------------------------------

def chip_args(w, name, *extra, imagery=None, labels=None):
    return ["chip", "--imagery", imagery or w.scene, "--labels", labels or w.labels, "-o", _out(w, name), *extra]


@case("chip/all-nodata")
def _(w):
    r = w.raster("allnd.tif", nodata=0, fill=0, width=160, height=160)
    return chip_args(w, "c1", imagery=r), 2, "allnd.tif", True


@case("chip/huge-size")
def _(w):
    return chip_args(w, "c2", "--size", "100000"), 2, "--size", True


@case("chip/negative-ratio")
def _(w):
    return chip_args(w, "c3", "--negative-ratio", "-1"), 2, "--negative-ratio", True


@case("chip/min-visible")
def _(w):
    return chip_args(w, "c4", "--min-visible", "0"), 2, "--min-visible", True


@case("chip/split")
def _(w):
    return chip_args(w, "c5", "--split", "val=1.5"), 2, "--split", True


@case("chip/split-key")
def _(w):
    return chip_args(w, "c6", "--split", "test=0.2"), 2, "--split", True


@case("chip/read-only-output")
def _(w):
    d = read_only_dir(w, "ro_chip")
    return ["chip", "--imagery", w.scene, "--labels", w.labels, "-o", d / "chips"], 2, "-o", True


@case("chip/existing-output")
def _(w):
    d = w.root / "out" / "existing_chips"
    d.mkdir(parents=True, exist_ok=True)
    (d / "keep.txt").write_text("x")
    return ["chip", "--imagery", w.scene, "--labels", w.labels, "-o", d], 2, "--overwrite", True


@case("chip/line-labels")
def _(w):
    lines = w.vector("lines.geojson", shapely.boundary(w.scene_polys()))
    return chip_args(w, "c7", labels=lines), 2, "lines", True


@case("chip/points-without-size")
def _(w):
    pts = w.vector("pts2.geojson", shapely.centroid(w.scene_polys()))
    return chip_args(w, "c8", labels=pts), 2, "--point-size", True


@case("chip/labels-no-crs")
def _(w):
    p = w.root / "nocrs.shp"
    gpd.GeoDataFrame(geometry=list(w.scene_polys("EPSG:32618"))).to_file(p)
    return chip_args(w, "c9", labels=p), 2, "no CRS", True


@case("chip/labels-empty")
def _(w):
    p = w.root / "empty.geojson"
    p.write_text('{"type": "FeatureCollection", "features": []}')
    return chip_args(w, "c10", labels=p), 2, "empty.geojson", True


@case("chip/labels-outside")
def _(w):
    far = w.vector("far2.geojson", [shapely.box(10, 10, 10.001, 10.001)])
    return chip_args(w, "c11", labels=far), 2, "far2.geojson", True


@case("chip/labels-null-geometry")
def _(w):
    p = w.root / "nullgeom.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": None}]}))
    return chip_args(w, "c12", labels=p), 2, "nullgeom.geojson", True


@case("chip/labels-not-vector")
def _(w):
    p = w.root / "labels.txt"
    p.write_text("not a vector file")
    return chip_args(w, "c13", labels=p), 2, "labels.txt", True


@case("chip/gpkg-unknown-layer")
def _(w):
    p = w.root / "two.gpkg"
    for layer in ("a", "b"):
        gpd.GeoDataFrame(geometry=list(w.scene_polys())).set_crs("EPSG:4326").to_file(p, layer=layer)
    return chip_args(w, "c14", "--layer", "zzz", labels=p), 2, "--layer", True


@case("chip/raster-no-crs")
def _(w):
    r = w.raster("nocrs_r.tif", crs=None)
    return chip_args(w, "c15", imagery=r), 2, "no CRS", True


@case("chip/truncated")
def _(w):
    p = truncated(w, "chip_trunc.tif")
    lab = w.root / "chip_trunc.geojson"
    return ["chip", "--imagery", p, "--labels", lab, "-o", _out(w, "c16"), "--size", "128"], 1, "chip_trunc.tif", True


@case("chip/stride-gt-size")
def _(w):
    return chip_args(w, "c17", "--size", "64", "--stride", "100"), 2, "--stride", True


@case("chip/size-zero")
def _(w):
    return chip_args(w, "c18", "--size", "0"), 2, "--size", True


@case("chip/point-size-negative")
def _(w):
    return chip_args(w, "c19", "--point-size", "-2"), 2, "--point-size", True


@case("chip/bands-out-of-range")
def _(w):
    return chip_args(w, "c20", "--bands", "1,9"), 2, "--bands", True


@case("chip/bands-text")
def _(w):
    return chip_args(w, "c21", "--bands", "red"), 2, "--bands", True


# anchors ---------------------------------------------------------------------------------------------

@case("anchors/missing-labels")
def _(w):
    return ["anchors", "--imagery", w.scene, "--labels", w.root / "none.geojson"], 2, "none.geojson", True


@case("anchors/lines")
def _(w):
    lines = w.vector("lines2.geojson", shapely.boundary(w.scene_polys()))
    return ["anchors", "--imagery", w.scene, "--labels", lines], 2, "lines", True


# train -----------------------------------------------------------------------------------------------

def train_args(w, name, *extra):
    return ["train", "--imagery", w.scene, "--labels", w.labels, "-o", _out(w, name), "--weights", "none",
            "--backbone", "resnet18", "--size", "64", "--no-progress", *extra]


@case("train/epochs-zero")
def _(w):
    return train_args(w, "t1", "--epochs", "0"), 2, "--epochs", True


@case("train/num-nodes-zero")
def _(w):
    return train_args(w, "t2n", "--num-nodes", "0"), 2, "--num-nodes", True


@case("train/torchgeo-weights-unknown")
def _(w):  # the later --weights wins in click; needs TorchGeo installed (the test extra has it), else the install hint
    return train_args(w, "t2tg", "--weights", "torchgeo:ResNet18_Weights.NOPE"), 2, "torchgeo:ResNet18_Weights", True


@case("train/steps-zero")
def _(w):
    return train_args(w, "t2", "--steps", "0"), 2, "--steps", True


@case("train/batch-zero")
def _(w):
    return train_args(w, "t3", "--batch-size", "0"), 2, "--batch-size", True


@case("train/lr-negative")
def _(w):
    return train_args(w, "t4", "--lr", "-1"), 2, "--lr", True


@case("train/ratios-negative")
def _(w):
    return train_args(w, "t5", "--anchor-ratios", "0.5,-1,2"), 2, "--anchor-ratios", True


@case("train/anchor-sizes-count")
def _(w):
    return train_args(w, "t6", "--anchor-sizes", "32,64"), 2, "--anchor-sizes", True


@case("train/anchor-text")
def _(w):
    return train_args(w, "t7", "--anchor-scales", "big"), 2, "--anchor-scales", True


@case("train/matcher-ious")
def _(w):
    return train_args(w, "t8", "--fg-iou", "0.3", "--bg-iou", "0.6"), 2, "IoU", True


@case("train/empty-chip-folder")
def _(w):
    d = w.root / "empty_chips"
    d.mkdir(exist_ok=True)
    return ["train", "--chips", d, "-o", _out(w, "t9"), "--no-progress"], 2, "empty_chips", True


@case("train/chip-folder-no-images")
def _(w):
    d = w.root / "noimg_chips"
    d.mkdir(exist_ok=True)
    (d / "annotations.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return ["train", "--chips", d, "-o", _out(w, "t10"), "--no-progress"], 2, "noimg_chips", True


@case("train/resume-pickle-payload")
def _(w):
    run = w.root / "out" / "bad_run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(f"imagery: [{w.scene}]\nlabels: {w.labels}\n")
    os.replace(pickle_payload(w, "payload.ckpt"), run / "last.ckpt")
    return ["train", "--resume", "-o", run, "--no-progress"], 2, "last.ckpt", True


@case("train/resume-random-bytes")
def _(w):
    run = w.root / "out" / "bad_run2"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(f"imagery: [{w.scene}]\nlabels: {w.labels}\n")
    os.replace(random_bytes(w, "noise.ckpt"), run / "last.ckpt")
    return ["train", "--resume", "-o", run, "--no-progress"], 2, "last.ckpt", True


@case("train/resume-nothing")
def _(w):
    return ["train", "--resume", "-o", w.root / "out" / "never", "--no-progress"], 2, "--resume", True


@case("train/line-labels")
def _(w):
    lines = w.vector("lines3.geojson", shapely.boundary(w.scene_polys()))
    return ["train", "--imagery", w.scene, "--labels", lines, "-o", _out(w, "t11"), "--weights", "none",
            "--no-progress"], 2, "lines", True


@case("train/imagery-without-labels")
def _(w):
    return ["train", "--imagery", w.scene, "-o", _out(w, "t12"), "--no-progress"], 2, "--labels", True


@case("train/two-sources")
def _(w):
    return train_args(w, "t13", "--chips", w.root), 2, "one data source", True


@case("train/config-missing")
def _(w):
    return train_args(w, "t14", "--config", w.root / "nope.yaml"), 2, "--config", True


@case("train/config-bad-key")
def _(w):
    p = w.root / "bad.yaml"
    p.write_text("epochz: 3\n")
    return train_args(w, "t15", "--config", p), 2, "epochz", True


@case("train/config-not-yaml")
def _(w):
    p = w.root / "notyaml.yaml"
    p.write_text("a: [1, 2\n")
    return train_args(w, "t16", "--config", p), 2, "--config", True


@case("train/weights-missing")
def _(w):
    args = train_args(w, "t17")
    args[args.index("--weights") + 1] = str(w.root / "nowhere.pth")
    return args, 2, "--weights", True


@case("train/weights-not-state-dict")
def _(w):
    args = train_args(w, "t18")
    args[args.index("--weights") + 1] = str(random_bytes(w, "noise.pth"))
    return args, 2, "--weights", True


@case("train/existing-output")
def _(w):
    d = w.root / "out" / "t19"
    d.mkdir(parents=True, exist_ok=True)
    (d / "x").write_text("x")
    return train_args(w, "t19"), 2, "--overwrite", True


@case("train/read-only-output")
def _(w):
    d = read_only_dir(w, "ro_train")
    args = train_args(w, "t20")
    args[args.index("-o") + 1] = str(d / "run")
    return args, 2, "-o", True


# detect ----------------------------------------------------------------------------------------------

def detect_args(w, scene, name, *extra, model=None):
    return ["detect", scene, "-m", model or w.rgb_model, "-o", _out(w, name), "--no-progress", *extra]


@case("detect/truncated")
def _(w):
    return detect_args(w, truncated(w, "det_trunc.tif"), "d1.geojson"), 1, "det_trunc.tif", True


@case("detect/existing-output")
def _(w):
    out = _out(w, "d2.geojson")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("{}")
    return detect_args(w, w.scene, "d2.geojson"), 2, "--overwrite", True


@case("detect/five-band-scene")
def _(w):
    r = w.raster("five.tif", bands=5)
    return detect_args(w, r, "d3.geojson"), 2, "--bands", True


@case("detect/one-band-scene-rgb-model")
def _(w):
    r = w.raster("one.tif", bands=1)
    return detect_args(w, r, "d4.geojson"), 2, "one.tif", True


@case("detect/uint16-scene-uint8-model")
def _(w):
    r = w.raster("u16.tif", bands=3, dtype="uint16")
    return detect_args(w, r, "d5.geojson"), 2, "uint16", True


@case("detect/random-bytes-checkpoint")
def _(w):
    return detect_args(w, w.scene, "d6.geojson", model=random_bytes(w, "noise.pt")), 2, "noise.pt", True


@case("detect/pickle-payload-checkpoint")
def _(w):
    return detect_args(w, w.scene, "d7.geojson", model=pickle_payload(w, "payload.pt")), 2, "payload.pt", True


@case("detect/missing-checkpoint")
def _(w):
    return detect_args(w, w.scene, "d8.geojson", model=w.root / "none.pt"), 2, "none.pt", True


@case("detect/no-crs")
def _(w):
    return detect_args(w, w.raster("nocrs_d.tif", crs=None), "d9.geojson"), 2, "no CRS", True


@case("detect/read-only-output")
def _(w):
    d = read_only_dir(w, "ro_detect")
    return ["detect", w.scene, "-m", w.rgb_model, "-o", d / "x.geojson", "--no-progress"], 2, "-o", True


@case("detect/overlap-text")
def _(w):
    return detect_args(w, w.scene, "d10.geojson", "--overlap", "lots"), 2, "--overlap", True


@case("detect/overlap-too-large")
def _(w):
    return detect_args(w, w.scene, "d11.geojson", "--tile", "64", "--overlap", "64"), 2, "--overlap", True


@case("detect/tile-zero")
def _(w):
    return detect_args(w, w.scene, "d12.geojson", "--tile", "0"), 2, "--tile", True


@case("detect/score-thresh")
def _(w):
    return detect_args(w, w.scene, "d13.geojson", "--score-thresh", "2"), 2, "--score-thresh", True


@case("detect/missing-scene")
def _(w):
    return detect_args(w, w.root / "gone.tif", "d14.geojson"), 2, "gone.tif", True


@case("detect/bad-extension")
def _(w):
    return detect_args(w, w.scene, "d15.csv"), 2, ".csv", True


@case("detect/vector-as-scene")
def _(w):
    return detect_args(w, w.labels, "d16.geojson"), 2, "scene.geojson", True


@case("detect/header-only")
def _(w):
    return detect_args(w, header_only(w), "d17.geojson"), 1, "header_only.tif", True


@case("detect/no-geotransform")
def _(w):
    return detect_args(w, no_geotransform(w), "d18.geojson"), 2, "nogt.tif", True


@case("detect/nms-iou")
def _(w):
    return detect_args(w, w.scene, "d19.geojson", "--nms-iou", "1.5"), 2, "--nms-iou", True


@case("detect/actors-zero")
def _(w):
    return detect_args(w, w.scene, "d20a.geojson", "--engine", "ray", "--actors", "0"), 2, "--actors", True


@case("detect/band-tiles-negative")
def _(w):
    return detect_args(w, w.scene, "d20b.geojson", "--engine", "ray", "--band-tiles", "-1"), 2, "--band-tiles", True


@case("detect/stac-item-not-an-item")
def _(w):
    p = w.root / "collection.json"
    p.write_text('{"type": "FeatureCollection", "features": []}')
    return detect_args(w, p, "d20c.geojson"), 2, "collection.json", True


@case("detect/stac-item-without-the-asset")
def _(w):
    p = w.root / "item.json"
    p.write_text('{"type": "Feature", "stac_version": "1.0.0", "id": "x", "geometry": null, "links": [], '
                 '"properties": {"datetime": "2024-01-01T00:00:00Z"}, "assets": {"visual": {"href": "%s"}}}' % w.scene)
    return detect_args(w, p, "d20d.geojson", "--asset", "B04"), 2, "--asset", True


@case("detect/batch-zero")
def _(w):
    return detect_args(w, w.scene, "d20.geojson", "--batch-size", "0"), 2, "--batch-size", True


@case("detect/bands-beyond-scene")
def _(w):
    return detect_args(w, w.scene, "d21.geojson", "--bands", "1,2,7"), 2, "--bands", True


# evaluate --------------------------------------------------------------------------------------------

def eval_args(w, preds, name, *extra, truth=None):
    return ["evaluate", preds, "--truth", truth or w.labels, "-o", _out(w, name), *extra]


@case("evaluate/null-scores")
def _(w):
    return eval_args(w, preds_file(w, "nullscore.geojson", [None] * 5), "e1"), 2, "'score'", True


@case("evaluate/string-scores")
def _(w):
    return eval_args(w, preds_file(w, "strscore.geojson", ["high"] * 5), "e2"), 2, "'score'", True


@case("evaluate/iou")
def _(w):
    return eval_args(w, preds_file(w, "p3.geojson", [0.9] * 5), "e3", "--iou", "2"), 2, "--iou", True


@case("evaluate/area-bins-reversed")
def _(w):
    return eval_args(w, preds_file(w, "p4.geojson", [0.9] * 5), "e4", "--area-bins", "100,10"), 2, "--area-bins", True


@case("evaluate/area-bins-text")
def _(w):
    return eval_args(w, preds_file(w, "p5.geojson", [0.9] * 5), "e5", "--area-bins", "small"), 2, "--area-bins", True


@case("evaluate/no-overlap")
def _(w):
    far = w.vector("far3.geojson", [shapely.box(10, 10, 10.001, 10.001)])
    return eval_args(w, preds_file(w, "p6.geojson", [0.9] * 5), "e6", truth=far), 2, "do not overlap", True


@case("evaluate/truth-missing")
def _(w):
    return eval_args(w, preds_file(w, "p7.geojson", [0.9] * 5), "e7", truth=w.root / "nt.gpkg"), 2, "nt.gpkg", True


@case("evaluate/predictions-not-vector")
def _(w):
    return eval_args(w, random_bytes(w, "noise.geojson"), "e8"), 2, "noise.geojson", True


@case("evaluate/score-field-missing")
def _(w):
    return eval_args(w, preds_file(w, "p9.geojson", [0.9] * 5), "e9", "--score-field", "conf"), 2, "conf", True


@case("evaluate/existing-output")
def _(w):
    d = w.root / "out" / "e10"
    d.mkdir(parents=True, exist_ok=True)
    (d / "x").write_text("x")
    return eval_args(w, preds_file(w, "p10.geojson", [0.9] * 5), "e10"), 2, "--overwrite", True


@case("evaluate/read-only-output")
def _(w):
    d = read_only_dir(w, "ro_eval")
    return ["evaluate", preds_file(w, "p11.geojson", [0.9] * 5), "--truth", w.labels, "-o", d / "rep"], 2, "-o", True


@case("evaluate/model-fails")
def _(w):
    return ["evaluate", "--model", w.rgb_model, "--imagery", w.raster("five_e.tif", bands=5), "--truth", w.labels,
            "-o", _out(w, "e12")], 2, "--bands", True


@case("evaluate/model-and-predictions")
def _(w):
    return eval_args(w, preds_file(w, "p13.geojson", [0.9] * 5), "e13", "--model", w.rgb_model), 2, "--model", True


@case("evaluate/scores-out-of-range")
def _(w):
    return eval_args(w, preds_file(w, "p14.geojson", [7.0] * 5), "e14"), 2, "'score'", True


# ----------------------------------------------------------------------------- the runner


def _leftovers(w: World, before: set[str]) -> list[str]:
    """Files or folders this case added under ``out/`` (outputs must not appear when a command fails), and
    temporary files anywhere under the root."""
    now = {str(p.relative_to(w.root)) for p in w.root.rglob("*")}
    new = sorted(now - before)
    return [n for n in new if n.startswith("out/") or ".tmp-" in n]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile(world, name):
    w = world
    (w.root / "out").mkdir(exist_ok=True)
    args, code, needle, fix = CASES[name](w)
    before = {str(p.relative_to(w.root)) for p in w.root.rglob("*")}
    res = CliRunner().invoke(cli, [str(a) for a in args])
    out = res.output.strip()
    assert "Traceback" not in out, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == code, out
    assert needle in out, out
    if name.startswith("check/") and code == 1:
        assert "problem" in out  # a report, not a crash
    else:
        lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("geonet: ")]
        assert len(lines) == 1 and lines[0].startswith("Error: "), out
        if fix:
            assert "Fix:" in lines[0] or "--help" in lines[0], out
    assert not _leftovers(w, before), _leftovers(w, before)
    assert not (w.root / "PWNED").exists()  # no payload ever runs


# ----------------------------------------------------------------------------- silent wrong results


def _detect(w, scene, out, *extra, model=None):
    res = CliRunner().invoke(cli, ["detect", str(scene), "-m", str(model or w.rgb_model), "-o", str(out),
                                   "--no-progress", "--workers", "0", *map(str, extra)])
    assert res.exit_code == 0, res.output
    return gpd.read_file(out), res.output


def test_all_nodata_scene_gives_nothing(world):
    """The scene's own nodata (0) comes first: an all-nodata scene is skipped, whatever the training nodata."""
    r = world.raster("nd0.tif", nodata=0, fill=0, width=150, height=150)
    g, out = _detect(world, r, world.root / "nd0.geojson")
    assert len(g) == 0 and "(0 tiles, 16 nodata tiles skipped" in out


def test_tiny_scene_detections_stay_on_the_pixel(world):
    r = world.raster("px.tif", width=1, height=1, transform=Affine(0.1, 0, 500000, 0, -0.1, 4500000))
    g, _ = _detect(world, r, world.root / "px.geojson", "--score-thresh", "0.0")
    foot = shapely.box(500000, 4499999.9, 500000.1, 4500000).buffer(0.02)  # GeoJSON's 7 decimals: ~1 cm
    assert len(g) == 0 or foot.contains(g.to_crs("EPSG:32618").geometry.union_all())


def test_detections_never_on_nodata(world):
    data = paint(world.boxes, 160, 160, seed=1)
    data[:, :, 80:] = 0
    r = write_raster(world.root / "halfnd.tif", data, nodata=0, transform=T)
    g, _ = _detect(world, r, world.root / "halfnd.geojson", "--score-thresh", "0.0")
    assert len(g)
    cx = g.to_crs("EPSG:32618").geometry.centroid.x
    assert ((cx - T.c) / 0.1 < 80 + 1e-6).all()


def test_five_band_scene_with_bands_runs(world):
    r = world.raster("five_ok.tif", bands=5)
    g, _ = _detect(world, r, world.root / "five_ok.geojson", "--bands", "3,2,1")
    assert g.crs is not None


def test_existing_output_with_overwrite_or_resume(world):
    out = world.root / "ow.geojson"
    _detect(world, world.scene, out)
    _detect(world, world.scene, out, "--overwrite")
    res = CliRunner().invoke(cli, ["detect", str(world.scene), "-m", str(world.rgb_model), "-o", str(out),
                                   "--no-progress", "--resume"])
    assert res.exit_code == 0 and "already done" in res.output


@pytest.mark.parametrize("kind", ["rotated", "epsg4326", "nan-float", "uint16-pan", "unicode path"])
def test_unusual_rasters_detect_cleanly(world, kind):
    w = world
    model = w.rgb_model
    if kind == "rotated":
        r = w.raster("rot.tif", transform=Affine(0.094, 0.034, 500000, 0.034, -0.094, 4500000))
    elif kind == "epsg4326":
        r = w.raster("ll.tif", crs="EPSG:4326", transform=Affine(1e-6, 0, 12.5, 0, -1e-6, 41.9))
    elif kind == "nan-float":
        data = paint(np.zeros((0, 4)), 64, 64, dtype="float32")
        data[:, :10] = np.nan
        r = write_raster(w.root / "nan.tif", data, nodata=float("nan"))
        model = w.model("f32.pt", bands=3, dtype="float32")
    elif kind == "uint16-pan":
        r = w.raster("pan.tif", bands=1, dtype="uint16", nodata=0)
        model = w.pan_model
    else:
        d = w.root / "dossier été"
        d.mkdir(exist_ok=True)
        r = w.raster("dossier été/scène 1.tif")
    g, _ = _detect(w, r, w.root / f"{kind.replace(' ', '_')}.geojson", model=model)
    assert g.crs is not None


def test_chip_train_paths_with_unicode_and_spaces(world, tmp_path):
    d = tmp_path / "données d'entraînement"
    d.mkdir()
    r, lab, _ = make_scene(d, "scène", width=128, height=128, n=6, seed=4)
    res = CliRunner().invoke(cli, ["chip", "--imagery", str(r), "--labels", str(lab), "-o", str(d / "puces"),
                                   "--size", "64"])
    assert res.exit_code == 0, res.output
    assert json.loads((d / "puces" / "annotations.json").read_text())["images"]


# ----------------------------------------------------------------------------- faults


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _geonet(*args, **kw):
    # Ctrl-C as in a terminal: the child must not inherit an ignored SIGINT from this test process (Lightning sets
    # SIG_IGN on its KeyboardInterrupt path and never restores it; an ignored SIGINT survives exec, and then
    # geonet never sees the signal -- py-spy showed detect running normally 46 s after the test's SIGINT in CI)
    return subprocess.Popen([sys.executable, "-m", "geonet.cli.main", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_cleans_up(world, tmp_path):
    """A killed multi-scene run leaves a temporary file; --resume finishes and removes it."""
    scenes = []
    for k in range(3):
        r, _, _ = make_scene(tmp_path, f"s{k}", width=1024, height=1024, n=20, seed=k)
        scenes.append(r)
    out = tmp_path / "dets"
    out.mkdir()
    stale = out / ".s1.tmp-999999-abcd.geojson"  # what a killed run leaves (its pid no longer runs)
    stale.write_text("half")
    proc = _geonet("detect", *scenes, "-m", world.rgb_model, "-o", f"{out}/", "--no-progress", "--workers", "1")
    t0 = time.time()
    while not list(out.glob(".s*.tmp-*")) or time.time() - t0 < 2:
        time.sleep(0.05)
        if time.time() - t0 > 120:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    res = _geonet("detect", *scenes, "-m", world.rgb_model, "-o", f"{out}/", "--no-progress", "--resume")
    _, err = res.communicate(timeout=300)
    assert res.returncode == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([f"s{k}.geojson" for k in range(3)] +
                                                           [f"s{k}.qml" for k in range(3)])


@pytest.mark.slow
def test_writer_failure_exits_promptly(world, tmp_path):
    """A file-size limit makes the writer fail: exit 1 in seconds, no temporary file, no reader left."""
    r, _, _ = make_scene(tmp_path, "big", width=2048, height=2048, n=200, seed=5)
    out = tmp_path / "o.geojson"
    script = f"ulimit -f 8; exec {sys.executable} -m geonet.cli.main detect {r} -m {world.rgb_model} -o {out} " \
             "--no-progress --score-thresh 0 --workers 2"
    t0 = time.time()
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert time.time() - t0 < 120
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("geonet: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "o.geojson" in lines[0], proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))


@pytest.mark.slow
def test_sigint_detect_exits_130(world, tmp_path):
    r, _, _ = make_scene(tmp_path, "big2", width=3000, height=3000, n=100, seed=6)
    out = tmp_path / "o.geojson"
    proc = _geonet("detect", r, "-m", world.rgb_model, "-o", out, "--no-progress")
    t0 = time.time()
    while not list(tmp_path.glob(".o.tmp-*")) and time.time() - t0 < 180:  # detection is under way
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.glob(".o.tmp-*"))
