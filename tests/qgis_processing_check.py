"""Run the geonet Processing algorithms headless with PyQGIS, as the toolbox would. Run by the system python3.

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_processing_check.py PLUGINS_DIR RASTER MODEL OUTDIR TRUTH

PLUGINS_DIR holds the installed plugin (``geonet qgis install``). Prints one JSON object: the algorithms the
provider lists; the detect run (output valid, features, CRS, renderer, labels); a cancelled detect run (what it
returned, whether an output or temporary file is left); an evaluate run (its numbers).
"""

import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.append("/usr/share/qgis/python/plugins")  # QGIS's own Processing plugin
plugins_dir, raster, model, outdir, truth = sys.argv[1:6]
sys.path.insert(0, plugins_dir)

from qgis.core import (QgsApplication, QgsProcessingException, QgsProcessingFeedback,  # noqa: E402
                       QgsVectorLayer)

app = QgsApplication([], False)
app.initQgis()
from processing.core.Processing import Processing  # noqa: E402

Processing.initialize()
import processing  # noqa: E402

import geonet as plugin  # noqa: E402  (the installed plugin package, not the library)

p = plugin.classFactory(None)
p.initProcessing()
reg = QgsApplication.processingRegistry()
result = {"algorithms": sorted(a.id() for a in reg.providerById("geonet").algorithms())}


class Feedback(QgsProcessingFeedback):
    def __init__(self, cancel_at=None):
        super().__init__()
        self.cancel_at = cancel_at
        self.progress = []
        self.infos = []

    def setProgress(self, value):  # noqa: N802
        self.progress.append(value)
        super().setProgress(value)
        if self.cancel_at is not None and value >= self.cancel_at:
            self.cancel()

    def pushInfo(self, info):  # noqa: N802
        self.infos.append(info)
        super().pushInfo(info)


out = os.path.join(outdir, "trees.gpkg")
fb = Feedback()
res = processing.run("geonet:detect", {"INPUT": raster, "MODEL": model, "SCORE_THRESHOLD": 0.3, "OUTPUT": out},
                     feedback=fb)
layer = QgsVectorLayer(res["OUTPUT"], "detections", "ogr")
layer.loadDefaultStyle()
r = layer.renderer()
result["detect"] = {"output": res["OUTPUT"], "valid": layer.isValid(), "features": layer.featureCount(),
                    "crs": layer.crs().authid(), "renderer": r.type() if r else None,
                    "attribute": getattr(r, "classAttribute", lambda: None)(), "labels": layer.labelsEnabled(),
                    "progress_updates": len(fb.progress), "last_progress": fb.progress[-1] if fb.progress else None}

cancelled = os.path.join(outdir, "cancelled.gpkg")
fb = Feedback(cancel_at=0.0)
try:
    res = processing.run("geonet:detect", {"INPUT": raster, "MODEL": model, "SCORE_THRESHOLD": 0.3,
                                           "OUTPUT": cancelled}, feedback=fb)
    error = None
except QgsProcessingException as exc:
    res, error = {}, str(exc)
result["cancelled"] = {"returned": sorted(res), "error": error, "canceled": fb.isCanceled(),
                       "left": sorted(n for n in os.listdir(outdir) if n.startswith((".cancelled", "cancelled"))),
                       "infos": fb.infos[-3:]}

try:
    processing.run("geonet:detect", {"INPUT": raster, "MODEL": os.path.join(outdir, "missing.pt"),
                                     "SCORE_THRESHOLD": -1, "OUTPUT": os.path.join(outdir, "x.gpkg")})
    result["bad_model"] = None
except QgsProcessingException as exc:
    result["bad_model"] = str(exc)

res = processing.run("geonet:evaluate", {"PREDICTIONS": out, "TRUTH": truth, "IOU": 0.4,
                                         "OUTPUT": os.path.join(outdir, "report")})
result["evaluate"] = {k: res.get(k) for k in ("AP50", "PRECISION", "RECALL", "F1", "REPORT")}
print(json.dumps(result), flush=True)
os._exit(0)  # QGIS 3.22 can crash while tearing down; the result is already out
