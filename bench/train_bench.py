"""Training benchmark: train-step images/s at 512², DataLoader images/s alone, and the share of step
time spent waiting on data -- all in one run.

    .venv/bin/python bench/train_bench.py                      # CPU: resnet18, fp32, batch 2
    .venv/bin/python bench/train_bench.py --backbone resnet50 --amp bf16 --batch-size 16   # on a GPU

Data: synthetic 3-band uint8 GeoTIFF scenes with rectangles and vector labels, cut on the fly into
512 px windows by :class:`geonet.datasets.RasterWindowDataset` with the training augmentations --
the same path as ``geonet train --imagery --labels``.

* ``loader``: iterating the DataLoader alone (same workers, batch size, augmentations), images/s;
* ``train``: ``geonet.training.train`` (Lightning) for ``--steps`` steps: images/s over the steps and the
  fraction of step time spent waiting for the next batch (``data_wait``).

The loader must not be the bottleneck: loader images/s well above train images/s, data wait near 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_line, synthetic_scene  # noqa: E402


def make_data(tmp: Path, n_scenes: int, size: int) -> tuple[list[str], str]:
    from synth import random_boxes, write_labels  # tests/synth.py
    import numpy as np
    import rasterio

    rasters, frames = [], []
    for k in range(n_scenes):
        p = synthetic_scene(tmp / f"s{k}.tif", size, size, seed=k, n_objects=0)
        rng = np.random.default_rng(k)
        boxes = random_boxes(rng, 25, size, size, 12, 40)
        with rasterio.open(p, "r+") as ds:
            img = ds.read()
            for x1, y1, x2, y2 in boxes.astype(int):
                img[:, y1:y2, x1:x2] = 220
            ds.write(img)
            t, crs = ds.transform, ds.crs
        lab = write_labels(tmp / f"s{k}.geojson", boxes, t, crs.to_wkt(), label_crs="EPSG:4326")
        rasters.append(str(p))
        frames.append(gpd.read_file(lab))
    labels = tmp / "labels.geojson"
    gpd.GeoDataFrame(pd.concat(frames), crs="EPSG:4326").to_file(labels)
    return rasters, str(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--fpn-channels", type=int, default=None, help="FPN and subnet width [default: geonet's]")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--weights", default="auto", help="geonet train --weights (offline: a local state dict)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from geonet.datasets import collate
    from geonet.training import EpochSampler, TrainConfig, prepare_data, train

    tmp = Path(tempfile.mkdtemp())
    rasters, labels = make_data(tmp, args.scenes, 1024)
    cfg = TrainConfig.from_options(dict(output=str(tmp / "run"), imagery=rasters, labels=labels, size=512,
                                        backbone=args.backbone, batch_size=args.batch_size, amp=args.amp, weights=args.weights,
                                        workers=args.workers, val_fraction=0.0, epochs=1,
                                        limit_train_batches=args.steps, negative_ratio=0.0,
                                        **({} if args.fpn_channels is None else {"fpn_channels": args.fpn_channels})))
    cuda = torch.cuda.is_available()
    workers = cfg.workers if cfg.workers is not None else (min(8, torch.get_num_threads()) if cuda else 0)
    # 1) the loader alone, with the augmentations training uses
    data = prepare_data(cfg)
    from geonet.augment import OverheadAugment

    data.train.transform = OverheadAugment()
    data.train.fill_values = [60.0, 60.0, 60.0]
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size,
                                         sampler=EpochSampler(len(data.train), 0), collate_fn=collate,
                                         num_workers=workers, pin_memory=cuda, drop_last=True)
    n = 0
    t0 = time.perf_counter()
    for k, (images, _) in enumerate(loader):
        n += len(images)
        if k + 1 >= args.steps:
            break
    loader_ips = n / (time.perf_counter() - t0)
    # 2) training steps through geonet.training.train (Lightning), same data path
    res = train(cfg, progress=False)
    out = {"device": device_line(), "backbone": args.backbone, "batch_size": args.batch_size, "precision": res.precision,
           "fpn_channels": args.fpn_channels, "workers": workers, "loader_images_per_s": loader_ips, "train_images_per_s": res.images_per_second,
           "data_wait_fraction": res.data_wait_fraction, "steps": args.steps, "chip": 512,
           "loader_over_train": loader_ips / max(res.images_per_second, 1e-9)}
    print(f"{out['device']}; {args.backbone}, {res.precision}, batch {args.batch_size}, workers {workers}, 512 px")
    print(f"  train steps : {out['train_images_per_s']:8.2f} images/s")
    print(f"  loader alone: {out['loader_images_per_s']:8.2f} images/s  ({out['loader_over_train']:.1f}x the train rate)")
    print(f"  data wait   : {100 * out['data_wait_fraction']:8.2f} % of step time")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
