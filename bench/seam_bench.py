"""Seam benchmark: duplicates and truncated boxes where tiles meet -- geonet vs SAHI vs DeepForest.

    make bench-peers                                   # once: bench/.venv-peers with sahi + deepforest
    bench/.venv-peers/bin/python bench/seam_bench.py   # both parts, ~5 min on 2 CPU cores

Part 1 -- the same raw tile detections, merged four ways. A 2048 x 2048 frame, 256 px tiles, at
several overlaps; objects (8-40 px, below every overlap) sit across vertical and horizontal seams and
on tile corners. Each tile's detections are the visible part of each object (what a perfect
detector returns for a cut object), scored at random or by the visible fraction of the object (a cut
object scoring lower, which favours plain NMS). Merged by geonet's seam-aware merge, SAHI's NMS (IoU 0.5), SAHI's
GREEDYNMM (IoS 0.5, its sliced-prediction default) and DeepForest's ``mosiac`` (NMS, IoU 0.15, its
``predict_tile`` default). Counted against the true objects: duplicates, truncated boxes, misses.

Part 2 -- the same trained weights run by each tool on the same scene: a small RetinaNet (ResNet-18)
trained by geonet on synthetic scenes, then ``geonet detect``, SAHI ``get_sliced_prediction`` with its
torchvision wrapper, and DeepForest ``predict_tile``, all with 256 px tiles and the same overlap.
Time and the same counts. The first row runs the same model on the whole scene in one pass (no
tiles, no seams): its errors are the model's own (a box bridging two neighbours, a loose box); what a
tiling method counts above that row comes from its seams.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from seams import count_errors, oracle_tiles, seam_objects, stream_merge  # noqa: E402

from geonet.tiling import TileGrid  # noqa: E402


def raw(grid, tiles):
    """Scene-frame arrays [N, 6] x1 y1 x2 y2 score label of every tile detection."""
    rows = []
    for (r, c), (b, s, lab) in tiles.items():
        o = np.array([grid.xs[c], grid.ys[r], grid.xs[c], grid.ys[r]])
        rows.append(np.column_stack([b + o, s, lab]))
    return np.concatenate(rows)


def geonet_merge(grid, tiles):
    return stream_merge(grid, tiles)[0]


def sahi_merge(p, kind):
    from sahi.postprocess.combine import batched_greedy_nmm, batched_nms

    if kind == "nms":
        keep = batched_nms(p, "IOU", 0.5)
        return p[keep, :4]
    keep_to_merge = batched_greedy_nmm(p, "IOS", 0.5)
    out = []
    for k, merged in keep_to_merge.items():
        group = p[[k] + list(merged), :4]
        out.append([group[:, 0].min(), group[:, 1].min(), group[:, 2].max(), group[:, 3].max()])
    return np.array(out)


def deepforest_mosaic(p, iou=0.15):
    import pandas as pd
    from deepforest.predict import mosiac

    df = pd.DataFrame({"xmin": p[:, 0], "ymin": p[:, 1], "xmax": p[:, 2], "ymax": p[:, 3], "score": p[:, 4],
                       "label": p[:, 5].astype(int), "window_xmin": 0, "window_ymin": 0})
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        res = mosiac(df, iou_threshold=iou)
    return res[["xmin", "ymin", "xmax", "ymax"]].to_numpy(dtype=float)


def part1(overlaps, seeds, score_by_visibility=False) -> list[dict]:
    rows = []
    for ov in overlaps:
        tot = {}
        n_obj = 0
        for seed in seeds:
            rng = np.random.default_rng(seed)
            grid = TileGrid.build(2048, 2048, 256, ov)
            objects = np.round(seam_objects(grid, rng, size=(8, min(40, ov - 4))))  # pixel-aligned
            tiles = oracle_tiles(grid, objects, rng, score_by_visibility=score_by_visibility)
            p = raw(grid, tiles)
            n_obj += len(objects)
            for name, boxes in (("geonet", geonet_merge(grid, tiles)), ("SAHI NMS", sahi_merge(p, "nms")),
                                ("SAHI GREEDYNMM", sahi_merge(p, "greedy")), ("DeepForest mosaic", deepforest_mosaic(p))):
                d, t, mi = count_errors(objects, boxes)
                a = tot.setdefault(name, [0, 0, 0])
                a[0] += d
                a[1] += t
                a[2] += mi
        for name, (d, t, mi) in tot.items():
            rows.append({"overlap": ov, "method": name, "objects": n_obj, "duplicates": d, "truncated": t, "missed": mi,
                         "scores": "visible fraction" if score_by_visibility else "random"})
    return rows


def train_model(tmp: Path, cache: Path | None = None) -> Path:
    """Train the synthetic-rectangle detector (~7 min on 2 CPU cores), or reuse ``cache`` when it exists."""
    import shutil

    if cache is not None and cache.exists():
        print(f"reusing the detector in {cache}", flush=True)
        return cache
    import geopandas as gpd
    import pandas as pd
    from synth import make_scene

    from geonet.training import TrainConfig, train

    frames, rasters = [], []
    for k in range(6):
        r, lab, _ = make_scene(tmp, f"t{k}", seed=k, n=40, width=512, height=512, min_side=10, max_side=40)
        rasters.append(str(r))
        frames.append(gpd.read_file(lab))
    labels = tmp / "labels.geojson"
    gpd.GeoDataFrame(pd.concat(frames), crs="EPSG:4326").to_file(labels)
    cfg = TrainConfig.from_options(dict(output=str(tmp / "run"), imagery=rasters, labels=str(labels), size=256,
                                        stride=192, backbone="resnet18", epochs=25, batch_size=4, val_fraction=0.2,
                                        anchor_sizes=[16, 32, 64, 128, 256]))
    res = train(cfg, progress=False)
    print(f"trained a synthetic-rectangle detector: val AP50 {res.best_metrics.get('AP50', 0):.3f} in "
          f"{res.seconds:.0f} s", flush=True)
    best = Path(res.run_dir) / "best.pt"
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(best, cache)
    return best


def seam_scene(tmp: Path, overlap: int):
    from synth import paint, write_raster

    grid = TileGrid.build(1536, 1536, 256, overlap)
    objects = np.round(seam_objects(grid, np.random.default_rng(7), size=(12, min(40, overlap - 4))))
    data = paint(objects, 1536, 1536, seed=7)
    from affine import Affine

    p = write_raster(tmp / "seams.tif", data, transform=Affine(0.1, 0, 500000, 0, -0.1, 4500000), tiled=True)
    return p, objects


def part2(overlap: int, score: float, cache: Path | None = None) -> list[dict]:
    import geopandas as gpd
    import rasterio
    import shapely
    import torch

    from geonet.checkpoint import load_checkpoint
    from geonet.detect import DetectConfig, Detector, detect_scene
    from geonet.georef import geometries_to_pixel

    scratch = tempfile.TemporaryDirectory(prefix="geonet-bench-")  # removed when part2 returns
    tmp = Path(scratch.name)
    ck = train_model(tmp, cache)
    scene, objects = seam_scene(tmp, overlap)
    rows = []
    # geonet
    det = Detector(ck, score_thresh=score)
    t0 = time.perf_counter()
    detect_scene(scene, det, DetectConfig(model=str(ck), overlap=overlap, score_thresh=score, workers=1),
                 tmp / "geonet.geojson")
    t_geonet = time.perf_counter() - t0
    g = gpd.read_file(tmp / "geonet.geojson")
    with rasterio.open(scene) as src:
        boxes = shapely.bounds(geometries_to_pixel(g.to_crs(src.crs).geometry.values, src.transform))
        image = np.transpose(src.read(), (1, 2, 0))
    rows.append(("geonet detect", boxes, t_geonet))
    # baseline: the same model on the whole scene in one pass (no tiles, so no seams). Its errors are the
    # model's own (boxes bridging two neighbours, loose boxes); a tiling method's errors above these are
    # the seams'.
    det.model.detections_per_img, det.model.topk_candidates = 2000, 20000
    t0 = time.perf_counter()
    whole = det(torch.from_numpy(np.ascontiguousarray(np.transpose(image, (2, 0, 1))))[None])[0]
    rows.insert(0, ("model, whole scene (no tiles)", whole["boxes"].float().cpu().numpy(), time.perf_counter() - t0))
    # the same weights, rescaled for tools that feed images as float in [0, 1]
    model, meta = load_checkpoint(ck)
    model.score_thresh = score
    model.transform.image_mean = [m / 255 for m in model.transform.image_mean]
    model.transform.image_std = [s / 255 for s in model.transform.image_std]
    # SAHI
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.predict import get_sliced_prediction

    sm = TorchVisionDetectionModel(model=model, confidence_threshold=score, category_mapping={"1": "object"},
                                   device="cpu", load_at_init=True)
    for post, metric in (("NMS", "IOU"), ("GREEDYNMM", "IOS")):
        t0 = time.perf_counter()
        res = get_sliced_prediction(image, sm, slice_height=256, slice_width=256,
                                    overlap_height_ratio=overlap / 256, overlap_width_ratio=overlap / 256,
                                    perform_standard_pred=False, postprocess_type=post,
                                    postprocess_match_metric=metric, postprocess_match_threshold=0.5, verbose=0)
        dt = time.perf_counter() - t0
        b = np.array([p.bbox.to_xyxy() for p in res.object_prediction_list]).reshape(-1, 4)
        rows.append((f"SAHI sliced ({post})", b, dt))
    # DeepForest
    import contextlib
    import io

    from deepforest import main as df_main

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.label_dict = {"object": 1}
            self.num_classes = 1

        def forward(self, images, targets=None):
            return self.m(list(images))

    dfm = df_main.deepforest(model=Wrapped(model), config_args={"num_classes": 1, "label_dict": {"object": 1},
                                                                "workers": 0, "score_thresh": score,
                                                                "accelerator": "cpu", "devices": 1})
    dfm.numeric_to_label_dict = {0: "object", 1: "object"}  # a model passed in keeps no label map (deepforest 2.1)
    dfm.create_trainer(enable_progress_bar=False, logger=False)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        pred = dfm.predict_tile(path=str(scene), patch_size=256, patch_overlap=overlap / 256)
    dt = time.perf_counter() - t0
    b = pred[["xmin", "ymin", "xmax", "ymax"]].to_numpy(dtype=float) if pred is not None and len(pred) else np.zeros((0, 4))
    rows.append(("DeepForest predict_tile", b, dt))
    out = []
    for name, b, dt in rows:
        d, t, mi = count_errors(objects, b, tol=3.0)
        out.append({"method": name, "objects": len(objects), "boxes": len(b), "seconds": dt, "duplicates": d,
                    "truncated": t, "missed": mi})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overlaps", default="48,64,96")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip-model", action="store_true", help="part 1 only")
    ap.add_argument("--overlap", type=int, default=64, help="part 2 overlap")
    ap.add_argument("--score", type=float, default=0.3, help="part 2 score threshold")
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", type=Path, default=None,
                    help="part 2 detector: reuse this checkpoint if it exists, else train and save it here")
    args = ap.parse_args()
    ovs = [int(v) for v in args.overlaps.split(",")]
    r1 = part1(ovs, range(args.seeds)) + part1(ovs, range(args.seeds), score_by_visibility=True)
    print("part 1: same raw tile detections (oracle), 2048 px frame, 256 px tiles")
    print(f"{'scores':<17} {'overlap':>7} {'method':<20} {'objects':>7} {'duplicates':>10} {'truncated':>9} {'missed':>6}")
    for r in r1:
        print(f"{r['scores']:<17} {r['overlap']:>7} {r['method']:<20} {r['objects']:>7} {r['duplicates']:>10} "
              f"{r['truncated']:>9} {r['missed']:>6}")
    r2 = []
    if not args.skip_model:
        r2 = part2(args.overlap, args.score, args.model)
        print(f"part 2: same weights, same 1536 px scene, 256 px tiles, overlap {args.overlap} px, score >= {args.score}")
        print(f"{'method':<30} {'seconds':>8} {'boxes':>6} {'duplicates':>10} {'truncated':>9} {'missed':>6}")
        for r in r2:
            print(f"{r['method']:<30} {r['seconds']:>8.1f} {r['boxes']:>6} {r['duplicates']:>10} {r['truncated']:>9} "
                  f"{r['missed']:>6}  (of {r['objects']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"part1": r1, "part2": r2}, indent=2, default=float))


if __name__ == "__main__":
    main()
