"""Open geonet outputs with PyQGIS, headless, as a QGIS user would. Run by the system python3.

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_check.py RASTER OUTPUT...

Prints one JSON object per output: valid, features, crs (authid), extent, overlaps the raster's
extent (in the layer's CRS), renderer type and its attribute.
"""

import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from qgis.core import (QgsApplication, QgsCoordinateTransform, QgsProject, QgsRasterLayer,  # noqa: E402
                       QgsVectorLayer)

app = QgsApplication([], False)
app.initQgis()
raster = QgsRasterLayer(sys.argv[1], "scene")
out = []
for path in sys.argv[2:]:
    uri = path + "|layername=" + os.path.splitext(os.path.basename(path))[0] if path.endswith(".gpkg") else path
    layer = QgsVectorLayer(uri, "detections", "ogr")
    info = {"path": path, "valid": layer.isValid()}
    if layer.isValid():
        ok_style = layer.loadDefaultStyle()
        tr = QgsCoordinateTransform(raster.crs(), layer.crs(), QgsProject.instance())
        rext = tr.transformBoundingBox(raster.extent())
        ext = layer.extent()
        renderer = layer.renderer()
        info.update(features=layer.featureCount(), crs=layer.crs().authid(),
                    extent=[ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum()],
                    overlaps=ext.intersects(rext), renderer=renderer.type(),
                    attribute=getattr(renderer, "classAttribute", lambda: None)(),
                    default_style_loaded=bool(ok_style[1]), raster_valid=raster.isValid(),
                    labeling=layer.labelsEnabled())
    out.append(info)
print(json.dumps(out), flush=True)
os._exit(0)  # QGIS 3.22 can crash while tearing down; the result is already out
