"""Evaluation benchmark: 10,000 predictions against 10,000 truths in map space.

    .venv/bin/python bench/eval_bench.py [--n 10000]

Synthetic truth boxes (2-12 m) scattered over a 5 km x 5 km UTM area, predictions jittered from 80 % of them
plus 20 % false positives, both written as GeoPackages (truth in EPSG:4326, predictions in UTM, so the
reprojection is timed too). Times ``geonet.evaluate.evaluate`` end to end (reading, reprojecting, grouping,
pycocotools, operating point) and, separately, writing the report folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely

from geonet.evaluate import EvalConfig, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.n
    x0, y0 = 500000.0, 4500000.0
    xy = rng.uniform(0, 5000, (n, 2))
    wh = rng.uniform(2, 12, (n, 2))
    t = np.column_stack([x0 + xy[:, 0], y0 + xy[:, 1], x0 + xy[:, 0] + wh[:, 0], y0 + xy[:, 1] + wh[:, 1]])
    hit = rng.random(n) < 0.8
    p = t[hit] + rng.normal(0, 0.4, (hit.sum(), 4))
    fp_xy = rng.uniform(0, 5000, (n - hit.sum(), 2))
    fp = np.column_stack([x0 + fp_xy, x0 + fp_xy + 6]) [:, [0, 1, 2, 3]]
    fp[:, 1] += y0 - x0
    fp[:, 3] += y0 - x0
    preds = np.concatenate([p, fp])
    scores = np.concatenate([rng.uniform(0.4, 1, len(p)), rng.uniform(0, 0.7, len(fp))])
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        gpd.GeoDataFrame({"label": ["tree"] * n}, geometry=list(shapely.box(*t.T)), crs="EPSG:32618").to_crs(
            "EPSG:4326").to_file(d / "truth.gpkg")
        gpd.GeoDataFrame({"label": ["tree"] * len(preds), "score": scores}, geometry=list(shapely.box(*preds.T)),
                         crs="EPSG:32618").to_file(d / "pred.gpkg")
        t0 = time.perf_counter()
        rep = evaluate([str(d / "pred.gpkg")], str(d / "truth.gpkg"), EvalConfig())
        t_eval = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate([str(d / "pred.gpkg")], str(d / "truth.gpkg"), EvalConfig(), d / "report")
        t_full = time.perf_counter() - t0
    m, op = rep.metrics, rep.operating
    print(f"{len(preds)} predictions vs {n} truths: evaluate {t_eval:.2f} s (with report folder {t_full:.2f} s); "
          f"AP {m['AP']:.3f}, AP50 {m['AP50']:.3f}, F1 {op['f1']:.3f} at IoU 0.5")


if __name__ == "__main__":
    main()
