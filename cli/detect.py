"""``geonet detect``: sliding-window detection over whole scenes -> GeoJSON / GeoPackage / Shapefile."""

from __future__ import annotations

import dataclasses
import json

import click
from geonet.cli.options import bands_opt, given, json_opt, progress_opt, shared, tta_opt

from geonet.detect import ENGINES, DetectConfig
from geonet.detect import detect as run_detection
from geonet.device import AMP_CHOICES, DEVICE_CHOICES
from geonet.errors import RunError
from geonet.write import FORMAT_EXTENSIONS

D = DetectConfig(model="")


@click.command("detect", short_help="Detect objects in whole scenes with a trained checkpoint.")
@click.argument("scenes", nargs=-1, required=True, metavar="SCENE...")
@click.option("-m", "--model", required=True, metavar="CKPT", help="Checkpoint from `geonet train` (best.pt).")
@click.option("-o", "--output", required=True, metavar="FILE|DIR/",
              help="out.geojson / .gpkg / .shp / .fgb / .parquet for one scene; an existing folder for several.")
@click.option("--format", "format", type=click.Choice(list(FORMAT_EXTENSIONS)), default=None,
              show_default=D.format, help="Output format when -o is a folder.")
@click.option("--tile", type=int, default=None, help="Tile side in pixels [default: the checkpoint's chip size].")
@click.option("--overlap", default=None, metavar="PX|Nm",
              help="Tile overlap in pixels (64) or metres (6m); at least the largest object "
                   "[default: the largest training box].")
@click.option("--batch-size", type=int, default=None, help="Tiles per model call [default: 2 on CPU, 16 on CUDA].")
@click.option("--workers", type=int, default=None, help="Reader threads [default: half the cores, at most 4].")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default=None, show_default=D.device)
@click.option("--amp", type=click.Choice(AMP_CHOICES), default=None, show_default=D.amp,
              help="Compute precision. auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), "
                   "else fp32.")
@click.option("--score-thresh", type=float, default=None, help="Minimum score [default: the checkpoint's].")
@click.option("--nms-iou", type=float, default=None,
              help="IoU of the NMS inside tiles [default: the checkpoint's, chosen on the validation set].")
@click.option("--merge-iou", type=float, default=None, help="IoU of the cross-tile NMS [default: the NMS IoU].")
@click.option("--resample/--no-resample", default=None, show_default=str(D.resample).lower(),
              help="Resample scenes whose GSD differs from the training GSD by more than 10 %.")
@click.option("--allow-no-crs", is_flag=True, default=None, help="Accept scenes without a CRS and write pixel coordinates.")
@click.option("--nodata", type=float, default=None,
              help="Nodata value [default: the scene's own; a scene without one has none].")
@shared(bands_opt)
@click.option("--precision", "coord_precision", type=int, default=None, show_default=str(D.coord_precision),
              help="Decimals of GeoJSON coordinates (7 = ~1 cm).")
@click.option("--preview", default=None, metavar="PNG",
              help="Draw detections on a downsampled scene (one scene: this path; several: one PNG per output).")
@shared(tta_opt)
@click.option("--resume", is_flag=True, default=None, help="Skip scenes whose output already exists.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace existing outputs.")
@click.option("--asset", default=None, metavar="NAME",
              help="Asset of scenes given as STAC items [default: visual, else the item's only GeoTIFF].")
@click.option("--engine", type=click.Choice(ENGINES), default=None, show_default=D.engine,
              help="local: this process; ray: scenes as tasks on a Ray cluster (pip install 'geonet[ray]').")
@click.option("--address", default=None, metavar="auto|HOST:PORT",
              help="Ray cluster of --engine ray [default: a local Ray instance].")
@click.option("--actors", type=int, default=None,
              help="Ray actors (one model each) of --engine ray [default: the cluster's GPUs, else CPUs / 2].")
@click.option("--band-tiles", type=int, default=None, show_default=str(D.band_tiles),
              help="--engine ray: split a scene of more tiles into bands of about this many tiles, detected in "
                   "parallel and joined by the seam merge (0: never split).")
@shared(progress_opt, json_opt)
def detect(scenes, output, progress, as_json, **options):
    """Detect objects in SCENE(s) (files, folders, quoted globs, COG URLs such as https://... or s3://...,
    or STAC items) with a trained checkpoint."""

    def line(r):
        if r.error:
            click.echo(f"FAILED {r.scene}: {r.error}", err=True)
        elif not as_json:
            click.echo(f"{r.detections} detections in {r.scene} ({r.tiles} tiles, {r.tiles_skipped} nodata tiles "
                       f"skipped, {r.seconds:.1f} s) -> {r.output}" + (f", preview {r.preview}" if r.preview else ""))

    rep = run_detection(list(scenes), output, DetectConfig(**given(options)), show_progress=progress, on_scene=line)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(rep), indent=2, default=str))
    elif rep.scenes:
        click.echo(f"score >= {rep.score_thresh:.3f} ({rep.score_source}; --score-thresh 0.05 keeps the whole "
                   f"precision-recall curve for evaluation), NMS IoU {rep.nms_iou:g}")
    if rep.skipped_done and not as_json:
        click.echo(f"{rep.skipped_done} scene(s) already done (--resume)")
    if rep.failed:
        raise RunError(f"{rep.failed} of {len(rep.scenes)} scene(s) failed (see above); the others were written.",
                       fix="fix or leave out the failed scenes and run again with --resume.")
