"""Why geonet labels windows itself instead of with TorchGeo's VectorDataset: time per labelled window.

    bench/.venv-peers/bin/python bench/torchgeo_labels_bench.py    # needs torchgeo==0.8.1 in that venv

On the 13 HARV plots of ../shared/data/neon-trees (EPSG:32618; labels in one EPSG:4326 shapefile),
label each plot's window with ``torchgeo.datasets.VectorDataset(task="object_detection")`` -- which
re-reads and reprojects the vector file and loops its rows in Python on every sample -- and with
geonet (labels read and indexed once, then an STR-tree query and the min-visible rule per window).
Reports ms per window for each, and the boxes each finds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import rasterio

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "neon-trees"


def main() -> None:
    from torchgeo.datasets import VectorDataset

    from geonet.labels import LabelIndex, label_window, read_labels
    from geonet.raster import describe_raster

    plots = sorted((DATA / "tiles").glob("HARV_*.tif"))
    shp = DATA / "labels" / "trees.shp"
    # TorchGeo: one dataset in the plots' CRS at 0.1 m
    with rasterio.open(plots[0]) as src:
        crs = src.crs
    t0 = time.perf_counter()
    ds = VectorDataset(paths=str(shp), crs=crs, res=(0.1, 0.1), task="object_detection")
    t_tg_init = time.perf_counter() - t0
    n_tg, t_tg = [], 0.0
    for p in plots:
        with rasterio.open(p) as src:
            b = src.bounds
        t0 = time.perf_counter()
        s = ds[b.left:b.right:0.1, b.bottom:b.top:0.1]
        t_tg += time.perf_counter() - t0
        n_tg.append(len(s["bbox_xyxy"]) if "bbox_xyxy" in s else len(s.get("boxes", [])))
    # geonet
    t0 = time.perf_counter()
    index = LabelIndex(read_labels(shp))
    t_gn_init = time.perf_counter() - t0
    n_gn, t_gn = [], 0.0
    for p in plots:
        info = describe_raster(p)
        t0 = time.perf_counter()
        rb = index.for_raster(info)
        wl = label_window(rb, 0, 0, info.width, info.height, clip=(0, 0, info.width, info.height))
        t_gn += time.perf_counter() - t0
        n_gn.append(len(wl.boxes))
    n = len(plots)
    print(f"{n} windows (HARV plots, 400 x 400 px), labels: {shp.name}")
    print(f"TorchGeo VectorDataset: {1000 * t_tg / n:8.1f} ms per window (+{t_tg_init:.2f} s to index), boxes {sum(n_tg)}")
    print(f"geonet labels         : {1000 * t_gn / n:8.1f} ms per window (+{t_gn_init:.2f} s to read and index once), "
          f"boxes {sum(n_gn)}")
    print(f"ratio                 : {t_tg / max(t_gn, 1e-9):8.1f} x")
    np.testing.assert_equal(len(n_tg), len(n_gn))


if __name__ == "__main__":
    main()
