"""``geonet evaluate``: COCO-style AP in map space against vector ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from geonet.atomic import make_dir
from geonet.errors import InputError
from geonet.evaluate import ClassMismatch, EvalConfig, evaluate, evaluate_coco, is_coco_json, parse_class_map


@click.command("evaluate")
@click.argument("predictions", nargs=-1, metavar="[PREDICTIONS]...")
@click.option("--truth", required=True, metavar="FILE", help="Ground truth: any OGR vector file (any CRS), or a "
              "COCO annotations.json (then PREDICTIONS is a COCO results .json, in pixels).")
@click.option("-o", "--output", required=True, metavar="DIR", help="Report folder.")
@click.option("--aoi", default=None, metavar="FILE",
              help="Polygons of the area of interest [default: the predictions' imagery footprint, else the truth extent].")
@click.option("--class-field", default=None, help="Truth attribute with the class name [default: one class].")
@click.option("--layer", default=None, help="Truth layer (GeoPackage).")
@click.option("--score-field", default="score", show_default=True, help="Prediction attribute with the score.")
@click.option("--pred-class-field", default="label", show_default=True, help="Prediction attribute with the class.")
@click.option("--class-map", multiple=True, metavar="PRED=TRUTH", help="Map a predicted class name to a truth name.")
@click.option("--crs", default=None, help="Metric CRS to compare in [default: the truth's UTM zone].")
@click.option("--iou", type=float, default=0.5, show_default=True,
              help="IoU of the precision/recall/F1 operating point (DeepForest's NEON benchmark uses 0.4).")
@click.option("--score-thresh", type=float, default=None, help="Score threshold [default: the one maximising F1].")
@click.option("--area-bins", default="10,100", show_default=True, metavar="SMALL,MEDIUM",
              help="Upper bounds in square metres of the small and medium size bins.")
@click.option("--model", default=None, metavar="CKPT", help="Detect first with this checkpoint on --imagery.")
@click.option("--imagery", multiple=True, metavar="DIR|FILE|GLOB", help="Scenes to detect on (with --model).")
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
def command(predictions, truth, output, aoi, class_field, layer, score_field, pred_class_field, class_map, crs, iou,
            score_thresh, area_bins, model, imagery, overwrite):
    """Score PREDICTIONS (geonet outputs or any vector file with scores) against --truth."""
    try:
        lo, hi = (float(v) for v in area_bins.split(","))
    except ValueError:
        raise InputError(f"--area-bins {area_bins!r}: give two numbers, e.g. 10,100.") from None
    cfg = EvalConfig(iou=iou, score_thresh=score_thresh, area_bins=(lo, hi), crs=crs, class_field=class_field,
                     layer=layer, score_field=score_field, pred_class_field=pred_class_field,
                     class_map=parse_class_map(class_map), aoi=aoi)
    if model:
        if predictions:
            raise InputError("pass either PREDICTIONS or --model with --imagery, not both.")
        if not imagery:
            raise InputError("--model needs --imagery (the scenes to detect on).")
        predictions = _detect_first(model, imagery, output, overwrite=overwrite)
    if not predictions:
        raise InputError("no PREDICTIONS given.", fix="pass the output of `geonet detect`, or --model with --imagery.")
    try:
        if is_coco_json(truth):
            if len(predictions) != 1:
                raise InputError("a COCO truth file takes one COCO results .json as PREDICTIONS.")
            rep = evaluate_coco(truth, predictions[0], cfg, output, overwrite=overwrite)
        else:
            rep = evaluate(list(predictions), truth, cfg, output, overwrite=overwrite)
    except ClassMismatch as exc:
        click.echo("class names of predictions and truth:\n" + exc.table, err=True)
        raise
    m, op = rep.metrics, rep.operating

    def f(v):
        return "n/a" if v is None or v < 0 else f"{v:.3f}"

    click.echo(f"{rep.n_truth} truth objects, {rep.n_predictions} predictions ({rep.crs}; AOI: {rep.aoi})")
    click.echo(f"AP {f(m['AP'])}  AP50 {f(m['AP50'])}  AP75 {f(m['AP75'])}  AR@100 {f(m.get('AR@100'))}")
    click.echo(f"at IoU {op['iou']:g}, score >= {op['score_thresh']:.3f} ({op['chosen']}): precision "
               f"{op['precision']:.3f}, recall {op['recall']:.3f}, F1 {op['f1']:.3f} (TP {op['tp']}, FP {op['fp']}, "
               f"FN {op['fn']})")
    click.echo(f"report: {Path(output) / 'report.md'}")


def _detect_first(model, imagery, output, *, overwrite: bool):
    """Run `geonet detect` into OUTPUT-detections/ (one GeoJSON per scene) and return those files.

    Scenes already detected there are kept (resume), unless ``overwrite`` (the model may have changed).
    Detection keeps the model's own low threshold (0.05 by default), not the checkpoint's operating
    point: AP needs the whole precision-recall curve.
    """
    from geonet.checkpoint import read_checkpoint
    from geonet.detect import DetectConfig, detect, resolve_outputs

    out = Path(output)
    det_dir = out.parent / (out.name + "-detections")
    make_dir(det_dir)
    click.echo(f"detecting into {det_dir}/", err=True)
    low = float(read_checkpoint(model)["model_config"]["score_thresh"])
    cfg = DetectConfig(model=model, format="geojson", resume=not overwrite, score_thresh=low)
    rep = detect(list(imagery), str(det_dir) + "/", cfg, show_progress=True)
    if rep.failed:
        raise InputError(f"{rep.failed} scene(s) failed to detect (see above).")
    return [str(o) for o in resolve_outputs(list(imagery), str(det_dir) + "/", "geojson")[1]]
