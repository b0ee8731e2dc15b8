"""The "geonet" Processing provider: Detect objects, Evaluate detections."""

from qgis.core import QgsProcessingProvider

from .algorithms import DetectAlgorithm, EvaluateAlgorithm
from .runner import installed_version


class GeonetProvider(QgsProcessingProvider):
    def id(self):
        return "geonet"

    def name(self):
        return "geonet"

    def longName(self):  # noqa: N802
        return f"geonet {installed_version()}"

    def loadAlgorithms(self):  # noqa: N802
        self.addAlgorithm(DetectAlgorithm())
        self.addAlgorithm(EvaluateAlgorithm())

    def supportedOutputVectorLayerExtensions(self):  # noqa: N802
        return ["gpkg", "geojson", "shp", "fgb"]

    def defaultVectorFileExtension(self, hasGeometry=True):  # noqa: N802,N803
        return "gpkg"
