"""`geonet chip` / `geonet check` from the command line, and every bad input of the chipping issue."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from geonet.cli.main import cli
from synth import make_scene, paint, write_raster


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def scene(tmp_path):
    r, lab, boxes = make_scene(tmp_path, n=10)
    return tmp_path, r, lab


def test_chip_ok_with_preview(scene):
    tmp, r, lab = scene
    out = tmp / "new" / "out"  # missing parent folders are created, as mkdir -p would
    res = run("chip", "--imagery", r, "--labels", lab, "-o", out, "--size", 128, "--stride", 100,
              "--preview", 2)
    assert res.exit_code == 0, res.output
    assert "chips" in res.output
    assert len(list((out / "preview").glob("*.png"))) == 2
    coco = json.loads((out / "annotations.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "scene", "supercategory": "object"}]


def test_check_report(scene):
    tmp, r, lab = scene
    res = run("check", "--imagery", tmp, "--labels", lab, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["rasters"][0]["labels_inside"] == 10 and rep["labels_outside"] == 0
    assert rep["rasters"][0]["gsd_m"] == [0.1, 0.1]
    assert rep["box_m"]["side"][0] == pytest.approx(rep["box_px"]["side"][0] * 0.1, rel=0.01)


def _bad(case, tmp, r, lab):
    """Return (args, expected exit code, text the message must contain)."""
    out = tmp / "out"
    base = ["chip", "--imagery", r, "--labels", lab, "-o", out, "--size", 128]
    if case == "missing-file":
        return ["chip", "--imagery", tmp / "nope.tif", "--labels", lab, "-o", out], 2, "nope.tif"
    if case == "not-a-raster":
        p = tmp / "notes.tif"
        p.write_text("hello, I am not a GeoTIFF")
        return ["chip", "--imagery", p, "--labels", lab, "-o", out], 2, "notes.tif: is not a raster"
    if case == "labels-no-crs":
        # a Shapefile without its .prj (a GeoJSON without "crs" is WGS 84 by RFC 7946)
        p = tmp / "nocrs.shp"
        import geopandas as gpd
        gpd.read_file(lab).to_crs("EPSG:32618").set_crs(None, allow_override=True).to_file(p)
        return ["chip", "--imagery", r, "--labels", p, "-o", out], 2, "no CRS"
    if case == "labels-miss":
        _, far, _ = make_scene(tmp, "far", seed=77)
        return ["chip", "--imagery", r, "--labels", far, "-o", out], 2, "far.geojson: none of the"
    if case == "labels-empty":
        p = tmp / "empty.geojson"
        p.write_text('{"type": "FeatureCollection", "features": []}')
        return ["chip", "--imagery", r, "--labels", p, "-o", out], 2, "empty.geojson: the label file holds no"
    if case == "class-field":
        return base + ["--class-field", "nosuchfield"], 2, "--class-field"
    if case == "raster-no-crs":
        p = write_raster(tmp / "nocrs.tif", paint(np.zeros((0, 4)), 64, 64), crs=None)
        return ["chip", "--imagery", p, "--labels", lab, "-o", out], 2, "nocrs.tif: the raster has no CRS"
    if case == "truncated":
        # labels all over it, so the chipper must read the missing half
        p, lab2, _ = make_scene(tmp, "trunc", width=512, height=512, n=30, seed=3)
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)
        return ["chip", "--imagery", p, "--labels", lab2, "-o", out, "--size", 128], 1, "trunc.tif: GDAL failed"
    if case == "size-zero":
        return base[:-1] + [0], 2, "--size"
    if case == "stride-gt-size":
        return base + ["--stride", 200], 2, "--stride"
    raise AssertionError(case)


CASES = ["missing-file", "not-a-raster", "labels-no-crs", "labels-miss", "labels-empty", "class-field",
         "raster-no-crs", "truncated", "size-zero", "stride-gt-size"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(scene, case):
    tmp, r, lab = scene
    args, code, needle = _bad(case, tmp, r, lab)
    res = CliRunner().invoke(cli, [str(a) for a in args])
    msg = res.output.strip()
    assert res.exit_code == code, msg
    assert "Traceback" not in msg and res.exception is None or isinstance(res.exception, SystemExit)
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    assert len(lines) == 1, msg
    assert lines[0].startswith("Error: ") and needle in lines[0], msg
    assert "Fix:" in lines[0] or "--size" in lines[0] or "--stride" in lines[0] or "--help" in lines[0], msg
    # nothing half-written
    assert not (tmp / "out").exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".out.tmp")]


def test_existing_output_needs_overwrite(scene):
    tmp, r, lab = scene
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("x")
    res = CliRunner().invoke(cli, ["chip", "--imagery", str(r), "--labels", str(lab), "-o", str(tmp / "out")])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (tmp / "out" / "keep.txt").exists()
    res = run("chip", "--imagery", r, "--labels", lab, "-o", tmp / "out", "--size", 128, "--overwrite")
    assert res.exit_code == 0 and not (tmp / "out" / "keep.txt").exists()


def test_version_and_verbosity():
    res = run("--version")
    assert res.exit_code == 0 and "geonet" in res.output
    assert run("-q", "--help").exit_code == 0
