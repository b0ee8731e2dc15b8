import numpy as np
import pytest
import shapely
from affine import Affine

from geonet.georef import (crs_to_pixel, geometries_to_pixel, gsd_metres, pixel_boxes_to_polygons, pixel_to_crs,
                           to_crs)

ROTATED = Affine(0.08, 0.03, 500000.0, 0.02, -0.12, 4500000.0)  # rotated, sheared, non-square pixels


def test_corner_convention():
    t = Affine(0.5, 0, 100.0, 0, -0.5, 200.0)
    X, Y = pixel_to_crs(t, np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    assert (X[0], Y[0]) == (100.0, 200.0)  # outer corner of the top-left pixel, no half-pixel shift
    assert (X[1], Y[1]) == (100.5, 199.5)


@pytest.mark.parametrize("t", [Affine(0.1, 0, 5e5, 0, -0.1, 4.5e6), ROTATED])
def test_roundtrip(t):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1000, 50), rng.uniform(0, 1000, 50)
    X, Y = pixel_to_crs(t, x, y)
    x2, y2 = crs_to_pixel(t, X, Y)
    np.testing.assert_allclose(x2, x, atol=1e-6)
    np.testing.assert_allclose(y2, y, atol=1e-6)


def test_box_polygon_box_rotated():
    boxes = np.array([[10, 20, 30, 45], [0, 0, 1, 1.5]])
    polys = pixel_boxes_to_polygons(boxes, ROTATED)
    # a rotated raster's pixel box is a parallelogram in the CRS, not a rectangle
    assert not shapely.equals(polys[0], shapely.envelope(polys[0]))
    back = shapely.bounds(geometries_to_pixel(polys, ROTATED))
    np.testing.assert_allclose(back, boxes, atol=1e-6)


def test_gsd_projected_geographic_and_web_mercator():
    gx, gy = gsd_metres("EPSG:32618", Affine(0.1, 0, 730000, 0, -0.2, 4700000), 100, 100)
    assert gx == pytest.approx(0.1, rel=1e-3) and gy == pytest.approx(0.2, rel=1e-3)
    # Web Mercator at 60 deg N: a nominal metre is cos(lat) / sqrt(1 - e2 sin2(lat)) ground metres on WGS 84
    X, Y = to_crs(np.array([shapely.Point(10, 60)]), "EPSG:4326", "EPSG:3857")[0].coords[0]
    gx, _ = gsd_metres("EPSG:3857", Affine(1.0, 0, X - 50, 0, -1.0, Y + 50), 100, 100)
    e2 = 0.00669437999014
    lat = np.radians(60)
    assert gx == pytest.approx(np.cos(lat) / np.sqrt(1 - e2 * np.sin(lat) ** 2), rel=1e-4)
    # geographic: 1e-5 degree of latitude is ~1.1 m
    _, gy = gsd_metres("EPSG:4326", Affine(1e-5, 0, 10, 0, -1e-5, 45), 100, 100)
    assert gy == pytest.approx(1.111, rel=1e-2)

