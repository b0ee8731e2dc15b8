"""Cloud-native inputs: scenes and imagery as URLs (COGs read through GDAL's virtual file systems) and
STAC items.

* ``https://host/scene.tif``, ``http://...``: read by GDAL's ``/vsicurl/`` (rasterio maps the scheme);
  ``s3://bucket/key.tif`` -> ``/vsis3/``, ``gs://`` -> ``/vsigs/``, ``az://`` -> ``/vsiaz/``; a path that
  already starts with ``/vsi`` is passed as is. Credentials come from the environment as GDAL reads them
  (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``...).
* Reads are windows, so a Cloud-Optimised GeoTIFF is fetched block by block with HTTP range requests: the
  header first, then the blocks each tile needs (detection widens its reads to block boundaries). The
  GDAL settings recommended for COG access (`GDAL's COG page <https://gdal.org/drivers/raster/cog.html>`_,
  `cogeo.org <https://www.cogeo.org/>`_) are set for the process when a remote raster is first opened,
  unless the environment already sets them: :data:`COG_CONFIG`.
* A STAC item (a ``.json`` file or URL) stands for one of its assets: ``asset`` names it (``visual``,
  ``B04``...); without a name, ``visual`` if the item has it, else its only GeoTIFF asset. Items are read
  with `pystac <https://pystac.readthedocs.io>`_; relative asset hrefs resolve against the item's location.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlparse

from geonet.errors import InputError

__all__ = ["COG_CONFIG", "RemoteRaster", "is_remote", "apply_cog_config", "is_stac_item", "stac_asset_href"]

#: GDAL settings for reading COGs over HTTP/object storage (each one only where the environment has none).
COG_CONFIG = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing to look for side-car files
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.vrt,.jp2,.json",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",  # adjacent blocks in one request
    "GDAL_HTTP_MULTIPLEX": "YES",  # HTTP/2 where the server has it
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",  # the COG header in the first request
    "VSI_CACHE": "TRUE",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
}

_SCHEMES = ("http://", "https://", "s3://", "gs://", "az://", "/vsi")


def is_remote(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` is a URL or a GDAL virtual file system path (``/vsicurl/``, ``/vsis3/``...)."""
    return str(text).startswith(_SCHEMES)


def apply_cog_config() -> None:
    """Put :data:`COG_CONFIG` into the environment (where unset), which GDAL reads as config options."""
    for k, v in COG_CONFIG.items():
        os.environ.setdefault(k, v)


@dataclass(frozen=True)
class RemoteRaster:
    """A raster given as a URL, with the parts of :class:`pathlib.Path` that geonet uses (``name``, ``stem``,
    ``suffix``, ``exists``, ``is_file``, ``resolve``); ``str()`` and ``os.fspath()`` give the URL for
    rasterio/GDAL. (``pathlib.Path`` would fold ``https://`` into ``https:/``.)

    Attributes:
        url: as given (``https://...``, ``s3://...``, ``/vsicurl/...``).
    """

    url: str

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        return self.url

    @property
    def _path(self) -> PurePosixPath:
        u = self.url
        for prefix in ("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/"):
            if u.startswith(prefix):
                u = u[len(prefix):]
        return PurePosixPath(urlparse(u).path or u)

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def stem(self) -> str:
        return self._path.stem

    @property
    def suffix(self) -> str:
        return self._path.suffix

    def exists(self) -> bool:
        return True  # GDAL says otherwise, in one line, when it opens it

    def is_file(self) -> bool:
        return True

    def resolve(self) -> RemoteRaster:
        return self


def is_stac_item(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` names a STAC item by its ending (``.json``; the content is checked on reading)."""
    s = str(text)
    return urlparse(s).path.lower().endswith(".json") if is_remote(s) else s.lower().endswith(".json")


def stac_asset_href(item_path: str | os.PathLike[str], asset: str | None = None, *, option: str = "SCENE") -> str:
    """The absolute href of an asset of the STAC item at ``item_path`` (file or URL), read with pystac.

    Args:
        asset: the asset's key; default ``visual``, else the item's only GeoTIFF asset.

    Raises:
        InputError: pystac missing, not a STAC item, no such asset (the message lists the item's assets).
    """
    try:
        import pystac
    except ImportError:  # pragma: no cover - a declared dependency
        raise InputError("reading STAC items needs pystac.", fix="pip install pystac.") from None
    src = str(item_path)
    try:
        item = pystac.Item.from_file(src)
    except Exception as exc:  # JSON errors, HTTP errors, a catalogue or collection instead of an item
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{option}: {src} is not a readable STAC item ({msg}).",
                         fix="give a STAC item (a GeoJSON Feature with assets), or the GeoTIFF itself.") from None
    names = list(item.assets)
    if asset is None:
        tiffs = [k for k, a in item.assets.items() if "tiff" in (a.media_type or "").lower()
                 or str(a.href).lower().endswith((".tif", ".tiff"))]
        if "visual" in item.assets:
            asset = "visual"
        elif len(tiffs) == 1:
            asset = tiffs[0]
        else:
            raise InputError(f"{option}: the STAC item {item.id} has assets {names}; which one to read is unknown.",
                             fix="pass --asset NAME (e.g. --asset " + (tiffs[0] if tiffs else "visual") + ").")
    if asset not in item.assets:
        raise InputError(f"--asset {asset}: the STAC item {item.id} has no such asset; it has {names}.",
                         fix="pass one of those names.")
    href = item.assets[asset].get_absolute_href() or item.assets[asset].href
    return href
