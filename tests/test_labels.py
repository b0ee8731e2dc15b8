import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine

from geonet.errors import InputError
from geonet.labels import LabelIndex, label_window, read_labels
from geonet.raster import describe_raster
from synth import make_scene


def _write(tmp_path, geoms, crs="EPSG:4326", name="l.geojson", **cols):
    p = tmp_path / name
    gpd.GeoDataFrame({"geometry": geoms, **cols}, crs=crs).to_file(p, engine="pyogrio")
    return p


def test_reprojected_boxes_match_pixels(tmp_path):
    r, lab, boxes = make_scene(tmp_path, n=10)
    info = describe_raster(r)
    rb = LabelIndex(read_labels(lab)).for_raster(info)
    order = np.argsort(rb.label_idx)
    # EPSG:4326 rectangles reprojected to UTM are slightly rotated quads; envelopes grow by < 0.05 px
    np.testing.assert_allclose(rb.boxes[order], boxes, atol=0.05)


def test_repair_and_empty_counted(tmp_path):
    bowtie = shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1), (0, 0)])
    p = _write(tmp_path, [shapely.box(0, 0, 1, 1), bowtie, shapely.Polygon()], crs="EPSG:32618")
    ls = read_labels(p)
    assert len(ls) == 2 and ls.n_empty == 1 and ls.n_repaired == 1
    assert all(shapely.is_valid(ls.geometries))


def test_classes_contiguous(tmp_path):
    p = _write(tmp_path, [shapely.box(0, 0, 1, 1)] * 3, crs="EPSG:32618", kind=["pool", "car", "pool"])
    ls = read_labels(p, class_field="kind")
    assert ls.classes == ["car", "pool"] and ls.class_ids.tolist() == [2, 1, 2]
    assert read_labels(p).classes == ["l"]  # default: one class named after the file


@pytest.mark.parametrize("case", ["nocrs", "empty", "field", "missing", "notvector"])
def test_label_errors(tmp_path, case):
    if case == "nocrs":  # a Shapefile without its .prj (a GeoJSON without "crs" is WGS 84 by RFC 7946)
        p = _write(tmp_path, [shapely.box(0, 0, 1, 1)], crs=None, name="l.shp")
        match = "no CRS"
    elif case == "empty":
        p = tmp_path / "e.geojson"
        p.write_text('{"type": "FeatureCollection", "features": []}')
        match = "no features"
    elif case == "field":
        p = _write(tmp_path, [shapely.box(0, 0, 1, 1)], crs="EPSG:4326")
        match = "--class-field"
    elif case == "missing":
        p = tmp_path / "nope.shp"
        match = "no such file"
    else:
        p = tmp_path / "x.geojson"
        p.write_text("this is not json")
        match = "not a vector file"
    with pytest.raises(InputError, match=match) as ei:
        read_labels(p, class_field="kind" if case == "field" else None)
    assert "\n" not in str(ei.value) and ei.value.exit_code == 2


def test_points_get_point_size(tmp_path):
    t = Affine(0.5, 0, 500000, 0, -0.5, 4500000)
    from synth import paint, write_raster
    r = write_raster(tmp_path / "r.tif", paint(np.zeros((0, 4)), 100, 100), transform=t)
    p = _write(tmp_path, [shapely.Point(500010.0, 4499990.0)], crs="EPSG:32618")
    rb = LabelIndex(read_labels(p), point_size=3.0).for_raster(describe_raster(r))
    # 3 ground metres at 0.5 m GSD = 6 px (UTM scale factor makes it 5.998)
    np.testing.assert_allclose(rb.boxes, [[17, 17, 23, 23]], atol=0.01)


def test_window_rule(tmp_path):
    from geonet.labels import RasterBoxes
    rb = RasterBoxes(np.array([[90.0, 10, 110, 30], [95, 50, 115, 70], [20, 20, 40, 40]]), np.array([1, 1, 1]),
                     np.arange(3))
    wl = label_window(rb, 0, 0, 100, 100, clip=(0, 0, 1000, 1000), min_visible=0.5)
    # 50 % visible -> kept, clipped; 25 % visible -> ignore region; inside -> kept whole
    assert wl.boxes.tolist() == [[90, 10, 100, 30], [20, 20, 40, 40]]
    assert wl.ignore.tolist() == [[95, 50, 100, 70]]
    wl2 = label_window(rb, 100, 0, 100, 100, clip=(0, 0, 1000, 1000), min_visible=0.5)
    assert wl2.boxes.tolist() == [[0, 10, 10, 30], [0, 50, 15, 70]]  # window frame
