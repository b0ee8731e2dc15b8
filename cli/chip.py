"""``geonet chip``: rasters + vector labels -> GeoTIFF chips and a COCO annotations.json."""

from __future__ import annotations

import logging

import click

from geonet.chip import ChipConfig, plan_chips, write_chips
from geonet.cli.options import (bands_opt, class_field_opt, imagery_opt, labels_opt, layer_opt, nodata_opt,
                                overwrite_opt, parse_split, point_size_opt, seed_opt, shared)
from geonet.labels import LabelIndex, read_labels
from geonet.raster import describe_raster, find_rasters
from geonet.atomic import check_output_dir

log = logging.getLogger("geonet")


@click.command("chip")
@shared(imagery_opt, labels_opt, layer_opt, class_field_opt, bands_opt, nodata_opt)
@click.option("-o", "--output", "output", required=True, metavar="DIR", help="Output folder for the chips.")
@click.option("--size", type=int, default=512, show_default=True, help="Chip side in pixels.")
@click.option("--stride", type=int, default=None, help="Step between chips in pixels [default: --size].")
@click.option("--min-visible", type=float, default=0.5, show_default=True,
              help="Minimum visible fraction of a box cut by a chip edge to stay a target; less becomes an ignore region.")
@click.option("--negative-ratio", type=float, default=0.25, show_default=True,
              help="Background-only chips kept per chip with objects.")
@click.option("--split", default=None, metavar="val=F", help="Spatial train/val split, e.g. val=0.2.")
@click.option("--split-by", type=click.Choice(["auto", "raster", "block"]), default="auto", show_default=True,
              help="Split unit: whole (non-overlapping) rasters, or spatial blocks.")
@click.option("--block-size", type=int, default=None, help="Block side in pixels for --split-by block.")
@click.option("--preview", type=int, default=0, show_default=True, metavar="N", help="Write N preview PNGs with boxes.")
@click.option("--compress", type=click.Choice(["none", "deflate", "lzw", "zstd"]), default="deflate",
              show_default=True, help="GeoTIFF compression of the chips.")
@shared(point_size_opt, seed_opt, overwrite_opt)
def command(imagery, labels, layer, class_field, bands, nodata, output, size, stride, min_visible, negative_ratio,
            split, split_by, block_size, preview, compress, point_size, seed, overwrite):
    """Cut georeferenced GeoTIFF chips and a COCO annotations.json from rasters and vector labels."""
    config = ChipConfig(size=size, stride=stride, min_visible=min_visible, negative_ratio=negative_ratio,
                        val_fraction=parse_split(split), split_by=split_by, block_size=block_size, seed=seed,
                        point_size=point_size, compress=compress)
    config.validate()
    check_output_dir(output, overwrite=overwrite)
    paths = find_rasters(imagery)
    lab = read_labels(labels, layer=layer, class_field=class_field)
    infos = [describe_raster(p, bands=bands, nodata=nodata) for p in paths]
    plan = plan_chips(infos, LabelIndex(lab, point_size=point_size), config)
    rep = write_chips(plan, output, config, preview=preview, overwrite=overwrite)
    click.echo(f"{rep.chips} chips ({rep.chips_train} train, {rep.chips_val} val, {rep.chips_negative} background) "
               f"with {rep.boxes} boxes and {rep.ignore_regions} ignore regions -> {rep.out_dir}")
    click.echo(f"labels: {rep.labels_inside} of {rep.labels_total} fall on the imagery; "
               f"{rep.skipped_nodata} all-nodata windows skipped; split by {rep.split_by or 'none'}; "
               f"classes: {', '.join(rep.classes)}")
