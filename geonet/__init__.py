"""geonet: object detection on georeferenced aerial and satellite imagery.

Pipeline stages, one module each: :mod:`geonet.chip` (rasters + vector labels -> training chips),
:mod:`geonet.train` (RetinaNet training), :mod:`geonet.detect` (sliding-window detection) and
:mod:`geonet.evaluate` (map-space COCO metrics). The pixel <-> CRS convention that all of them share is
documented once, in :mod:`geonet.georef`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geonet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
