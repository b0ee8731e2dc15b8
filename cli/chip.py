"""``geonet chip``: rasters + vector labels -> GeoTIFF chips and a COCO annotations.json."""

from __future__ import annotations

import dataclasses

import click
from geonet.cli.options import (
    bands_opt,
    class_field_opt,
    given,
    imagery_opt,
    labels_opt,
    layer_opt,
    nodata_opt,
    overwrite_opt,
    parse_split,
    point_size_opt,
    seed_opt,
    shared,
    size_opt,
)

from geonet.chip import ChipConfig
from geonet.chip import chip as make_chips

D = ChipConfig()


@click.command("chip", short_help="Cut georeferenced GeoTIFF chips and a COCO annotations.json.")
@shared(imagery_opt, labels_opt, layer_opt, class_field_opt, bands_opt, nodata_opt)
@click.option("-o", "--output", "output", required=True, metavar="DIR", help="Output folder for the chips.")
@shared(size_opt)
@click.option("--stride", type=int, default=None, help="Step between chips in pixels [default: --size].")
@click.option("--min-visible", type=float, default=None, show_default=f"{D.min_visible:g}",
              help="Minimum visible fraction of a box cut by a chip edge to stay a target; less becomes an ignore region.")
@click.option("--negative-ratio", type=float, default=None, show_default=f"{D.negative_ratio:g}",
              help="Background-only chips kept per chip with objects.")
@click.option("--split", default=None, metavar="val=F", help="Spatial train/val split, e.g. val=0.2 [default: none].")
@click.option("--split-by", type=click.Choice(["auto", "raster", "block"]), default=None, show_default=D.split_by,
              help="Split unit: whole (non-overlapping) rasters, or spatial blocks.")
@click.option("--block-size", type=int, default=None, help="Block side in pixels for --split-by block.")
@click.option("--preview", type=int, default=0, show_default=True, metavar="N", help="Write N preview PNGs with boxes.")
@click.option("--compress", type=click.Choice(["none", "deflate", "lzw", "zstd"]), default=None,
              show_default=D.compress, help="GeoTIFF compression of the chips.")
@shared(point_size_opt, seed_opt, overwrite_opt)
def chip(imagery, labels, layer, class_field, bands, nodata, output, preview, overwrite, split, **options):
    """Cut georeferenced GeoTIFF chips and a COCO annotations.json from rasters and vector labels."""
    config = dataclasses.replace(D, **given({**options, "val_fraction": parse_split(split)}))
    rep = make_chips(imagery, labels, output, config, layer=layer, class_field=class_field, bands=bands,
                     nodata=nodata, preview=preview, overwrite=overwrite)
    click.echo(f"{rep.chips} chips ({rep.chips_train} train, {rep.chips_val} val, {rep.chips_negative} background) "
               f"with {rep.boxes} boxes and {rep.ignore_regions} ignore regions -> {rep.out_dir}")
    click.echo(f"labels: {rep.labels_inside} of {rep.labels_total} fall on the imagery; "
               f"{rep.skipped_nodata} all-nodata windows skipped; split by {rep.split_by or 'none'}; "
               f"classes: {', '.join(rep.classes)}")
