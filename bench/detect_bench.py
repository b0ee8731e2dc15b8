"""Detection benchmark: end-to-end tiles/s vs pure model tiles/s in one run, and peak RSS vs scene size.

    .venv/bin/python bench/detect_bench.py                       # throughput on a 4096 px scene
    .venv/bin/python bench/detect_bench.py --rss 5000,20000,50000  # + peak RSS per scene size

Throughput: one synthetic 3-band uint8 scene (tiled, deflate), one checkpoint (random weights: speed
does not depend on them) whose score threshold is 0 and detections per tile 50, so the merge and the
writer get a realistic, heavy load. In the same process, on the same tiles with the same batch size:

* ``model``: ``Detector.__call__`` on batches already in memory (forward + RetinaNet's per-tile
  postprocess and NMS), after a warm-up;
* ``forward``: backbone + heads only;
* ``end-to-end``: ``detect_scene`` -- reading in workers, model, seam merge, GeoJSON writing.

The three are taken in turn, ``--repeat`` rounds (default 3), and the medians reported: one round's figures
move by 5-10 % on a shared 2-core machine, more than the time outside the model that their difference measures.

The ratio end-to-end / model is the share of the model's speed the pipeline keeps (target >= 0.85).
On CUDA it also prints seconds per km² at 0.1 m GSD.

Peak RSS: each size runs in a fresh process on a VRT that repeats a 2048 px tile (so a 50k x 50k
scene takes no disk), with a stand-in model that returns 50 boxes per tile at no compute cost
(``--rss-model null``, default) or the real one (``--rss-model real``, slow on a CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PeakTreeRss, Timer, device_line, mosaic_vrt, peak_rss_mb, random_checkpoint,  # noqa: E402
                    synthetic_scene)

from geonet.detect import (DetectConfig, Detector, TileReader, detect_scene, fill_values, plan_scene,  # noqa: E402
                           tile_batches)


def heavy_checkpoint(path: Path, backbone: str, fpn_channels: int | None = None) -> Path:
    """A random checkpoint that keeps 50 boxes per tile at any score (post-processing at full load)."""
    from geonet.checkpoint import load_checkpoint, save_checkpoint

    random_checkpoint(path, backbone=backbone, score_thresh=0.0, fpn_channels=fpn_channels)
    model, header = load_checkpoint(path)
    header.model_config.detections_per_img = 50
    model.detections_per_img = 50
    save_checkpoint(path, model, header)
    return path


class NullDetector(Detector):
    """50 fixed pseudo-random boxes per tile, no model compute (for memory measurements)."""

    def __call__(self, batch):
        g = torch.Generator().manual_seed(int(batch.shape[0]))
        out = []
        for _ in range(batch.shape[0]):
            xy = torch.rand(50, 2, generator=g) * 470
            wh = 10 + torch.rand(50, 2, generator=g) * 30
            out.append({"boxes": torch.cat([xy, xy + wh], 1), "scores": torch.rand(50, generator=g),
                        "labels": torch.ones(50, dtype=torch.int64)})
        return out


def throughput(args, tmp: Path) -> dict:
    scene = synthetic_scene(tmp / "scene.tif", args.size, args.size)
    ck = heavy_checkpoint(tmp / "model.pt", args.backbone, args.fpn_channels)
    det = Detector(ck, precision=args.amp)
    cfg = DetectConfig(model=str(ck), batch_size=args.batch_size, workers=args.workers, amp=args.amp, tile=args.tile)
    plan = plan_scene(scene, det, cfg)
    bs = args.batch_size or (16 if det.device.type == "cuda" else 2)
    ds = TileReader(plan, tile_batches(plan.grid, bs), fill_values(det, plan.info.dtype))
    n_b = min(len(ds), args.model_batches)
    batches = [torch.from_numpy(ds[k]["data"]) for k in range(n_b)]
    if det.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    for b in batches[:2]:  # warm-up (cudnn autotune, allocator)
        det(b)
    sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
    sync()
    tiles = sum(len(b) for b in batches)
    m = det.model
    rounds = []
    # the three measures in turn, ``--repeat`` rounds, medians: on a shared 2-core machine one round's figures
    # move by 5-10 %, more than the time outside the model that their difference measures
    for _ in range(args.repeat):
        with Timer() as t_model:
            for b in batches:
                det(b)
            sync()
        # forward only: backbone + heads
        with torch.inference_mode(), Timer() as t_fwd:
            for b in batches:
                x = m.transform.batch(b.to(det.device))
                with torch.autocast(det.device.type, dtype=det.amp_dtype, enabled=det.amp_dtype is not None):
                    m.head(list(m.backbone(x).values()))
            sync()
        with Timer() as t_e2e:
            res = detect_scene(scene, det, cfg, tmp / "out.geojson")
        rounds.append({"model_tiles_per_s": tiles / t_model.s, "forward_tiles_per_s": tiles / t_fwd.s,
                       "e2e_tiles_per_s": res.tiles / t_e2e.s,
                       "model_idle_s": t_e2e.s - res.seconds_model})
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    model_tps, e2e_tps = med["model_tiles_per_s"], med["e2e_tiles_per_s"]
    out = {"device": device_line(), "scene_px": args.size, "tiles": res.tiles, "batch_size": bs,
           "workers": cfg.workers, "amp": det.precision, "backbone": args.backbone, "repeat": args.repeat,
           "model_tiles_per_s": model_tps, "forward_tiles_per_s": med["forward_tiles_per_s"], "e2e_tiles_per_s": e2e_tps,
           "ratio_e2e_over_model": e2e_tps / model_tps, "ratio_e2e_over_forward": e2e_tps / med["forward_tiles_per_s"],
           "detections": res.detections, "ms_per_tile_outside_model": 1000 * (1 / e2e_tps - 1 / model_tps),
           # the same run's model seconds: time the model was not running (reading the first batch, merging and
           # writing after the last, waits in between), per tile; the figure above also counts the model's
           # slowdown while reader threads decode on the same cores
           "ms_per_tile_model_idle": 1000 * med["model_idle_s"] / res.tiles,
           "rounds": rounds, "peak_rss_mb": peak_rss_mb()}
    stride = plan.grid.tile - plan.overlap
    out["s_per_km2_at_0.1m"] = (1e8 / stride ** 2) / e2e_tps
    return out


def rss_child(size: int, mode: str, backbone: str) -> None:
    tmp = Path(tempfile.mkdtemp())
    tile = synthetic_scene(tmp / "tile.tif", 2048, 2048)
    vrt = mosaic_vrt(tile, tmp / "big.vrt", size)
    ck = heavy_checkpoint(tmp / "model.pt", backbone)
    det = (NullDetector if mode == "null" else Detector)(ck)
    cfg = DetectConfig(model=str(ck), workers=2)
    base = peak_rss_mb()
    with Timer() as t, PeakTreeRss() as tree:
        res = detect_scene(vrt, det, cfg, tmp / "out.gpkg")
    print(json.dumps({"size": size, "tiles": res.tiles, "detections": res.detections, "seconds": t.s,
                      "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base, "peak_tree_rss_mb": tree.peak_mb,
                      "max_boxes_held": res.max_boxes_held}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=None, help="detection tile side [default: geonet's]")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--fpn-channels", type=int, default=None, help="FPN and subnet width [default: geonet's]")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--model-batches", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the three measures, taken in turn (medians)")
    ap.add_argument("--rss", default="", help="comma-separated scene sizes for the peak-RSS runs")
    ap.add_argument("--rss-model", choices=["null", "real"], default="null")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be 1 or more")
    if args.rss_child:
        rss_child(args.rss_child, args.rss_model, args.backbone)
        return
    with tempfile.TemporaryDirectory() as d:
        r = throughput(args, Path(d))
    print(f"{r['device']}; {r['backbone']}, {r['amp']}, batch {r['batch_size']}, workers {r['workers']}, "
          f"{r['tiles']} tiles of a {r['scene_px']} px scene; medians of {r['repeat']} rounds")
    print(f"{'forward only':>16}: {r['forward_tiles_per_s']:8.2f} tiles/s")
    print(f"{'model (+NMS)':>16}: {r['model_tiles_per_s']:8.2f} tiles/s")
    print(f"{'end-to-end':>16}: {r['e2e_tiles_per_s']:8.2f} tiles/s  -> ratio e2e/model {r['ratio_e2e_over_model']:.3f},"
          f" e2e/forward {r['ratio_e2e_over_forward']:.3f}; {r['ms_per_tile_outside_model']:.1f} ms/tile outside the "
          f"model ({r['ms_per_tile_model_idle']:.2f} ms/tile with the model idle, same run); "
          f"{r['s_per_km2_at_0.1m']:.1f} s/km2 at 0.1 m; peak RSS {r['peak_rss_mb']:.0f} MiB")
    results = {"throughput": r, "rss": []}
    for size in [int(s) for s in args.rss.split(",") if s]:
        p = subprocess.run([sys.executable, __file__, "--rss-child", str(size), "--rss-model", args.rss_model,
                            "--backbone", args.backbone], capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-2000:])
            continue
        row = json.loads(p.stdout.strip().splitlines()[-1])
        results["rss"].append(row)
        print(f"RSS {size:>6} px ({row['tiles']:>6} tiles, {row['detections']:>8} boxes, {row['seconds']:7.1f} s, "
              f"{args.rss_model} model): peak {row['peak_rss_mb']:6.0f} MiB (main process, "
              f"{row['rss_before_mb']:.0f} before detection), {row['peak_tree_rss_mb']:6.0f} MiB with reader workers; "
              f"merge held at most "
              f"{row['max_boxes_held']} boxes")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
