"""The one pixel <-> CRS convention of geonet.

**Pixel frame.** ``x`` is the column and ``y`` the row, both continuous and measured from the
*outer corner* of the top-left pixel: pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``
and its centre is ``(col + 0.5, row + 0.5)``. Boxes are ``[x1, y1, x2, y2]`` in this frame with
``x1 < x2`` and ``y1 < y2`` (torchvision's convention); COCO ``bbox`` fields are
``[x1, y1, x2 - x1, y2 - y1]`` in the same frame. There is no half-pixel shift anywhere.

**Pixel -> CRS.** Through the raster's affine transform ``A`` (GDAL geotransform order as
``rasterio.Affine(a, b, c, d, e, f)``)::

    X = a * x + b * y + c
    Y = d * x + e * y + f

so ``A * (0, 0)`` is the outer corner of the top-left pixel (GDAL's "area" convention,
``AREA_OR_POINT=Area``). The inverse is ``~A``. Nothing assumes north-up or square pixels: ``b`` and
``d`` (rotation/shear) and ``a != -e`` (non-square pixels) are carried through every mapping, so an
axis-aligned pixel box maps to a parallelogram in the CRS (:func:`pixel_boxes_to_polygons`) and a CRS
polygon maps to its exact pixel-frame image before its envelope is taken
(:func:`geometries_to_pixel`).

**Windows.** A window ``(col_off, row_off, width, height)`` has the affine transform
``A @ Affine.translation(col_off, row_off)`` (``rasterio.windows.transform``); boxes move between a
window and its scene by adding or subtracting ``(col_off, row_off)``.

**GSD.** :func:`gsd_metres` measures the ground distance covered by one pixel step along the
column and row axes at the raster's centre, geodesically on the WGS 84 ellipsoid. It is correct for
any CRS -- projected in metres or feet, geographic in degrees, or Web Mercator (whose nominal metre
is ``1 / cos(latitude)`` ground metres).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Geod, Transformer

__all__ = [
    "affine_from_list",
    "affine_to_list",
    "geometries_to_pixel",
    "gsd_metres",
    "pixel_boxes_to_polygons",
    "pixel_to_crs",
    "crs_to_pixel",
    "to_crs",
]

_GEOD = Geod(ellps="WGS84")


def affine_to_list(transform: Affine) -> list[float]:
    """``[a, b, c, d, e, f]`` of a :class:`affine.Affine` (rasterio / GDAL order), for JSON output."""
    return [float(v) for v in tuple(transform)[:6]]


def affine_from_list(values: Sequence[float]) -> Affine:
    """Inverse of :func:`affine_to_list`."""
    if len(values) < 6:
        raise ValueError(f"an affine transform needs 6 coefficients, got {len(values)}")
    return Affine(*[float(v) for v in values[:6]])


def pixel_to_crs(transform: Affine, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map pixel-frame coordinates (corner convention) to CRS coordinates.

    Args:
        transform: the raster's (or window's) affine transform.
        x, y: float arrays of the same shape, column and row in pixels.

    Returns:
        ``(X, Y)`` float64 arrays of the same shape, in CRS units.
    """
    a, b, c, d, e, f = tuple(transform)[:6]
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return a * x + b * y + c, d * x + e * y + f


def crs_to_pixel(transform: Affine, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pixel_to_crs`: CRS coordinates to pixel-frame ``(x, y)`` float64 arrays."""
    return pixel_to_crs(~transform, X, Y)


def geometries_to_pixel(geometries: np.ndarray, transform: Affine) -> np.ndarray:
    """Map shapely geometries from the raster's CRS to its pixel frame.

    Every vertex goes through ``~transform``, so rotated and non-square pixels are exact. The
    pixel-frame envelope of the result (``shapely.bounds``) is the label's box.

    Args:
        geometries: array of shapely geometries in the raster's CRS.
        transform: the raster's affine transform.

    Returns:
        Array of shapely geometries in pixel coordinates (x = column, y = row).
    """
    inv = ~transform
    # shapely's matrix is [a, b, d, e, xoff, yoff]: x' = a x + b y + xoff, y' = d x + e y + yoff
    return shapely.transform(
        np.asarray(geometries, dtype=object),
        lambda xy: np.column_stack(pixel_to_crs(inv, xy[:, 0], xy[:, 1])),
    )


def pixel_boxes_to_polygons(boxes: np.ndarray, transform: Affine) -> np.ndarray:
    """Turn pixel-frame boxes into CRS polygons.

    Args:
        boxes: float array ``[N, 4]`` of ``[x1, y1, x2, y2]`` in pixels (corner convention).
        transform: the affine transform of the frame the boxes are in (scene or window).

    Returns:
        Array ``[N]`` of shapely Polygons in the transform's CRS. With rotated or sheared pixels the
        polygons are parallelograms, not rectangles. Ring order is x1y1 -> x2y1 -> x2y2 -> x1y2.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    xs = boxes[:, [0, 2, 2, 0]]  # [N, 4] corner columns
    ys = boxes[:, [1, 1, 3, 3]]  # [N, 4] corner rows
    X, Y = pixel_to_crs(transform, xs, ys)
    coords = np.stack([X, Y], axis=-1)  # [N, 4, 2]
    return shapely.polygons(coords)


def to_crs(geometries: np.ndarray, src: CRS | str, dst: CRS | str) -> np.ndarray:
    """Reproject shapely geometries with pyproj (``always_xy``: x = easting/longitude)."""
    src_crs, dst_crs = CRS.from_user_input(src), CRS.from_user_input(dst)
    if src_crs == dst_crs:
        return np.asarray(geometries, dtype=object)
    tr = Transformer.from_crs(src_crs, dst_crs, always_xy=True)
    return shapely.transform(
        np.asarray(geometries, dtype=object), lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1]))
    )


def gsd_metres(crs: CRS | str, transform: Affine, width: int, height: int) -> tuple[float, float]:
    """Ground sample distance in metres along the column and row axes, at the raster's centre.

    One pixel step along each axis is mapped to the CRS, then to longitude/latitude, and measured
    geodesically on the WGS 84 ellipsoid (``pyproj.Geod.inv``).

    Args:
        crs: the raster's CRS.
        transform: its affine transform.
        width, height: its size in pixels.

    Returns:
        ``(gsd_x, gsd_y)`` in metres per pixel.

    Examples:
        >>> from affine import Affine
        >>> gx, gy = gsd_metres("EPSG:32618", Affine(0.1, 0, 730000, 0, -0.1, 4700000), 400, 400)
        >>> round(gx, 6), round(gy, 6)
        (0.1, 0.1)
    """
    crs = CRS.from_user_input(crs)
    cx, cy = width / 2.0, height / 2.0
    xs = np.array([cx, cx + 1.0, cx])
    ys = np.array([cy, cy, cy + 1.0])
    X, Y = pixel_to_crs(transform, xs, ys)
    if not crs.is_geographic:
        to_ll = Transformer.from_crs(crs, crs.geodetic_crs or "EPSG:4326", always_xy=True)
        X, Y = to_ll.transform(X, Y)
    _, _, dx = _GEOD.inv(X[0], Y[0], X[1], Y[1])
    _, _, dy = _GEOD.inv(X[0], Y[0], X[2], Y[2])
    return float(dx), float(dy)
