"""The Ray engine's overhead: scenes/s of ``geonet detect`` against ``--engine ray`` with 1 and 2 actors.

    .venv/bin/python bench/ray_bench.py --model runs/x/best.pt            # the 52 NEON plots of ../shared
    .venv/bin/python bench/ray_bench.py --model best.pt --scenes 'scenes/*.tif' --repeats 3

The same scenes, model and options in every row, in one process, rows in turn, ``--repeats`` times
(median). The local Ray instance is started once before the Ray rows (its start-up is printed apart:
a cluster is started once, not per job). On 2 cores expect no speed-up from 2 actors; the figure to read
is the engine's overhead per scene against the plain command (target < 5 %).
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

from geonet.detect import DetectConfig, detect  # noqa: E402
from geonet.raster import find_rasters  # noqa: E402

SHARED = Path(os.environ.get("GEONET_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a geonet checkpoint")
    ap.add_argument("--scenes", default=str(SHARED / "neon-trees" / "tiles"), help="folder or quoted glob")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--band-tiles", type=int, default=0,
                    help="also rows with every scene split into bands of this many tiles (0: no such rows)")
    args = ap.parse_args()
    import ray

    scenes = [str(p) for p in find_rasters([args.scenes], option="--scenes")]
    print(device_line())
    print(f"{len(scenes)} scenes from {args.scenes}; model {args.model}")
    rows = [("plain", None, 0)] + [(f"ray, {a} actor(s)", int(a), 0) for a in args.actors.split(",")]
    if args.band_tiles:
        rows += [(f"ray, {a} actor(s), bands of {args.band_tiles} tiles", int(a), args.band_tiles)
                 for a in args.actors.split(",")]
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, configure_logging=False, object_store_memory=100 * 2**20)
    t_init = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.repeats):
                for name, actors, band_tiles in rows:
                    out = Path(tmp) / f"{rep}-{len(times[name])}-{abs(hash(name))}"
                    cfg = DetectConfig(model=args.model, engine="local" if actors is None else "ray", actors=actors,
                                       band_tiles=band_tiles)
                    t = time.perf_counter()
                    r = detect(scenes, str(out) + os.sep, cfg, show_progress=False)
                    times[name].append(time.perf_counter() - t)
                    assert r.ok, [s.error for s in r.scenes if s.error]
    finally:
        ray.shutdown()
    base = statistics.median(times["plain"])
    print(f"local Ray instance start-up: {t_init:.1f} s (once per cluster, not counted below)\n")
    print("| engine | s (median) | scenes/s | vs plain | overhead per scene |")
    print("|---|---|---|---|---|")
    for name, _, _ in rows:
        m = statistics.median(times[name])
        print(f"| {name} | {m:.1f} | {len(scenes) / m:.2f} | {base / m:.3f} | "
              f"{(m - base) / len(scenes) * 1000:+.0f} ms ({(m / base - 1) * 100:+.1f} %) |")


if __name__ == "__main__":
    main()
