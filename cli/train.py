"""``geonet train``: train a RetinaNet on rasters + labels, a chip folder, or COCO/VOC image sets."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import yaml
from click.core import ParameterSource

from geonet.cli.options import (bands_opt, class_field_opt, layer_opt, nodata_opt, overwrite_opt, parse_split,
                                point_size_opt, seed_opt, shared)
from geonet.errors import InputError
from geonet.model import BACKBONES
from geonet.train import TrainConfig, load_run_config, train

D = TrainConfig()  # option defaults come from the library's

log = logging.getLogger("geonet")

_LIST_KEYS = ("anchor_sizes", "anchor_scales", "anchor_ratios", "bands")


def _floats(text, name):
    if text is None or isinstance(text, (list, tuple)):
        return None if text is None else [float(v) for v in text]
    from geonet.anchors import eval_fraction

    try:
        return [float(eval_fraction(t)) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--{name.replace('_', '-')} {text!r} is not a comma-separated list of numbers.",
                         fix="e.g. 32,64,128,256,512.") from None


def _load_config(ctx, param, value):
    """``--config FILE.yaml``: its keys (TrainConfig fields) become defaults; flags on the command line win."""
    if not value:
        return value
    p = Path(value)
    if not p.exists():
        raise InputError(f"--config {value}: no such file.", fix="check the path.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"--config {value}: not valid YAML ({' '.join(str(exc).split())[:120]}).") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {value}: the YAML must be a mapping of option names to values.")
    TrainConfig.from_dict({k: v for k, v in data.items()})  # unknown keys -> one-line error
    defaults = {}
    for k, v in data.items():
        if k == "val_fraction":
            defaults["split"] = f"val={v}"
        elif k in _LIST_KEYS and isinstance(v, list):
            defaults[k] = ",".join(str(x) for x in v)
        elif k == "imagery" and isinstance(v, str):
            defaults[k] = [v]
        else:
            defaults[k] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


@click.command("train")
@click.option("--config", type=str, default=None, callback=_load_config, is_eager=True, expose_value=False,
              help="YAML file of options (keys as in the run's config.yaml); flags override it.")
@click.option("--imagery", multiple=True, metavar="DIR|FILE|GLOB", help="Rasters (with --labels): windows cut on the fly.")
@click.option("--labels", default=None, metavar="FILE", help="Vector labels for --imagery.")
@shared(layer_opt, class_field_opt, bands_opt, nodata_opt, point_size_opt)
@click.option("--chips", default=None, metavar="DIR", help="A `geonet chip` output folder instead of --imagery.")
@click.option("--coco", default=None, metavar="JSON", help="A COCO detection JSON (images need not be georeferenced).")
@click.option("--images", default=None, metavar="DIR", help="Image folder of --coco [default: the JSON's folder].")
@click.option("--voc", default=None, metavar="DIR", help="A Pascal VOC folder (Annotations/ + JPEGImages/).")
@click.option("-o", "--output", required=True, metavar="DIR", help="Run folder (checkpoints, logs, curves).")
@click.option("--size", type=int, default=D.size, show_default=True, help="Chip side in pixels.")
@click.option("--stride", type=int, default=None, help="Window step in pixels [default: --size].")
@click.option("--min-visible", type=float, default=D.min_visible, show_default=True, help="Edge rule, as in `geonet chip`.")
@click.option("--negative-ratio", type=float, default=D.negative_ratio, show_default=True, help="Background chips per object chip.")
@click.option("--split", default="val=0.2", show_default=True, metavar="val=F", help="Spatial validation split.")
@click.option("--split-by", type=click.Choice(["auto", "raster", "block"]), default="auto", show_default=True)
@click.option("--block-size", type=int, default=None, help="Block side in pixels for --split-by block.")
@click.option("--backbone", type=click.Choice(list(BACKBONES)), default=D.backbone, show_default=True)
@click.option("--weights", default="none", show_default=True, metavar="coco|imagenet|none|PATH",
              help="Initial weights: torchvision COCO RetinaNet (resnet50), ImageNet backbone, none, or a local file.")
@click.option("--anchor-sizes", default=",".join(f"{v:g}" for v in D.anchor_sizes), show_default=True, help="Base anchor side per level P3..P7 (px).")
@click.option("--anchor-scales", default="2^0,2^(1/3),2^(2/3)", show_default=True, help="Scales per level.")
@click.option("--anchor-ratios", default=",".join(f"{v:g}" for v in D.anchor_ratios), show_default=True, help="Aspect ratios (height/width).")
@click.option("--fit-anchors", is_flag=True, help="Fit anchor sizes and ratios to the training boxes (see `geonet anchors`).")
@click.option("--focal-alpha", type=float, default=D.focal_alpha, show_default=True)
@click.option("--focal-gamma", type=float, default=D.focal_gamma, show_default=True)
@click.option("--fg-iou", type=float, default=D.fg_iou, show_default=True, help="Matcher: anchors at or above are objects.")
@click.option("--bg-iou", type=float, default=D.bg_iou, show_default=True, help="Matcher: anchors below are background.")
@click.option("--score-thresh", type=float, default=D.score_thresh, show_default=True)
@click.option("--nms-iou", type=float, default=D.nms_iou, show_default=True)
@click.option("--detections-per-img", type=int, default=D.detections_per_img, show_default=True)
@click.option("--trainable-layers", type=int, default=None, help="Backbone stages to train [default: 3 pretrained, 5 scratch].")
@click.option("--epochs", type=int, default=D.epochs, show_default=True)
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True,
              help="AdamW (lr 1e-4) converges in far fewer steps from scratch on small data; SGD is the paper's.")
@click.option("--lr", type=float, default=None, help="Learning rate [default: 0.01 x batch / 16 for SGD, 1e-4 AdamW].")
@click.option("--momentum", type=float, default=D.momentum, show_default=True)
@click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step"]), default="cosine", show_default=True)
@click.option("--warmup-steps", type=int, default=None, help="Linear warmup steps [default: 10 %% of all steps, at most 500].")
@click.option("--grad-clip", type=float, default=D.grad_clip, show_default=True,
              help="Clip the gradient norm (35 as in mmdetection's RetinaNet; 0: off).")
@click.option("--augment/--no-augment", default=True, show_default=True, help="Flips, 90-degree rotations, jitter.")
@click.option("--early-stopping", type=int, default=0, show_default=True, metavar="EPOCHS",
              help="Stop when validation AP has not improved for this many epochs (0: off).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--devices", type=int, default=1, show_default=True, help="GPUs (DDP when > 1).")
@click.option("--amp", type=click.Choice(["auto", "32", "bf16", "16"]), default="auto", show_default=True,
              help="Mixed precision. auto: bf16 on CUDA where supported (else fp16 with a scaler), fp32 on CPU.")
@click.option("--workers", type=int, default=None, help="DataLoader workers [default: 0 on CPU, up to 8 on CUDA].")
@click.option("--limit-train-batches", type=int, default=None, hidden=True)
@click.option("--resume", is_flag=True, help="Continue the run in -o from its last checkpoint (same schedule).")
@shared(seed_opt, overwrite_opt)
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
@click.pass_context
def command(ctx, output, resume, overwrite, progress, split, anchor_sizes, anchor_scales, anchor_ratios, imagery,
            **kw):
    """Train a RetinaNet; writes best.pt/last.pt (self-describing checkpoints) and logs to -o."""
    if resume:
        cfg = load_run_config(output)
        given = [p.name for p in ctx.command.params
                 if ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE
                 and p.name not in ("output", "resume", "progress", "workers", "device")
                 and _differs(cfg, p.name, ctx.params[p.name])]
        if given:
            log.warning("--resume continues the saved configuration; ignoring the different %s",
                        ", ".join(f"--{n.replace('_', '-')}" for n in sorted(given)))
        if ctx.get_parameter_source("workers") == ParameterSource.COMMANDLINE:
            cfg.workers = kw["workers"]
    else:
        cfg = TrainConfig(output=output, imagery=list(imagery), val_fraction=parse_split(split),
                          anchor_sizes=_floats(anchor_sizes, "anchor_sizes"),
                          anchor_scales=_floats(anchor_scales, "anchor_scales"),
                          anchor_ratios=_floats(anchor_ratios, "anchor_ratios"),
                          **{k: (list(v) if k == "bands" and v is not None else v) for k, v in kw.items()})
    res = train(cfg, resume=resume, overwrite=overwrite, progress=progress)
    m = res.best_metrics or {}

    def f(v):
        return "n/a" if v is None or v == -1 else f"{v:.3f}"

    click.echo(f"trained {res.epochs_run} epoch(s) in {res.seconds:.0f} s on {res.device} ({res.precision}); "
               f"{res.n_train} train / {res.n_val} val images, {res.n_train_boxes} train boxes"
               + (f", {res.n_degenerate} degenerate boxes dropped" if res.n_degenerate else ""))
    click.echo(f"best epoch {res.best_epoch}: val AP {f(m.get('AP'))}, AP50 {f(m.get('AP50'))}, "
               f"AP75 {f(m.get('AP75'))} -> {Path(res.run_dir) / 'best.pt'}")


def _differs(cfg, name: str, value) -> bool:
    """Whether a command-line option given with --resume differs from the saved run configuration."""
    try:
        if name == "split":
            return parse_split(value) != cfg.val_fraction
        if name.startswith("anchor_"):
            return _floats(value, name) != list(getattr(cfg, name))
        if not hasattr(cfg, name):
            return True
        saved = getattr(cfg, name)
        if isinstance(value, tuple) or isinstance(saved, (list, tuple)):
            return list(value or []) != list(saved or [])
        return value != saved
    except Exception:  # an option that does not parse differs by definition
        return True
