"""Whole-scene detection speed on the CPU: geonet vs SAHI vs DeepForest on identical weights, in one run.

    make bench-peers && bench/.venv-peers/bin/python bench/peers_speed_bench.py

One synthetic 2048 x 2048 GeoTIFF (3-band uint8, tiled, deflate), 512 px tiles with 64 px overlap (25 tiles),
one ResNet-18-FPN RetinaNet (random weights; speed does not depend on them; score threshold 0, at most 50
boxes per tile, so the merge and the writer get a realistic load). Every tool runs the same
``torchvision`` module; each row runs ``--runs`` times in turn and the median counts.

* ``pure forward``: backbone + heads on tiles already in memory, batch 4, fp32 -- the ceiling of an fp32 tool;
* ``SAHI``: ``get_sliced_prediction`` (NMS merge) through its torchvision wrapper (fp32, one tile at a time);
* ``DeepForest``: ``predict_tile`` (its own dataloader and mosaic NMS, fp32);
* ``geonet detect``: the command's defaults (bf16 autocast on CPUs with native bf16), and ``--amp 32``.

Printed: tiles/s, the ratio to the pure forward, the ratio to SAHI and to DeepForest, and the time outside the
model per tile (end-to-end seconds per tile minus the same tool's model seconds per tile, for geonet).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_line, random_checkpoint, synthetic_scene  # noqa: E402


def _heavy(path: Path) -> Path:
    from geonet.checkpoint import load_checkpoint, save_checkpoint

    random_checkpoint(path, backbone="resnet18", chip=512, score_thresh=0.0)
    model, header = load_checkpoint(path)
    header.model_config.detections_per_img = model.detections_per_img = 50
    save_checkpoint(path, model, header)
    return path


def pure_forward(ck: Path, image: np.ndarray, tile: int, stride: int, batch: int) -> float:
    from geonet.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ck)
    h, w = image.shape[:2]
    offs = sorted({min(o, h - tile) for o in range(0, h - tile + stride, stride)})
    tiles = [torch.from_numpy(np.ascontiguousarray(image[y:y + tile, x:x + tile].transpose(2, 0, 1)))
             for y in offs for x in offs]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            x = model.transform.batch(torch.stack(tiles[i:i + batch]))
            model.head(list(model.backbone(x).values()))
    return len(tiles) / (time.perf_counter() - t0)


def sahi_run(ck: Path, image: np.ndarray, tile: int, overlap: int) -> tuple[float, int]:
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.predict import get_sliced_prediction

    from geonet.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ck)
    model.transform.image_mean = [m / 255 for m in model.transform.image_mean]  # SAHI feeds floats in [0, 1]
    model.transform.image_std = [s / 255 for s in model.transform.image_std]
    sm = TorchVisionDetectionModel(model=model, confidence_threshold=0.0, category_mapping={"1": "object"},
                                   device="cpu", load_at_init=True)
    t0 = time.perf_counter()
    res = get_sliced_prediction(image, sm, slice_height=tile, slice_width=tile, overlap_height_ratio=overlap / tile,
                                overlap_width_ratio=overlap / tile, perform_standard_pred=False,
                                postprocess_type="NMS", postprocess_match_metric="IOU", postprocess_match_threshold=0.5,
                                verbose=0)
    return time.perf_counter() - t0, len(res.object_prediction_list)


def deepforest_run(ck: Path, scene: Path, tile: int, overlap: int) -> tuple[float, int]:
    from deepforest import main as df_main

    from geonet.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ck)
    model.transform.image_mean = [m / 255 for m in model.transform.image_mean]  # DeepForest feeds [0, 1]
    model.transform.image_std = [s / 255 for s in model.transform.image_std]

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.label_dict, self.num_classes = m, {"object": 1}, 1

        def forward(self, images, targets=None):
            return self.m(list(images))

    dfm = df_main.deepforest(model=Wrapped(model), config_args={"num_classes": 1, "label_dict": {"object": 1},
                                                                "workers": 0, "score_thresh": 0.0,
                                                                "accelerator": "cpu", "devices": 1})
    dfm.numeric_to_label_dict = {0: "object", 1: "object"}
    dfm.create_trainer(enable_progress_bar=False, logger=False)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        pred = dfm.predict_tile(path=str(scene), patch_size=tile, patch_overlap=overlap / tile)
    return time.perf_counter() - t0, 0 if pred is None else len(pred)


def geonet_run(ck: Path, scene: Path, out: Path, tile: int, overlap: int, amp: str) -> tuple[float, int, float]:
    from geonet.detect import DetectConfig, Detector, detect_scene

    det = Detector(ck, precision=amp, score_thresh=0.0)
    t0 = time.perf_counter()
    res = detect_scene(scene, det, DetectConfig(model=str(ck), tile=tile, overlap=str(overlap), amp=amp), out)
    return time.perf_counter() - t0, res.detections, res.seconds_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peers", default="sahi,deepforest", help="peers to run (empty: geonet only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    scratch = tempfile.TemporaryDirectory(prefix="geonet-bench-")  # removed when the bench exits
    tmp = Path(scratch.name)
    scene = synthetic_scene(tmp / "scene.tif", args.size, args.size)
    ck = _heavy(tmp / "model.pt")
    import rasterio

    with rasterio.open(scene) as src:
        image = np.ascontiguousarray(src.read().transpose(1, 2, 0))
    stride = args.tile - args.overlap
    n_tiles = len(range(0, args.size - args.tile + stride, stride)) ** 2
    rows: dict[str, list[float]] = {}
    outside: dict[str, list[float]] = {}
    peers = [p for p in args.peers.split(",") if p]
    for run in range(args.runs):
        rows.setdefault("pure forward (fp32, batch 4)", []).append(pure_forward(ck, image, args.tile, stride, 4))
        if "sahi" in peers:
            dt, _ = sahi_run(ck, image, args.tile, args.overlap)
            rows.setdefault("SAHI get_sliced_prediction (NMS)", []).append(n_tiles / dt)
        if "deepforest" in peers:
            dt, _ = deepforest_run(ck, scene, args.tile, args.overlap)
            rows.setdefault("DeepForest predict_tile", []).append(n_tiles / dt)
        for amp, name in (("auto", "geonet detect (defaults)"), ("32", "geonet detect --amp 32")):
            dt, _, model_s = geonet_run(ck, scene, tmp / f"o{run}{amp}.gpkg", args.tile, args.overlap, amp)
            rows.setdefault(name, []).append(n_tiles / dt)
            outside.setdefault(name, []).append(1000 * (dt - model_s) / n_tiles)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    fwd = med["pure forward (fp32, batch 4)"]
    sahi = med.get("SAHI get_sliced_prediction (NMS)")
    dfo = med.get("DeepForest predict_tile")
    print(f"{device_line()}; {args.size} px scene, {n_tiles} tiles of {args.tile} px, overlap {args.overlap}, "
          f"median of {args.runs} runs")
    print("| tool | tiles/s | vs pure forward | vs SAHI | vs DeepForest | ms/tile outside the model |")
    print("|---|---|---|---|---|---|")
    for k, v in med.items():
        o = f"{statistics.median(outside[k]):.1f}" if k in outside else ""
        print(f"| {k} | {v:.2f} | {v / fwd:.2f} | {v / sahi:.2f} | {v / dfo:.2f} | {o} |" if sahi and dfo else
              f"| {k} | {v:.2f} | {v / fwd:.2f} | | | {o} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"median_tiles_per_s": med, "outside_ms": outside}, indent=2))


if __name__ == "__main__":
    main()
