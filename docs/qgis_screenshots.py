"""Make the README's QGIS screenshots headless (PyQGIS, offscreen Qt): the "Detect objects" dialog of the
Processing toolbox, and detections over the raster they came from. Run by the system python3 with QGIS:

    geonet qgis install --profile-dir /tmp/qgis-profile
    geonet detect examples/data/OSBS_029.tif -m demo-out/run/best.pt -o /tmp/trees.gpkg --overwrite
    QT_QPA_PLATFORM=offscreen /usr/bin/python3 docs/qgis_screenshots.py /tmp/qgis-profile/python/plugins \\
        examples/data/OSBS_029.tif demo-out/run/best.pt /tmp/trees.gpkg docs/img
"""

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.append("/usr/share/qgis/python/plugins")
plugins_dir, raster_path, model, detections, outdir = sys.argv[1:6]
sys.path.insert(0, plugins_dir)

from qgis.core import (QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsProject,  # noqa: E402
                       QgsRasterLayer, QgsVectorLayer)
from qgis.PyQt.QtCore import QSize  # noqa: E402
from qgis.PyQt.QtGui import QColor  # noqa: E402

app = QgsApplication([], True)
app.initQgis()
from processing.core.Processing import Processing  # noqa: E402

Processing.initialize()
import geonet as plugin  # noqa: E402  (the installed plugin)

p = plugin.classFactory(None)
p.initProcessing()

raster = QgsRasterLayer(raster_path, "OSBS_029")
layer = QgsVectorLayer(detections, "trees", "ogr")
layer.loadDefaultStyle()
QgsProject.instance().addMapLayers([raster, layer])

# 1. the algorithm dialog, as the toolbox opens it
from processing.gui.AlgorithmDialog import AlgorithmDialog  # noqa: E402

alg = QgsApplication.processingRegistry().createAlgorithmById("geonet:detect")
dlg = AlgorithmDialog(alg, False, None)
dlg.resize(900, 560)
dlg.show()
app.processEvents()
dlg.grab().save(os.path.join(outdir, "qgis-detect-dialog.png"))

# 2. the detections over the raster
settings = QgsMapSettings()
settings.setLayers([layer, raster])
settings.setDestinationCrs(raster.crs())
settings.setExtent(raster.extent())
settings.setOutputSize(QSize(600, 600))
settings.setBackgroundColor(QColor(255, 255, 255))
job = QgsMapRendererParallelJob(settings)
job.start()
job.waitForFinished()
job.renderedImage().save(os.path.join(outdir, "qgis-detections.png"))
print("wrote", outdir)
os._exit(0)
