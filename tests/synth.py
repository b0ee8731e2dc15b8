"""Tiny seeded synthetic data for the tests: georeferenced rasters with known objects and labels.

Objects are bright rectangles on a textured background, so a detector can learn them in seconds.
Every function takes a seed or is deterministic.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from affine import Affine

from geonet.georef import pixel_boxes_to_polygons, to_crs


def random_boxes(rng, n, width, height, min_side=8, max_side=24, margin=0):
    """``[n, 4]`` integer pixel boxes inside ``[margin, W - margin)`` that do not overlap each other."""
    boxes = []
    tries = 0
    while len(boxes) < n and tries < 10000:
        tries += 1
        w, h = rng.integers(min_side, max_side + 1, size=2)
        x = rng.integers(margin, width - margin - w + 1)
        y = rng.integers(margin, height - margin - h + 1)
        b = np.array([x, y, x + w, y + h], dtype=float)
        if all(b[2] + 2 <= o[0] or o[2] + 2 <= b[0] or b[3] + 2 <= o[1] or o[3] + 2 <= b[1] for o in boxes):
            boxes.append(b)
    return np.array(boxes).reshape(-1, 4)


def paint(boxes, width, height, *, bands=3, dtype="uint8", seed=0, nodata_rect=None, nodata=None,
          background=60, value=220):
    """``[bands, H, W]`` image: noisy background with bright ``boxes``; ``nodata_rect`` filled with ``nodata``."""
    rng = np.random.default_rng(seed)
    scale = 1 if dtype == "uint8" else 40
    img = rng.normal(background, 12, size=(bands, height, width))
    for x1, y1, x2, y2 in boxes.astype(int):
        img[:, y1:y2, x1:x2] = value + rng.normal(0, 6, size=(bands, y2 - y1, x2 - x1))
    img = np.clip(img, 1, 254) * scale
    if nodata_rect is not None:
        x1, y1, x2, y2 = nodata_rect
        img[:, y1:y2, x1:x2] = nodata
    return img.astype(dtype)


def write_raster(path, data, *, crs="EPSG:32618", transform=None, nodata=None, tiled=False):
    bands, h, w = data.shape
    transform = transform or Affine(0.1, 0, 500000.0, 0, -0.1, 4500000.0)
    profile = dict(driver="GTiff", width=w, height=h, count=bands, dtype=data.dtype.name, crs=crs,
                   transform=transform, nodata=nodata)
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return Path(path)


def write_labels(path, boxes, transform, raster_crs, *, label_crs="EPSG:4326", classes=None, driver=None):
    """Write pixel ``boxes`` as polygons in ``label_crs`` (reprojected from the raster CRS)."""
    polys = pixel_boxes_to_polygons(boxes, transform)
    if label_crs is not None:
        polys = to_crs(polys, raster_crs, label_crs)
    data = {"geometry": list(polys)}
    if classes is not None:
        data["kind"] = list(classes)
    gdf = gpd.GeoDataFrame(data, crs=label_crs)
    gdf.to_file(path, driver=driver, engine="pyogrio")
    return Path(path)


def make_scene(tmp_path, name="scene", *, width=300, height=260, n=12, seed=0, crs="EPSG:32618",
               transform=None, label_crs="EPSG:4326", bands=3, dtype="uint8", nodata=None, nodata_rect=None,
               min_side=8, max_side=24, classes=None, margin=0):
    """A raster and its label file. Returns ``(raster_path, labels_path, boxes)``; boxes in pixels."""
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, n, width, height, min_side, max_side, margin)
    transform = transform or Affine(0.1, 0, 500000.0 + 1000 * seed, 0, -0.1, 4500000.0)
    data = paint(boxes, width, height, bands=bands, dtype=dtype, seed=seed, nodata_rect=nodata_rect, nodata=nodata)
    r = write_raster(Path(tmp_path) / f"{name}.tif", data, crs=crs, transform=transform, nodata=nodata)
    cls = None if classes is None else [classes[k % len(classes)] for k in range(len(boxes))]
    lab = write_labels(Path(tmp_path) / f"{name}.geojson", boxes, transform, crs, label_crs=label_crs, classes=cls)
    return r, lab, boxes


def shapely_boxes(boxes):
    return shapely.box(*np.asarray(boxes).T)
