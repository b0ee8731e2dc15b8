"""``geonet evaluate``: COCO-style AP in map space against vector ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import click
from geonet.cli.options import given, json_opt, parse_area_bins, progress_opt, shared, tta_opt

from geonet.errors import InputError
from geonet.evaluate import ClassMismatch, EvalConfig, evaluate_files, evaluate_model, parse_class_map

D = EvalConfig()


@click.command("evaluate", short_help="Score detections against vector ground truth (COCO AP in map space).")
@click.argument("predictions", nargs=-1, metavar="[PREDICTIONS]...")
@click.option("--truth", required=True, metavar="FILE", help="Ground truth: any OGR vector file (any CRS), or a "
              "COCO annotations.json (then PREDICTIONS is a COCO results .json, in pixels).")
@click.option("-o", "--output", required=True, metavar="DIR", help="Report folder.")
@click.option("--aoi", default=None, metavar="FILE",
              help="Polygons of the area of interest [default: the predictions' imagery footprint, else the truth extent].")
@click.option("--class-field", default=None, help="Truth attribute with the class name [default: one class].")
@click.option("--layer", default=None, help="Truth layer (GeoPackage).")
@click.option("--score-field", default=None, show_default=D.score_field, help="Prediction attribute with the score.")
@click.option("--pred-class-field", default=None, show_default=D.pred_class_field,
              help="Prediction attribute with the class.")
@click.option("--class-map", multiple=True, metavar="PRED=TRUTH", help="Map a predicted class name to a truth name.")
@click.option("--crs", default=None, help="Metric CRS to compare in [default: each object's local UTM zone].")
@click.option("--iou", type=float, default=None, show_default=f"{D.iou:g}",
              help="IoU of the precision/recall/F1 operating point (DeepForest's NEON benchmark uses 0.4).")
@click.option("--score-thresh", type=float, default=None, help="Score threshold [default: the one maximising F1].")
@click.option("--area-bins", default=None, show_default=",".join(f"{v:g}" for v in D.area_bins), metavar="SMALL,MEDIUM",
              help="Upper bounds in square metres of the small and medium size bins.")
@click.option("--model", default=None, metavar="CKPT", help="Detect first with this checkpoint on --imagery.")
@click.option("--imagery", multiple=True, metavar="DIR|FILE|GLOB", help="Scenes to detect on (with --model).")
@shared(tta_opt)
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
@shared(progress_opt, json_opt)
def evaluate(predictions, truth, output, model, imagery, tta, overwrite, class_map, area_bins, progress, as_json,
             **options):
    """Score PREDICTIONS (geonet outputs or any vector file with scores) against --truth."""
    cfg = EvalConfig(**given({**options, "area_bins": parse_area_bins(area_bins),
                              "class_map": parse_class_map(class_map)}))
    try:
        if model:
            if predictions:
                raise InputError("pass either PREDICTIONS or --model with --imagery, not both.",
                                 fix="drop the PREDICTIONS, or --model.")
            if not imagery:
                raise InputError("--model needs --imagery (the scenes to detect on).", fix="add --imagery SCENES.")
            rep = evaluate_model(model, imagery, truth, cfg, output, overwrite=overwrite, show_progress=progress,
                                 tta=bool(tta))
        else:
            for given_opt, name in ((tta, "--tta"), (imagery, "--imagery")):
                if given_opt:
                    raise InputError(f"{name} is for detecting with --model, and no --model was given.",
                                     fix=f"pass --model CKPT --imagery SCENES, or drop {name}.")
            rep = evaluate_files(predictions, truth, cfg, output, overwrite=overwrite)
    except ClassMismatch as exc:
        click.echo("class names of predictions and truth:\n" + exc.table, err=True)
        raise
    if as_json:
        click.echo(json.dumps({**rep.to_dict(), "out_dir": rep.out_dir}, indent=2, default=float))
        return
    m, op = rep.metrics, rep.operating

    def f(v):
        return "n/a" if v is None or v < 0 else f"{v:.3f}"

    click.echo(f"{rep.n_truth} truth objects, {rep.n_predictions} predictions ({rep.crs}; AOI: {rep.aoi})")
    click.echo(f"AP {f(m['AP'])}  AP50 {f(m['AP50'])}  AP75 {f(m['AP75'])}  AR@100 {f(m.get('AR@100'))}")
    click.echo(f"at IoU {op['iou']:g}, score >= {op['score_thresh']:.3f} ({op['chosen']}): precision "
               f"{op['precision']:.3f}, recall {op['recall']:.3f}, F1 {op['f1']:.3f} (TP {op['tp']}, FP {op['fp']}, "
               f"FN {op['fn']})")
    click.echo(f"report: {Path(output) / 'report.md'}")
