"""Chipping benchmark on the NEON set: chips/s, MB/s read, and the share of time in I/O vs Python.

    .venv/bin/python bench/chip_bench.py [--data ../shared/data/neon-trees] [--repeat 3] [--size 200]

I/O is the time spent inside GDAL (rasterio reads of windows and writes of chips); Python is everything
else inside the timed region (planning the grid, labelling windows, COCO bookkeeping). Label reading and
indexing happen once, before the timed region, and are reported separately. Each configuration runs
``--repeat`` times; the median is reported. Ratios compare runs made in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from geonet.chip import ChipConfig, plan_chips, write_chips
from geonet.labels import LabelIndex, read_labels
from geonet.raster import describe_raster, find_rasters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parents[1]
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "neon-trees"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=200)
    args = ap.parse_args()
    data = Path(args.data)
    t0 = time.perf_counter()
    paths = find_rasters([data / "tiles"])
    infos = [describe_raster(p) for p in paths]
    labels = read_labels(data / "labels" / "trees.shp")
    t_setup = time.perf_counter() - t0
    print(f"{len(infos)} rasters, {len(labels)} labels; headers + labels read in {t_setup:.2f} s")
    print(f"{'compress':>8} {'chips':>6} {'chips/s':>8} {'MB/s read':>10} {'I/O %':>6} {'read %':>7} "
          f"{'write %':>8} {'plan s':>7} {'total s':>8}")
    for compress in ("none", "deflate"):
        rows = []
        for _ in range(args.repeat):
            cfg = ChipConfig(size=args.size, stride=args.size * 3 // 4, negative_ratio=1.0, compress=compress)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                idx = LabelIndex(labels)  # fresh index: projection + STR-tree per CRS counted in plan time
                plan = plan_chips(infos, idx, cfg)
                t_plan = time.perf_counter() - t0
                rep = write_chips(plan, Path(tmp) / "chips", cfg)
                total = time.perf_counter() - t0
            rows.append((total, t_plan, rep))
        total, t_plan, rep = sorted(rows, key=lambda r: r[0])[len(rows) // 2]
        io = rep.seconds_read + rep.seconds_write
        print(f"{compress:>8} {rep.chips:>6} {rep.chips / total:>8.1f} {rep.bytes_read / 1e6 / total:>10.1f} "
              f"{100 * io / total:>6.1f} {100 * rep.seconds_read / total:>7.1f} {100 * rep.seconds_write / total:>8.1f} "
              f"{t_plan:>7.3f} {total:>8.3f}")
        spread = statistics.pstdev([r[0] for r in rows])
        print(f"{'':>8} spread of total over {args.repeat} runs: {spread:.3f} s")


if __name__ == "__main__":
    main()
