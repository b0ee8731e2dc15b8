import json

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pycocotools.coco import COCO

from geonet.chip import ChipConfig, plan_chips, window_offsets, write_chips
from geonet.georef import affine_from_list, pixel_boxes_to_polygons, to_crs
from geonet.labels import LabelIndex, read_labels
from geonet.raster import describe_raster
from synth import make_scene


@pytest.mark.parametrize("length,size,stride", [(1000, 512, 448), (512, 512, 512), (513, 512, 256), (100, 64, 64),
                                                (37, 64, 32)])
def test_window_offsets_cover_edges(length, size, stride):
    offs = window_offsets(length, size, stride)
    covered = np.zeros(max(length, size), bool)
    for o in offs:
        covered[o:o + size] = True
    assert covered[:length].all()
    assert offs[-1] + size >= length and offs[-1] + size <= max(length, size)
    assert all(b - a <= stride for a, b in zip(offs, offs[1:]))


def _chip(tmp_path, rasters, labels, out="chips", preview=0, **kw):
    infos = [describe_raster(r) for r in rasters]
    cfg = ChipConfig(**kw)
    plan = plan_chips(infos, LabelIndex(read_labels(labels)), cfg)
    rep = write_chips(plan, tmp_path / out, cfg, preview=preview)
    coco = json.loads((tmp_path / out / "annotations.json").read_text())
    return rep, coco


def _scene_boxes_in_crs(coco, tmp_path, out="chips"):
    """Every target box of every chip, mapped to the CRS through the chip's own transform."""
    polys = []
    for im in coco["images"]:
        with rasterio.open(tmp_path / out / im["file_name"]) as src:
            assert src.transform == affine_from_list(im["transform"])
            assert src.crs.to_string() == im["crs"]
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
        b = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in anns]).reshape(-1, 4)
        polys.extend(pixel_boxes_to_polygons(b, src.transform))
    return polys


def test_chips_keep_georeferencing_and_boxes(tmp_path):
    r, lab, boxes = make_scene(tmp_path, width=300, height=260, n=12, margin=0)
    rep, coco = _chip(tmp_path, [r], lab, size=128, stride=96, negative_ratio=1.0)
    COCO(str(tmp_path / "chips" / "annotations.json"))  # pycocotools loads it
    assert rep.labels_inside == 12
    # every label is a whole target in at least one chip, at the right place on the ground
    truth = pixel_boxes_to_polygons(boxes, describe_raster(r).transform)
    got = _scene_boxes_in_crs(coco, tmp_path)
    for t in truth:
        best = max(shapely.area(shapely.intersection(t, g)) / shapely.area(shapely.union(t, g)) for g in got)
        assert best > 0.97


def test_rotated_raster(tmp_path):
    t = Affine(0.08, 0.03, 500000.0, 0.02, -0.12, 4500000.0)
    r, lab, boxes = make_scene(tmp_path, transform=t, width=200, height=200, n=8)
    rep, coco = _chip(tmp_path, [r], lab, size=200)
    got = sorted(tuple(round(v) for v in a["bbox"]) for a in coco["annotations"])
    want = sorted(tuple(round(v) for v in (b[0], b[1], b[2] - b[0], b[3] - b[1])) for b in boxes)
    assert got == want


def test_edge_rule_ignore_regions(tmp_path):
    # one 20x20 object centred on the seam between two 100 px chips: 50 % visible on each side
    from synth import paint, write_labels, write_raster
    b = np.array([[90.0, 40, 110, 60], [70, 10, 100, 20], [100, 75, 106, 95]])
    t = Affine(0.1, 0, 500000, 0, -0.1, 4500000)
    r = write_raster(tmp_path / "s.tif", paint(b, 200, 100), transform=t)
    lab = write_labels(tmp_path / "s.geojson", b, t, "EPSG:32618", label_crs="EPSG:32618")
    rep, coco = _chip(tmp_path, [r], lab, size=100, min_visible=0.5)
    anns = coco["annotations"]
    targets = [a for a in anns if not a["iscrowd"]]
    ignores = [a for a in anns if a["iscrowd"]]
    # box 0: 50/50 -> a target on both sides; box 1: whole in chip 0; box 2: 0 % / 100 % -> target in chip 1
    assert len(targets) == 4 and len(ignores) == 0
    rep, coco = _chip(tmp_path, [r], lab, out="c2", size=100, min_visible=0.6)
    ignores = [a for a in coco["annotations"] if a["iscrowd"]]
    assert len(ignores) == 2 and all(a["ignore"] == 1 for a in ignores)


def test_nodata_windows_skipped_and_16bit(tmp_path):
    r, lab, boxes = make_scene(tmp_path, width=256, height=128, n=4, bands=1, dtype="uint16", nodata=0,
                               nodata_rect=(128, 0, 256, 128), max_side=12)
    info = describe_raster(r)
    assert info.dtype == "uint16" and info.nodata == 0
    # labels only in the left half
    keep = boxes[:, 2] <= 128
    assert keep.any()
    rep, coco = _chip(tmp_path, [r], lab, size=128, negative_ratio=5.0)
    assert rep.skipped_nodata >= 1 if not keep.all() else True
    names = [im["file_name"] for im in coco["images"]]
    assert not any("_128_0" in n for n in names)  # the all-nodata right half is not a chip
    with rasterio.open(tmp_path / "chips" / names[0]) as src:
        assert src.dtypes[0] == "uint16" and src.count == 1 and src.nodata == 0


def test_padding_small_raster(tmp_path):
    r, lab, boxes = make_scene(tmp_path, width=90, height=70, n=3)
    rep, coco = _chip(tmp_path, [r], lab, size=128)
    im = coco["images"][0]
    assert (im["width"], im["height"]) == (128, 128) and len(coco["images"]) == 1
    with rasterio.open(tmp_path / "chips" / im["file_name"]) as src:
        m = src.dataset_mask()
    assert m[:70, :90].all() and not m[70:, :].any() and not m[:, 90:].any()


def _footprints(coco, tmp_path, out, split):
    polys = []
    for im in coco["images"]:
        if im["split"] != split:
            continue
        with rasterio.open(tmp_path / out / im["file_name"]) as src:
            m = src.dataset_mask() > 0
            rows, cols = np.nonzero(m)
            box = np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]])
            polys.append(to_crs(pixel_boxes_to_polygons(box, src.transform), src.crs.to_wkt(), "EPSG:4326")[0])
    return shapely.union_all(polys)


def test_block_split_never_shares_ground(tmp_path):
    # the same ground at two GSDs (like kampala z20/z21): block split must keep it apart
    t1 = Affine(0.2, 0, 500000, 0, -0.2, 4500000)
    t2 = Affine(0.1, 0, 500000, 0, -0.1, 4500000)
    r1, lab, _ = make_scene(tmp_path, "a", width=200, height=200, transform=t1, n=30, max_side=12)
    from synth import paint, write_raster
    r2 = write_raster(tmp_path / "b.tif", paint(np.zeros((0, 4)), 400, 400), transform=t2)
    rep, coco = _chip(tmp_path, [r1, r2], lab, size=64, stride=48, val_fraction=0.25, negative_ratio=10)
    assert rep.split_by == "block" and rep.chips_val > 0 and rep.chips_train > 0
    train = _footprints(coco, tmp_path, "chips", "train")
    val = _footprints(coco, tmp_path, "chips", "val")
    # at most a pixel-wide sliver where block edges round differently at the two GSDs
    assert shapely.area(shapely.intersection(train, val)) < 0.02 * shapely.area(val)


def test_raster_split_groups_overlapping(tmp_path):
    rasters = []
    import geopandas as gpd
    frames = []
    for k in range(5):
        r, l, _ = make_scene(tmp_path, f"s{k}", seed=k, n=5, width=100, height=100)
        rasters.append(r)
        frames.append(gpd.read_file(l))
    allp = tmp_path / "all.geojson"
    gpd.GeoDataFrame(gpd.pd.concat(frames), crs="EPSG:4326").to_file(allp)
    rep, coco = _chip(tmp_path, rasters, allp, size=100, val_fraction=0.2)
    assert rep.split_by == "raster"
    val_sources = {im["source"] for im in coco["images"] if im["split"] == "val"}
    train_sources = {im["source"] for im in coco["images"] if im["split"] == "train"}
    assert val_sources and train_sources and not (val_sources & train_sources)
    assert len(val_sources) == 1


def test_labels_missing_every_raster(tmp_path):
    r, _, _ = make_scene(tmp_path, "a", seed=0)
    _, lab_far, _ = make_scene(tmp_path, "b", seed=50)  # 50 km east
    from geonet.errors import InputError
    with pytest.raises(InputError, match="none of the"):
        plan_chips([describe_raster(r)], LabelIndex(read_labels(lab_far)), ChipConfig(size=64))
