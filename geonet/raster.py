"""Reading rasters: anything GDAL reads (GeoTIFF, COG, VRT, JPEG2000, PNG...), lazily, window by window.

A :class:`RasterSource` holds a path, the bands to read (1-based, in output order) and the nodata
value, and opens one GDAL dataset handle per process the first time it is read from, so it can be
handed to DataLoader workers. Nothing here loads a whole scene: every read is a window.

Nodata rule: a pixel is nodata when *every* selected band equals the nodata value (NaN counts as
equal to a NaN nodata). Without a nodata value, GDAL's per-dataset mask or an alpha band decides;
without either, every pixel is valid.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from geonet.errors import InputError, RunError
from geonet.georef import gsd_metres
from geonet.remote import RemoteRaster, apply_cog_config, is_remote, is_stac_item, stac_asset_href

__all__ = ["RASTER_SUFFIXES", "RasterInfo", "RasterSource", "find_rasters", "describe_raster", "open_raster"]

#: File endings picked up when a folder is given as imagery.
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img", ".png", ".jpg", ".jpeg")


def find_rasters(inputs: Sequence[str | os.PathLike[str]], *, option: str = "--imagery",
                 asset: str | None = None) -> list[Path | RemoteRaster]:
    """Expand files, folders, glob patterns, URLs and STAC items into a list of raster paths.

    A folder contributes the files directly inside it whose suffix is in :data:`RASTER_SUFFIXES`. A URL
    (``https://``, ``s3://``, ``/vsicurl/``...) becomes a :class:`geonet.remote.RemoteRaster`; a STAC item
    (``.json`` file or URL) becomes its ``asset`` (:func:`geonet.remote.stac_asset_href`).

    Raises:
        InputError: a path does not exist, a glob matches nothing, a folder holds no raster, a STAC item
            without the asset.
    """
    found: list[Path | RemoteRaster] = []
    for item in inputs:
        text = str(item)
        if is_stac_item(text) and (is_remote(text) or Path(text).is_file()):
            text = stac_asset_href(text, asset, option=option)
            if text.startswith("file://"):
                text = text[len("file://"):]
        if is_remote(text):
            found.append(RemoteRaster(text))
            continue
        path = Path(text)
        if any(ch in text for ch in "*?[") and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(text))
            if not matches:
                raise InputError(f"{option}: the pattern {text!r} matches no file.", fix="check the pattern.")
            found.extend(m for m in matches if m.is_file())
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)
            if not files:
                raise InputError(
                    f"{option}: folder {text} holds no raster ({', '.join(RASTER_SUFFIXES)}).",
                    fix="point it at the folder that holds the GeoTIFFs, or list the files.",
                )
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{option}: no such file or folder: {text}.", fix="check the path.")
    # keep order, drop duplicates
    seen: set[Path | RemoteRaster] = set()
    unique = []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def open_raster(path: str | os.PathLike[str]) -> rasterio.DatasetReader:
    """Open a raster with GDAL, translating GDAL's failures into one-line :class:`InputError`\\ s."""
    remote = is_remote(path)
    if remote:
        apply_cog_config()
    elif not Path(path).exists():
        raise InputError("no such file.", path=path, fix="check the path.")
    try:
        with warnings.catch_warnings():
            # plain PNG/JPEG image sets (COCO, VOC) have no georeferencing; callers check info.crs
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(str(path))
    except RasterioIOError as exc:
        msg = str(exc)
        if remote:
            raise InputError(f"cannot be read over the network ({_first_line(msg)}).", path=path,
                             fix="check the URL (a GeoTIFF/COG the machine can reach) and, for s3:// gs:// az://, "
                                 "the credentials in the environment.") from None
        if "not recognized as" in msg or "not a supported file format" in msg or "NotSupported" in msg:
            raise InputError(
                "is not a raster that GDAL can read.",
                path=path,
                fix="pass GeoTIFF/COG/VRT imagery as --imagery (vector labels go in --labels).",
            ) from None
        raise InputError(
            f"cannot be opened as a raster ({_first_line(msg)}); the file may be truncated or corrupt.",
            path=path,
            fix="re-download or re-export it.",
        ) from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown GDAL error"


@dataclass(frozen=True)
class RasterInfo:
    """What geonet needs to know about one raster, read from its header only.

    Attributes:
        path: file path.
        crs: CRS as a PROJ/WKT string (``None`` if the file has none).
        epsg: EPSG code when one matches, else ``None``.
        transform: affine transform, pixel corner -> CRS (see :mod:`geonet.georef`).
        width, height: size in pixels.
        count: bands in the file.
        bands: the 1-based band indexes geonet reads, in order.
        dtype: numpy dtype name of the selected bands (``uint8``, ``uint16``, ``float32``...).
        nodata: the nodata value used (from ``--nodata`` or the file), or ``None``.
        gsd: ``(gsd_x, gsd_y)`` in metres per pixel (``None`` without a CRS).
        block_shape: ``(rows, cols)`` of the internal blocks of the first band.
        tiled: whether the file is internally tiled.
    """

    path: str
    crs: str | None
    epsg: int | None
    transform: Affine
    width: int
    height: int
    count: int
    bands: tuple[int, ...]
    dtype: str
    nodata: float | None
    gsd: tuple[float, float] | None
    block_shape: tuple[int, int]
    tiled: bool
    crs_warning: str | None = field(default=None)

    @property
    def gsd_mean(self) -> float | None:
        """Geometric mean of the two GSD components in metres (``None`` without a CRS)."""
        return None if self.gsd is None else float(np.sqrt(self.gsd[0] * self.gsd[1]))

    @property
    def georeferenced(self) -> bool:
        """A CRS and a geotransform (GDAL gives the identity transform to a raster without one)."""
        t = self.transform
        return self.crs is not None and not (t.is_identity or (t.a == 1 and t.e == 1 and t.c == 0 and t.f == 0))

    @property
    def crs_label(self) -> str | None:
        """``"EPSG:n"`` when the CRS has an EPSG code, else its WKT (``None`` without a CRS)."""
        if self.crs is None:
            return None
        return f"EPSG:{self.epsg}" if self.epsg else self.crs

    def footprint(self, box: Sequence[float] | None = None, *, crs: str | None = None):
        """The outline of ``box`` (pixel frame ``[x1, y1, x2, y2]``; default the whole raster) as a shapely
        polygon in the raster's CRS, or reprojected to ``crs`` (e.g. ``"EPSG:4326"``). A parallelogram
        when the pixels are rotated."""
        from geonet.georef import pixel_boxes_to_polygons, to_crs

        b = [0, 0, self.width, self.height] if box is None else list(box)
        poly = pixel_boxes_to_polygons(np.array([b], dtype=float), self.transform)
        if crs is not None:
            poly = to_crs(poly, self.crs, crs)
        return poly[0]


def _default_bands(src: rasterio.DatasetReader) -> tuple[int, ...]:
    """All bands except those GDAL interprets as alpha (alpha is used as the validity mask)."""
    bands = tuple(i + 1 for i, ci in enumerate(src.colorinterp) if ci != ColorInterp.alpha)
    return bands or tuple(range(1, src.count + 1))


def parse_bands(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """Parse ``--bands`` (``"3,2,1"``) into a tuple of 1-based band indexes."""
    if text is None or text == "":
        return None
    if isinstance(text, str):
        try:
            bands = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
        except ValueError:
            raise InputError(f"--bands: {text!r} is not a comma-separated list of band numbers.",
                             fix="use e.g. --bands 3,2,1 (1-based).") from None
    else:
        bands = tuple(int(b) for b in text)
    if not bands or min(bands) < 1:
        raise InputError(f"--bands: {text!r}: band numbers start at 1.", fix="use e.g. --bands 1,2,3.")
    return bands


def _crs_warning(src: rasterio.DatasetReader) -> str | None:
    crs = src.crs
    if crs is None:
        return None
    t = src.transform
    if crs.is_geographic:
        left, bottom, right, top = src.bounds
        if not (-180.5 <= left <= 360.5 and -90.5 <= bottom <= 90.5 and -180.5 <= right <= 360.5
                and -90.5 <= top <= 90.5):
            return ("the CRS is geographic (degrees) but the bounds are far outside +-180/+-90: the CRS is "
                    "probably wrong; assign the projected CRS the coordinates are in with "
                    "`gdal_edit.py -a_srs EPSG:XXXX file.tif`.")
        if abs(t.a) > 0.1:
            return "the pixel size is over 0.1 degree (~10 km): check the CRS and transform."
    else:
        if abs(t.a) < 1e-6 and abs(t.b) < 1e-6:
            return ("pixel size below a micrometre in a projected CRS: the coordinates look like degrees; "
                    "assign EPSG:4326 with `gdal_edit.py -a_srs EPSG:4326 file.tif`.")
    if t.is_identity or (t.a == 1 and t.e == 1 and t.c == 0 and t.f == 0):
        return "the affine transform is the identity: the raster is not georeferenced."
    return None


def describe_raster(path: str | os.PathLike[str], *, bands: Sequence[int] | None = None,
                    nodata: float | None = None) -> RasterInfo:
    """Read a raster's header into a :class:`RasterInfo`.

    Args:
        path: raster path.
        bands: 1-based bands to read, in order (default: every non-alpha band).
        nodata: override for the file's nodata value.

    Raises:
        InputError: the file is missing, unreadable, or a requested band does not exist.
    """
    with open_raster(path) as src:
        sel = tuple(bands) if bands else _default_bands(src)
        if max(sel) > src.count:
            raise InputError(f"--bands {','.join(map(str, sel))}: the raster has only {src.count} band(s).",
                             path=path, fix=f"choose bands between 1 and {src.count}.")
        dtypes = {src.dtypes[b - 1] for b in sel}
        dtype = np.result_type(*[np.dtype(d) for d in dtypes]).name
        nd = nodata if nodata is not None else src.nodatavals[sel[0] - 1]
        crs = src.crs
        gsd = None
        epsg = None
        if crs is not None:
            gsd = gsd_metres(crs.to_wkt(), src.transform, src.width, src.height)
            epsg = crs.to_epsg()
        block = src.block_shapes[0] if src.block_shapes else (1, src.width)
        return RasterInfo(
            path=str(path),
            crs=None if crs is None else crs.to_wkt(),
            epsg=epsg,
            transform=src.transform,
            width=src.width,
            height=src.height,
            count=src.count,
            bands=sel,
            dtype=dtype,
            nodata=None if nd is None else float(nd),
            gsd=gsd,
            block_shape=(int(block[0]), int(block[1])),
            tiled=bool(src.profile.get("tiled", False)),
            crs_warning=_crs_warning(src),
        )


class RasterSource:
    """Lazy, picklable reader of windows from one raster.

    One GDAL dataset handle is opened per process on first use (DataLoader workers each get their
    own, as GDAL handles must not be shared between threads or processes).

    Args:
        info: the raster's :class:`RasterInfo` (from :func:`describe_raster`).
    """

    def __init__(self, info: RasterInfo):
        self.info = info
        self._ds: rasterio.DatasetReader | None = None
        self._pid: int | None = None
        self._mask_from_gdal: bool | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None
        state["_pid"] = None
        return state

    @property
    def dataset(self) -> rasterio.DatasetReader:
        if self._ds is None or self._pid != os.getpid():
            self._ds = open_raster(self.info.path)
            self._pid = os.getpid()
            flags = self._ds.mask_flag_enums[self.info.bands[0] - 1]
            self._mask_from_gdal = self.info.nodata is None and (
                MaskFlags.per_dataset in flags or MaskFlags.alpha in flags
            )
        return self._ds

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None

    @property
    def fill_value(self) -> float:
        """Value written into pixels outside the raster or masked: the nodata value, else 0."""
        nd = self.info.nodata
        return 0.0 if nd is None or np.isnan(nd) else nd

    def read(self, window: Window, *, out_size: tuple[int, int] | None = None,
             resampling: Resampling = Resampling.bilinear) -> tuple[np.ndarray, np.ndarray]:
        """Read a window of the selected bands, padding what lies outside the raster.

        Args:
            window: window in this raster's pixel frame; it may extend past the edges.
            out_size: ``(height, width)`` to resample the window to (GDAL resampling on read, using
                overviews where they exist); default: the window's own size.
            resampling: GDAL resampling used when ``out_size`` differs from the window size.

        Returns:
            ``(data, valid)``: ``data`` is ``[C, H, W]`` in the raster's dtype, ``valid`` is a
            ``[H, W]`` bool mask, False for nodata and for padding outside the raster.

        Raises:
            RunError: GDAL fails to decode the data (a truncated or corrupt file).
        """
        ds = self.dataset
        info = self.info
        wh = (int(round(window.height)), int(round(window.width)))
        out_h, out_w = out_size if out_size is not None else wh
        nb = len(info.bands)
        data = np.full((nb, out_h, out_w), self.fill_value, dtype=info.dtype)
        valid = np.zeros((out_h, out_w), dtype=bool)
        full = Window(0, 0, info.width, info.height)
        try:
            inner = window.intersection(full)
        except rasterio.errors.WindowError:
            return data, valid  # entirely outside
        sx = out_w / window.width
        sy = out_h / window.height
        # destination slice of the inner part
        c0 = int(round((inner.col_off - window.col_off) * sx))
        r0 = int(round((inner.row_off - window.row_off) * sy))
        iw = max(1, min(out_w - c0, int(round(inner.width * sx))))
        ih = max(1, min(out_h - r0, int(round(inner.height * sy))))
        try:
            block = ds.read(list(info.bands), window=inner, out_shape=(nb, ih, iw), resampling=resampling)
            if self._mask_from_gdal:
                m = ds.read_masks(info.bands[0], window=inner, out_shape=(ih, iw),
                                  resampling=Resampling.nearest) > 0
            else:
                m = valid_mask(block, info.nodata)
        except RasterioIOError as exc:
            raise RunError(
                f"GDAL failed to read window {window_tuple(window)} ({_first_line(str(exc))}): the file is "
                "truncated or corrupt.", path=info.path, fix="re-download or re-export it.") from None
        data[:, r0:r0 + ih, c0:c0 + iw] = block
        valid[r0:r0 + ih, c0:c0 + iw] = m
        return data, valid


def valid_mask(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """``[H, W]`` bool: True where at least one band of ``data`` (``[C, H, W]``) differs from ``nodata``."""
    if nodata is None:
        return np.ones(data.shape[1:], dtype=bool)
    if np.isnan(nodata):
        return ~np.all(np.isnan(data), axis=0)
    return np.any(data != np.asarray(nodata, dtype=data.dtype), axis=0)


def window_tuple(window: Window) -> tuple[int, int, int, int]:
    """``(col_off, row_off, width, height)`` of a window as ints."""
    return (int(window.col_off), int(window.row_off), int(window.width), int(window.height))
