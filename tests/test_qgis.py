"""Outputs open in QGIS (PyQGIS headless, Debian's python3-qgis, which .ci/run installs)."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from geonet.detect import DetectConfig, detect_scene
from test_detect import make_ckpt, oracle, scene

pytestmark = pytest.mark.qgis

SYSTEM_PYTHON = "/usr/bin/python3"


def _has_qgis() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, env={**os.environ,
                       "QT_QPA_PLATFORM": "offscreen"})
    return r.returncode == 0


@pytest.mark.skipif(not _has_qgis(), reason="PyQGIS not installed (apt-get install python3-qgis; .ci/run does)")
def test_outputs_open_in_qgis(tmp_path):
    ck = make_ckpt(tmp_path / "m.pt")
    objects = np.array([[10.0, 10, 30, 30], [100, 120, 140, 150], [200, 40, 230, 90]])
    s = scene(tmp_path, objects, 300, 260)
    outs = []
    for ext in (".geojson", ".gpkg", ".shp", ".fgb"):  # GeoParquet: Debian's GDAL has no Parquet driver
        o = tmp_path / f"det_{ext[1:]}{ext}"
        detect_scene(s, oracle(ck), DetectConfig(model=str(ck), workers=0), o)
        outs.append(str(o))
    (tmp_path / "det_gpkg.qml").unlink()  # the GeoPackage must style itself from its layer_styles table
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path))
    r = subprocess.run([SYSTEM_PYTHON, str(Path(__file__).with_name("qgis_check.py")), str(s), *outs],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    by_ext = {Path(x["path"]).suffix: x for x in results}
    for ext, x in by_ext.items():
        assert x["valid"] and x["raster_valid"], x
        assert x["features"] == 3, x
        assert x["overlaps"], x
    assert by_ext[".geojson"]["crs"] == "EPSG:4326"
    assert by_ext[".gpkg"]["crs"] == "EPSG:32618" and by_ext[".shp"]["crs"] == "EPSG:32618"
    assert by_ext[".fgb"]["crs"] in ("EPSG:32618", "EPSG:4326"), by_ext[".fgb"]
    # the style embedded in the GeoPackage (and the .qml sidecars) is applied
    for ext in (".gpkg", ".geojson", ".shp"):
        assert by_ext[ext]["renderer"] == "graduatedSymbol" and by_ext[ext]["attribute"] == "score", by_ext[ext]
    assert by_ext[".gpkg"]["labeling"]
