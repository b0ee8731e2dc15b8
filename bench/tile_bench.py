"""Detection tile size: seconds and accuracy of one checkpoint at several ``--tile`` sizes, in one run.

    .venv/bin/python bench/tile_bench.py --model demo-out/run/best.pt                  # NEON plots of ../shared
    .venv/bin/python bench/tile_bench.py --model best.pt --scenes 'x/*.tif' --truth t.gpkg --tiles 128,256,512

The detector is fully convolutional, so the detection tile need not be the training chip. For each tile size
(``chip`` = the checkpoint's chip size, ``default`` = geonet's default, :func:`geonet.detect.default_tile`), the
same scenes are detected at score 0.05 (the whole precision-recall curve) and scored with ``geonet evaluate``
against the truth: AP50, and precision/recall/F1 at IoU 0.4 at the max-F1 score. Printed: tiles run, pixels run
relative to the scenes' pixels, seconds (rows in turn, ``--repeats``, median), AP50, F1. Scenes listed in
``--exclude`` (the demo model's own training plot, OSBS_029) are left out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_line  # noqa: E402

from geonet.checkpoint import load_checkpoint  # noqa: E402
from geonet.detect import DetectConfig, detect  # noqa: E402
from geonet.evaluate import EvalConfig, evaluate_files  # noqa: E402
from geonet.raster import describe_raster, find_rasters  # noqa: E402

SHARED = Path(os.environ.get("GEONET_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--scenes", default=str(SHARED / "neon-trees" / "tiles"))
    ap.add_argument("--truth", default=str(SHARED / "neon-trees" / "labels" / "trees.shp"))
    ap.add_argument("--tiles", default="chip,256,default", help="comma-separated: chip, default, or pixels")
    ap.add_argument("--exclude", default="OSBS_029", help="comma-separated scene stems to leave out")
    ap.add_argument("--aoi", default=None, help="score inside these polygons only (e.g. a run's val_area.geojson)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--amp", default="auto")
    args = ap.parse_args()
    _, header = load_checkpoint(args.model)
    skip = set(filter(None, args.exclude.split(",")))
    scenes = [str(p) for p in find_rasters([args.scenes], option="--scenes") if p.stem not in skip]
    scene_px = sum(i.width * i.height for i in map(describe_raster, scenes))
    print(device_line())
    print(f"{len(scenes)} scenes ({scene_px / 1e6:.1f} Mpx) from {args.scenes}, truth {args.truth}; model {args.model} "
          f"(chips of {header.chip_size} px)")
    rows = []
    for t in args.tiles.split(","):
        tile = header.chip_size if t == "chip" else None if t == "default" else int(t)
        rows.append((t, tile))
    times: dict[str, list[float]] = {t: [] for t, _ in rows}
    result: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, tile in rows:
                out = Path(tmp) / f"{name}-{rep}"
                cfg = DetectConfig(model=args.model, tile=tile, score_thresh=0.05, amp=args.amp)
                t0 = time.perf_counter()
                r = detect(scenes, str(out) + os.sep, cfg, show_progress=False)
                times[name].append(time.perf_counter() - t0)
                assert r.ok, [s.error for s in r.scenes if s.error]
                if rep == 0:
                    ev = evaluate_files([str(p) for p in sorted(out.glob("*.geojson"))], args.truth,
                                        EvalConfig(iou=0.4, aoi=args.aoi), Path(tmp) / f"report-{name}")
                    import json

                    tile_px = json.loads(next(out.glob("*.geojson")).read_text())["geonet"]["tile_px"]
                    px = sum(s.tiles for s in r.scenes) * tile_px ** 2
                    result[name] = (tile_px, sum(s.tiles for s in r.scenes), px / scene_px, ev.metrics["AP50"],
                                    ev.operating["precision"], ev.operating["recall"], ev.operating["f1"])
    print("\n| tile | px | tiles | pixels run / scene pixels | s (median) | AP50 | P | R | F1 (IoU 0.4) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _ in rows:
        tile_px, n, ratio, ap50, p, r, f1 = result[name]
        print(f"| {name} | {tile_px} | {n} | {ratio:.2f} | {statistics.median(times[name]):.1f} | {ap50:.3f} | "
              f"{p:.3f} | {r:.3f} | {f1:.3f} |")


if __name__ == "__main__":
    main()
