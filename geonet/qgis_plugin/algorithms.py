"""The Processing algorithms: ``geonet:detect`` (Detect objects) and ``geonet:evaluate`` (Evaluate detections).

Each one builds a geonet command line and runs it (:mod:`.runner`); the options mean what they mean on the
command line (``geonet detect --help``, ``geonet evaluate --help``).
"""

import json
from pathlib import Path

from qgis.core import (QgsProcessing, QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingOutputFile,
                       QgsProcessingOutputNumber, QgsProcessingParameterFile, QgsProcessingParameterFolderDestination,
                       QgsProcessingParameterNumber, QgsProcessingParameterRasterLayer,
                       QgsProcessingParameterVectorDestination, QgsProcessingParameterVectorLayer)

from . import runner

_HELP = "https://github.com/geonet/geonet#readme"


def _layer_path(layer, what):
    """The file behind a layer (``path|layername=x`` -> ``path``); memory layers must be saved first."""
    if layer is None:
        raise QgsProcessingException(f"{what}: no layer given.")
    if layer.providerType() not in ("ogr", "gdal"):
        raise QgsProcessingException(f"{what}: the layer {layer.name()} is not a file (provider "
                                     f"{layer.providerType()}). Fix: save it to a GeoPackage first.")
    return layer.source().split("|")[0]


def _raise(res, what):
    raise QgsProcessingException(f"geonet {what} failed (exit {res.returncode}): {res.error}")


class _Base(QgsProcessingAlgorithm):
    def group(self):
        return ""

    def groupId(self):  # noqa: N802
        return ""

    def helpUrl(self):  # noqa: N802
        return _HELP

    def createInstance(self):  # noqa: N802
        return type(self)()


class DetectAlgorithm(_Base):
    INPUT, MODEL, SCORE, OUTPUT = "INPUT", "MODEL", "SCORE_THRESHOLD", "OUTPUT"

    def name(self):
        return "detect"

    def displayName(self):  # noqa: N802
        return "Detect objects"

    def shortHelpString(self):  # noqa: N802
        return ("Runs a geonet checkpoint over a whole raster (sliding windows merged across seams) and writes the "
                "detections as boxes in the raster's CRS, with score, label and class id. Score threshold -1 uses "
                "the checkpoint's operating point (the validation max-F1 score).")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster (layer or file)"))
        self.addParameter(QgsProcessingParameterFile(self.MODEL, "geonet checkpoint (best.pt)", extension="pt"))
        self.addParameter(QgsProcessingParameterNumber(
            self.SCORE, "Score threshold (-1: the checkpoint's operating point)",
            QgsProcessingParameterNumber.Double, defaultValue=-1.0, minValue=-1.0, maxValue=1.0))
        out = QgsProcessingParameterVectorDestination(self.OUTPUT, "Detections", QgsProcessing.TypeVectorPolygon)
        out.setSupportsNonFileBasedOutput(False)  # geonet writes files; a temporary output is a temporary file
        self.addParameter(out)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        raster = _layer_path(self.parameterAsRasterLayer(parameters, self.INPUT, context), "Raster")
        model = self.parameterAsFile(parameters, self.MODEL, context)
        score = self.parameterAsDouble(parameters, self.SCORE, context)
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        args = ["detect", raster, "-m", model, "-o", out, "--overwrite", "--progress"]
        if score >= 0:
            args += ["--score-thresh", f"{score:g}"]
        res = runner.run(args, feedback)
        if res.cancelled or feedback.isCanceled():
            if res.returncode == 0:  # geonet finished before the cancel reached it: take back what it wrote
                for f in (Path(out), Path(out).with_suffix(".qml")):
                    f.unlink(missing_ok=True)
            feedback.pushInfo("cancelled: no output written")
            return {}
        if res.returncode != 0:
            _raise(res, "detect")
        return {self.OUTPUT: out}


class EvaluateAlgorithm(_Base):
    PREDICTIONS, TRUTH, IOU, OUTPUT = "PREDICTIONS", "TRUTH", "IOU", "OUTPUT"
    METRICS = ("AP", "AP50", "AP75", "PRECISION", "RECALL", "F1")

    def name(self):
        return "evaluate"

    def displayName(self):  # noqa: N802
        return "Evaluate detections"

    def shortHelpString(self):  # noqa: N802
        return ("Scores detections (geonet's, or any polygon layer with a score field) against truth polygons in "
                "map space: COCO AP, AP50, AP75 (pycocotools), and precision, recall and F1 at the IoU given, at "
                "the score that maximises F1. Writes report.md, report.json and plots into the report folder.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterVectorLayer(self.PREDICTIONS, "Detections",
                                                            [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterVectorLayer(self.TRUTH, "Truth",
                                                            [QgsProcessing.TypeVectorAnyGeometry]))
        self.addParameter(QgsProcessingParameterNumber(self.IOU, "IoU of the precision/recall/F1 point",
                                                       QgsProcessingParameterNumber.Double, defaultValue=0.5,
                                                       minValue=0.05, maxValue=0.95))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, "Report folder"))
        for m in self.METRICS:
            self.addOutput(QgsProcessingOutputNumber(m, m))
        self.addOutput(QgsProcessingOutputFile("REPORT", "report.md"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        pred = _layer_path(self.parameterAsVectorLayer(parameters, self.PREDICTIONS, context), "Detections")
        truth = _layer_path(self.parameterAsVectorLayer(parameters, self.TRUTH, context), "Truth")
        iou = self.parameterAsDouble(parameters, self.IOU, context)
        folder = self.parameterAsString(parameters, self.OUTPUT, context)
        res = runner.run(["evaluate", pred, "--truth", truth, "--iou", f"{iou:g}", "-o", folder, "--overwrite",
                          "--json"], feedback)
        if res.cancelled or feedback.isCanceled():
            return {}
        if res.returncode != 0:
            _raise(res, "evaluate")
        rep = json.loads(res.stdout)
        m, op = rep["metrics"], rep["operating_point"]
        values = {"AP": m.get("AP"), "AP50": m.get("AP50"), "AP75": m.get("AP75"), "PRECISION": op.get("precision"),
                  "RECALL": op.get("recall"), "F1": op.get("f1")}
        for k, v in values.items():
            feedback.pushInfo(f"{k} {v:.3f}" if isinstance(v, (int, float)) else f"{k} n/a")
        return {**values, self.OUTPUT: folder, "REPORT": str(Path(folder) / "report.md")}
