"""GPU benchmark in one command (``bench/gpu.sh``): what a session with a GPU runs first.

    bench/gpu.sh              # on a CUDA machine: the full table (a few minutes on an H100)
    bench/gpu.sh --dry-run    # anywhere: the same code path at toy sizes on the CPU (tested in CI)

Rows, each measured in this one process on identical random weights (speed does not depend on them):

* detection, 512 px tiles, ResNet-50 and ResNet-18 RetinaNet, batch 16 / 32 / 64: pure forward (backbone +
  heads on tiles already on the device), model (forward + batched post-processing), tiles/s, and the peak
  GPU memory;
* end to end on one large synthetic scene (reading in workers, model, seam merge, writing), at batch 32:
  tiles/s and the ratio to the pure forward;
* training at 512 px, ResNet-50, bf16, through ``geonet.training.train``: images/s and the share of step
  time spent waiting for data.

Then ``pytest -m cuda`` (the CUDA tests: CPU and CUDA give the same boxes; training steps on CUDA).
Output: one Markdown table on stdout, and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_line, random_checkpoint, synthetic_scene  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def detection_rows(args, tmp: Path) -> list[dict]:
    from geonet.detect import Detector

    rows = []
    for backbone in args.backbones:
        ck = random_checkpoint(tmp / f"{backbone}.pt", backbone=backbone, chip=args.tile, score_thresh=0.05)
        det = Detector(ck, precision=args.amp)
        m = det.model
        for bs in args.batches:
            x = torch.randint(0, 255, (bs, 3, args.tile, args.tile), dtype=torch.uint8, device=det.device)
            if det.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                for _ in range(2):  # warm-up: cudnn autotune, allocator, anchor cache
                    det(x)
                _sync(det.device)
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    det(x)
                _sync(det.device)
                t_model = time.perf_counter() - t0
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        xb = m.transform.batch(x)
                        with torch.autocast(det.device.type, dtype=det.amp_dtype or torch.float32,
                                            enabled=det.amp_dtype is not None):
                            m.head(list(m.backbone(xb).values()))
                    _sync(det.device)
                    t_fwd = time.perf_counter() - t0
            except torch.OutOfMemoryError:
                rows.append({"what": f"detect {backbone} batch {bs}", "note": "out of memory"})
                continue
            n = bs * args.reps
            mem = torch.cuda.max_memory_allocated() / 2**30 if det.device.type == "cuda" else float("nan")
            rows.append({"what": f"detect {backbone}, {args.tile} px, batch {bs}", "forward_tps": n / t_fwd,
                         "model_tps": n / t_model, "model_over_forward": t_fwd / t_model, "peak_gib": mem})
    return rows


def end_to_end_row(args, tmp: Path) -> dict:
    from geonet.detect import DetectConfig, Detector, detect_scene

    backbone = args.backbones[0]
    ck = random_checkpoint(tmp / f"e2e_{backbone}.pt", backbone=backbone, chip=args.tile, score_thresh=0.05)
    scene = synthetic_scene(tmp / "scene.tif", args.scene, args.scene)
    det = Detector(ck, precision=args.amp)
    bs = args.e2e_batch
    cfg = DetectConfig(model=str(ck), batch_size=bs, workers=args.workers, overlap=str(args.tile // 8), tile=args.tile)
    detect_scene(scene, det, cfg, tmp / "warm.gpkg")  # warm-up
    t0 = time.perf_counter()
    res = detect_scene(scene, det, cfg, tmp / "out.gpkg")
    e2e = res.tiles / (time.perf_counter() - t0)
    x = torch.randint(0, 255, (bs, 3, args.tile, args.tile), dtype=torch.uint8, device=det.device)
    m = det.model
    with torch.inference_mode():
        def forward():
            with torch.autocast(det.device.type, dtype=det.amp_dtype or torch.float32, enabled=det.amp_dtype is not None):
                m.head(list(m.backbone(m.transform.batch(x)).values()))

        forward()  # warm-up
        _sync(det.device)
        t0 = time.perf_counter()
        for _ in range(args.reps):
            forward()
        _sync(det.device)
        fwd = bs * args.reps / (time.perf_counter() - t0)
    return {"what": f"end to end {backbone}, {args.scene} px scene, {res.tiles} tiles, batch {bs}", "e2e_tps": e2e,
            "forward_tps": fwd, "e2e_over_forward": e2e / fwd}


def training_row(args, tmp: Path) -> dict:
    from train_bench import make_data

    from geonet.training import TrainConfig, train

    rasters, labels = make_data(tmp, args.train_scenes, args.train_size * 2)
    backbone = args.train_backbone
    cfg = TrainConfig.from_options(dict(
        output=str(tmp / "run"), imagery=rasters, labels=labels, size=args.train_size, backbone=backbone,
        weights="none", batch_size=args.train_batch, amp=args.amp, val_fraction=0.0, epochs=1,
        limit_train_batches=args.train_steps, negative_ratio=0.0, workers=args.workers, fit_anchors=False))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    res = train(cfg, progress=False)
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"what": f"train {backbone}, {args.train_size} px, batch {args.train_batch}, {res.precision}",
            "train_ips": res.images_per_second, "data_wait": res.data_wait_fraction, "peak_gib": mem}


def table(rows: list[dict]) -> str:
    cols = [("forward_tps", "forward tiles/s"), ("model_tps", "model tiles/s"), ("e2e_tps", "end-to-end tiles/s"),
            ("model_over_forward", "model / forward"), ("e2e_over_forward", "e2e / forward"),
            ("train_ips", "train images/s"), ("data_wait", "data wait"), ("peak_gib", "peak GPU GiB"), ("note", "note")]
    lines = ["| " + " | ".join(["row"] + [c[1] for c in cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cells.append("" if v is None else (f"{v:.3f}" if isinstance(v, float) and v < 10 else
                                               f"{v:.1f}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join([r["what"]] + cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the code path, no figures")
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.backbones, args.batches, args.tile, args.reps, args.scene = ["resnet18"], [2], 64, 1, 256
        args.e2e_batch, args.train_backbone, args.train_size, args.train_batch = 2, "resnet18", 64, 2
        args.train_steps, args.train_scenes = 2, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run `bench/gpu.sh --dry-run` to check the code path on the CPU")
        args.backbones, args.batches, args.tile, args.reps, args.scene = ["resnet50", "resnet18"], [16, 32, 64], 512, 10, 8192
        args.e2e_batch, args.train_backbone, args.train_size, args.train_batch = 32, "resnet50", 512, 16
        args.train_steps, args.train_scenes = 60, 16
    print(device_line(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows += detection_rows(args, tmp)
        print(table(rows), flush=True)
        rows.append(end_to_end_row(args, tmp))
        rows.append(training_row(args, tmp))
    print("\n" + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_line(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
