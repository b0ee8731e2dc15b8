"""``geonet train``: train a RetinaNet on rasters + labels, a chip folder, or COCO/VOC image sets."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click
from geonet.cli.options import (
    bands_opt,
    class_field_opt,
    given,
    json_opt,
    layer_opt,
    nodata_opt,
    overwrite_opt,
    parse_floats,
    parse_split,
    point_size_opt,
    progress_opt,
    seed_opt,
    shared,
    size_opt,
)

from geonet.device import AMP_CHOICES, DEVICE_CHOICES
from geonet.model import BACKBONES, FPN_CHANNELS, NORMALIZE, NORMALIZE_CHOICES
from geonet.training import TrainConfig, resume_config
from geonet.training import train as run_training
from geonet.training.config import AUGMENT_CHOICES

D = TrainConfig()
log = logging.getLogger("geonet")


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


@click.command("train", short_help="Train a RetinaNet on rasters + labels, chips, COCO or VOC.")
@click.option("--config", type=str, default=None, metavar="FILE.yaml",
              help="Options from YAML (a run's config.yaml, or flat option names); flags override it.")
@click.option("--imagery", multiple=True, metavar="DIR|FILE|GLOB", help="Rasters (with --labels): windows cut on the fly.")
@click.option("--labels", default=None, metavar="FILE", help="Vector labels for --imagery.")
@shared(layer_opt, class_field_opt, bands_opt, nodata_opt, point_size_opt)
@click.option("--chips", default=None, metavar="DIR", help="A `geonet chip` output folder instead of --imagery.")
@click.option("--coco", default=None, metavar="JSON", help="A COCO detection JSON (images need not be georeferenced).")
@click.option("--images", default=None, metavar="DIR", help="Image folder of --coco [default: the JSON's folder].")
@click.option("--voc", default=None, metavar="DIR", help="A Pascal VOC folder (Annotations/ + JPEGImages/).")
@click.option("-o", "--output", required=True, metavar="DIR", help="Run folder (checkpoints, logs, curves).")
@shared(size_opt)
@click.option("--stride", type=int, default=None, help="Window step in pixels [default: --size].")
@click.option("--min-visible", type=float, default=None, show_default=f"{D.chip.min_visible:g}",
              help="Edge rule, as in `geonet chip`.")
@click.option("--negative-ratio", type=float, default=None, show_default=f"{D.chip.negative_ratio:g}",
              help="Background chips per object chip.")
@click.option("--split", default=None, show_default=f"val={D.chip.val_fraction:g}", metavar="val=F",
              help="Spatial validation split.")
@click.option("--split-by", type=click.Choice(["auto", "raster", "block"]), default=None, show_default=D.chip.split_by)
@click.option("--block-size", type=int, default=None, help="Block side in pixels for --split-by block.")
@click.option("--backbone", type=click.Choice(list(BACKBONES)), default=None, show_default=D.model.backbone)
@click.option("--weights", default=None, show_default=D.weights,
              metavar="auto|coco|imagenet|none|PATH|torchgeo:ENUM.MEMBER",
              help="Initial weights: auto (COCO RetinaNet for resnet50, ImageNet otherwise; torch hub cache or "
                   "download), coco, imagenet, none, a local state dict, or TorchGeo's multispectral ResNet weights "
                   "(torchgeo:ResNet50_Weights.SENTINEL2_ALL_MOCO; pip install 'geonet[torchgeo]').")
@click.option("--anchor-sizes", default=None, show_default=_csv(D.model.anchor_sizes),
              help="Base anchor side per level P3..P7 (px).")
@click.option("--anchor-scales", default=None, show_default="2^0,2^(1/3),2^(2/3)", help="Scales per level.")
@click.option("--anchor-ratios", default=None, show_default=_csv(D.model.anchor_ratios),
              help="Aspect ratios (height/width).")
@click.option("--fit-anchors/--no-fit-anchors", default=None, show_default=str(D.fit_anchors).lower(),
              help="Fit anchor sizes and ratios to the training boxes (see `geonet anchors`).")
@click.option("--focal-alpha", type=float, default=None, show_default=f"{D.model.focal_alpha:g}")
@click.option("--focal-gamma", type=float, default=None, show_default=f"{D.model.focal_gamma:g}")
@click.option("--fg-iou", type=float, default=None, show_default=f"{D.model.fg_iou:g}",
              help="Matcher: anchors at or above are objects.")
@click.option("--bg-iou", type=float, default=None, show_default=f"{D.model.bg_iou:g}",
              help="Matcher: anchors below are background.")
@click.option("--score-thresh", type=float, default=None, show_default=f"{D.model.score_thresh:g}")
@click.option("--nms-iou", type=float, default=None, show_default=f"{D.model.nms_iou:g}")
@click.option("--detections-per-img", type=int, default=None, show_default=str(D.model.detections_per_img))
@click.option("--fpn-channels", type=int, default=None, show_default=str(FPN_CHANNELS),
              help="Width of the FPN and of the subnets' convs (their cost grows with its square); "
                   "--weights coco needs 256.")
@click.option("--normalize", type=click.Choice(NORMALIZE_CHOICES), default=None,
              show_default=f"{NORMALIZE}; dataset with torchgeo: weights",
              help="dataset: the training data's band statistics for every image; image: each window and tile "
                   "with its own (robust to a scene-wide gain or offset per band).")
@click.option("--trainable-layers", type=int, default=None,
              help="Backbone stages to train [default: 3 pretrained, 5 scratch].")
@click.option("--steps", type=int, default=None, show_default=str(D.optim.steps),
              help="Training budget in optimiser steps, whatever the size of the data.")
@click.option("--epochs", type=int, default=None, help="Passes over the data; replaces --steps when given.")
@click.option("--batch-size", type=int, default=None, show_default=str(D.optim.batch_size))
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default=None, show_default=D.optim.optimizer,
              help="AdamW (lr 1e-4) converges in far fewer steps from scratch on small data; SGD is the paper's.")
@click.option("--lr", type=float, default=None, help="Learning rate [default: 0.01 x batch / 16 for SGD, 1e-4 AdamW].")
@click.option("--momentum", type=float, default=None, show_default=f"{D.optim.momentum:g}")
@click.option("--weight-decay", type=float, default=None, show_default=f"{D.optim.weight_decay:g}")
@click.option("--schedule", type=click.Choice(["cosine", "step"]), default=None, show_default=D.optim.schedule)
@click.option("--warmup-steps", type=int, default=None, help="Linear warmup steps [default: 10 %% of all steps, at most 500].")
@click.option("--grad-clip", type=float, default=None, show_default=f"{D.optim.grad_clip:g}",
              help="Clip the gradient norm (35 as in mmdetection's RetinaNet; 0: off).")
@click.option("--augment", type=click.Choice(AUGMENT_CHOICES), default=None, show_default=D.augment,
              help="strong: flips, 90-degree rotations, scale 0.8-1.25, contrast, brightness, gain, saturation, hue; "
                   "light: flips, rotations, mild contrast and brightness; none.")
@click.option("--scale-range", default=None, metavar="MIN,MAX", show_default="0.8,1.25 with strong",
              help="Resize factor range of the scale jitter (log-uniform); wider (e.g. 0.5,2) for new ground "
                   "where objects may be smaller or larger than in the training labels.")
@click.option("--early-stopping", type=int, default=None, show_default=str(D.optim.early_stopping), metavar="EPOCHS",
              help="Stop when validation AP has not improved for this many epochs (0: off).")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default=None, show_default=D.device)
@click.option("--devices", type=int, default=None, show_default=str(D.devices),
              help="Training processes per machine: GPUs, or CPU processes with --device cpu (DDP when > 1).")
@click.option("--num-nodes", type=int, default=None, show_default=str(D.num_nodes),
              help="Machines (DDP over torchrun or SLURM srun; see the README).")
@click.option("--amp", type=click.Choice(AMP_CHOICES), default=None, show_default=D.amp,
              help="Mixed precision. auto: bf16 on CUDA where supported (else fp16 with a scaler), bf16 on CPUs "
                   "with native bf16 (AVX512-BF16, AMX), else fp32.")
@click.option("--workers", type=int, default=None, help="DataLoader workers [default: 0 on CPU, up to 8 on CUDA].")
@click.option("--limit-train-batches", type=int, default=None, hidden=True)
@click.option("--resume", is_flag=True, help="Continue the run in -o from its last checkpoint (same schedule).")
@shared(seed_opt, overwrite_opt, progress_opt, json_opt)
def train(config, output, resume, overwrite, progress, as_json, split, anchor_sizes, anchor_scales, anchor_ratios,
          scale_range, imagery, **options):
    """Train a RetinaNet; writes best.pt/last.pt (self-describing checkpoints) and logs to -o."""
    options = given({**options, "imagery": list(imagery) or None, "val_fraction": parse_split(split),
                     "anchor_sizes": parse_floats(anchor_sizes, "--anchor-sizes"),
                     "anchor_scales": parse_floats(anchor_scales, "--anchor-scales", "2^0,2^(1/3),2^(2/3)"),
                     "anchor_ratios": parse_floats(anchor_ratios, "--anchor-ratios", "0.5,1,2"),
                     "scale_range": parse_floats(scale_range, "--scale-range", "0.5,2")})
    if resume:
        cfg, ignored = resume_config(output, options)
        if ignored:
            log.warning("--resume continues the saved configuration; ignoring the different %s",
                        ", ".join(f"--{n.replace('_', '-')}" for n in sorted(ignored)))
    else:
        cfg = TrainConfig.from_options({**options, "output": output}, config_file=config)
    res = run_training(cfg, resume=resume, overwrite=overwrite,
                       progress=sys.stderr.isatty() if progress is None else progress)
    if res.rank != 0:  # another DDP process: rank 0 reports
        return
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(res), indent=2, default=float))
        return
    m = res.best_metrics or {}

    def f(v):
        return "n/a" if v is None or v == -1 else f"{v:.3f}"

    click.echo(f"trained {res.epochs_run} epoch(s) in {res.seconds:.0f} s on {res.device} ({res.precision}); "
               f"{res.n_train} train / {res.n_val} val images, {res.n_train_boxes} train boxes"
               + (f", {res.n_degenerate} degenerate boxes dropped" if res.n_degenerate else ""))
    click.echo(f"best epoch {res.best_epoch}: val AP {f(m.get('AP'))}, AP50 {f(m.get('AP50'))}, "
               f"AP75 {f(m.get('AP75'))} -> {Path(res.run_dir) / 'best.pt'}")
