"""Chipping on the real data in ../shared/data (skipped when it is absent)."""

import json

import pytest
from click.testing import CliRunner
from pycocotools.coco import COCO

from geonet.check import check_inputs
from geonet.cli.main import cli
from geonet.labels import read_labels

pytestmark = pytest.mark.shared_data


def _chip(tmp_path, imagery, labels, *extra):
    out = tmp_path / "chips"
    res = CliRunner().invoke(cli, ["chip", "--imagery", str(imagery), "--labels", str(labels), "-o", str(out),
                                   *map(str, extra)])
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "annotations.json").read_text())


def test_neon_one_chip_per_plot_keeps_every_label(shared_data, tmp_path):
    d = shared_data / "neon-trees"
    out, coco = _chip(tmp_path, d / "tiles", d / "labels" / "trees.shp", "--size", 400, "--split", "val=0.2")
    COCO(str(out / "annotations.json"))
    assert len(coco["images"]) == 52
    assert sum(1 for a in coco["annotations"] if not a["iscrowd"]) == 565  # every label, once
    # the split is by plot: no plot in both
    by_split = {}
    for im in coco["images"]:
        by_split.setdefault(im["split"], set()).add(im["source"])
    assert by_split["train"].isdisjoint(by_split["val"]) and len(by_split["val"]) >= 5
    # label counts per plot match the shapefile's `image` field
    labels = read_labels(d / "labels" / "trees.shp")
    import geopandas as gpd
    per_image = gpd.read_file(d / "labels" / "trees.shp")["image"].value_counts().to_dict()
    got = {}
    for im in coco["images"]:
        n = sum(1 for a in coco["annotations"] if a["image_id"] == im["id"])
        got[im["source"].split("/")[-1]] = n
    assert got == per_image
    assert len(labels) == 565


def test_kampala_web_mercator_polygons(shared_data, tmp_path):
    d = shared_data / "kampala-buildings"
    rep = check_inputs([str(p) for p in sorted(d.glob("*.tif"))], read_labels(d / "buildings.geojson"))
    assert [r.labels_inside for r in rep.rasters] == [98, 98, 98]
    gsd = [r.gsd_m[0] for r in rep.rasters]
    assert gsd == pytest.approx([0.2986, 0.1493, 0.0746], rel=2e-3)
    out, coco = _chip(tmp_path, d / "kampala_z19.tif", d / "buildings.geojson", "--size", 256)
    # one chip covers the whole z19 raster: each building is a target or, when the raster edge cuts off more
    # than half of its box, an ignore region. Independent count with geopandas:
    import geopandas as gpd
    import rasterio
    import shapely
    with rasterio.open(d / "kampala_z19.tif") as src:
        frame = shapely.box(*src.bounds)
        b = gpd.read_file(d / "buildings.geojson").to_crs(src.crs).envelope
    vis = b.intersection(frame).area / b.area
    assert len(coco["images"]) == 1
    assert sum(1 for a in coco["annotations"] if not a["iscrowd"]) == int((vis >= 0.5).sum())
    assert sum(1 for a in coco["annotations"] if a["iscrowd"]) == int(((vis > 0) & (vis < 0.5)).sum())
    assert len(coco["annotations"]) == 98


def test_atlanta_uint16_single_band(shared_data, tmp_path):
    d = shared_data / "spacenet-atlanta"
    out, coco = _chip(tmp_path, d / "atlanta_pan.tif", d / "buildings.geojson", "--size", 900, "--preview", 1)
    assert len(coco["images"]) == 1 and len(coco["annotations"]) == 43
    import rasterio
    with rasterio.open(out / coco["images"][0]["file_name"]) as src:
        assert src.count == 1 and src.dtypes[0] == "uint16" and src.nodata == 0
    assert list((out / "preview").glob("*.png"))
