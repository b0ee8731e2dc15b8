"""The geonet QGIS plugin: a Processing provider ("geonet" in the toolbox) that runs geonet in a subprocess.

This folder is copied into a QGIS profile by ``geonet qgis install``; it imports only QGIS and the standard
library (geonet's own dependencies live in geonet's environment, not in QGIS's Python).
"""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    from .plugin import GeonetPlugin

    return GeonetPlugin(iface)
