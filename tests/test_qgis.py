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


@pytest.mark.slow
@pytest.mark.skipif(not _has_qgis(), reason="PyQGIS not installed (apt-get install python3-qgis; .ci/run does)")
def test_processing_provider_detect_cancel_evaluate(tmp_path):
    """`geonet qgis install`, then the toolbox's algorithms headless: geonet:detect writes the same boxes as the
    library, in the scene's CRS, styled; a cancelled run stops and leaves nothing; geonet:evaluate gives numbers."""
    import sys

    import geopandas as gpd

    from geonet.detect import DetectConfig, detect
    from geonet.qgis_install import install_plugin, plugin_zip

    root = Path(__file__).resolve().parents[1]
    raster, truth = root / "examples/data/OSBS_029.tif", root / "examples/data/OSBS_029_trees.geojson"
    ck = make_ckpt(tmp_path / "m.pt", bands=3, dtype="uint8", busy=True)
    ref = detect([str(raster)], tmp_path / "ref.gpkg", DetectConfig(model=str(ck), score_thresh=0.3),
                 show_progress=False)
    exe = Path(sys.executable).with_name("geonet")
    plugins = install_plugin(tmp_path / "profile", executable=exe).parent
    assert json.loads((plugins / "geonet" / "geonet.json").read_text())["executable"] == str(exe.resolve())
    import zipfile
    with zipfile.ZipFile(plugin_zip(tmp_path / "geonet-qgis.zip", executable=exe)) as z:
        assert {"geonet/metadata.txt", "geonet/__init__.py", "geonet/geonet.json"} <= set(z.namelist())
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path))
    r = subprocess.run([SYSTEM_PYTHON, str(Path(__file__).with_name("qgis_processing_check.py")), str(plugins),
                        str(raster), str(ck), str(out), str(truth)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["algorithms"] == ["geonet:detect", "geonet:evaluate"]
    d = res["detect"]
    assert d["valid"] and d["crs"] == "EPSG:32617", d
    assert d["features"] == ref.scenes[0].detections == len(gpd.read_file(tmp_path / "ref.gpkg", layer="ref")) > 0, d
    assert d["renderer"] == "graduatedSymbol" and d["attribute"] == "score" and d["labels"], d
    assert d["progress_updates"] >= 1 and d["last_progress"] == 100.0, d
    c = res["cancelled"]
    assert c["canceled"] and c["returned"] == [] and c["left"] == [], c
    assert res["bad_model"] and "missing.pt" in res["bad_model"], res["bad_model"]
    e = res["evaluate"]
    assert all(isinstance(e[k], float) for k in ("AP50", "PRECISION", "RECALL", "F1")), e
    assert Path(e["REPORT"]).exists()
