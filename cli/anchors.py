"""``geonet anchors``: anchor coverage of the label boxes, default vs fitted configuration."""

from __future__ import annotations

import click

from geonet.anchors import fit_anchors
from geonet.chip import ChipConfig, plan_chips
from geonet.cli.options import (bands_opt, class_field_opt, imagery_opt, labels_opt, layer_opt, nodata_opt,
                                point_size_opt, shared)
from geonet.labels import LabelIndex, read_labels
from geonet.raster import describe_raster, find_rasters


@click.command("anchors")
@shared(imagery_opt, labels_opt, layer_opt, class_field_opt, bands_opt, nodata_opt, point_size_opt)
@click.option("--size", type=int, default=512, show_default=True, help="Chip side in pixels.")
@click.option("--min-coverage", type=float, default=0.9, show_default=True, help="Warn below this coverage.")
def command(imagery, labels, layer, class_field, bands, nodata, point_size, size, min_coverage):
    """Fit anchor sizes and ratios to the label boxes and report coverage.

    Coverage is the share of boxes whose best anchor has IoU >= 0.5 (the matcher's object threshold).
    """
    import numpy as np

    infos = [describe_raster(p, bands=bands, nodata=nodata) for p in find_rasters(imagery)]
    lab = read_labels(labels, layer=layer, class_field=class_field)
    plan = plan_chips(infos, LabelIndex(lab, point_size=point_size), ChipConfig(size=size, negative_ratio=0))
    boxes = np.concatenate([s.labels.boxes for s in plan.specs]) if plan.specs else np.zeros((0, 4))
    fit = fit_anchors(boxes, (size, size))
    click.echo(f"{fit.n_boxes} boxes in {len(plan.specs)} chips of {size} px")
    click.echo(f"default  sizes {','.join(f'{s:g}' for s in fit.default_sizes)}  ratios "
               f"{','.join(f'{r:g}' for r in fit.default_ratios)}: coverage {fit.default_coverage:.3f}, "
               f"mean best IoU {fit.default_mean_iou:.3f}")
    click.echo(f"fitted   sizes {','.join(f'{s:g}' for s in fit.sizes)}  ratios "
               f"{','.join(f'{r:g}' for r in fit.ratios)}: coverage {fit.coverage:.3f}, "
               f"mean best IoU {fit.mean_iou:.3f}")
    click.echo(f"use: geonet train ... {fit.as_flags()}   (or --fit-anchors)")
    if fit.default_coverage < min_coverage:
        click.echo(f"warning: the default anchors cover only {100 * fit.default_coverage:.0f} % of the boxes "
                   f"(< {100 * min_coverage:.0f} %); use the fitted ones.", err=True)
    if fit.coverage < min_coverage:
        click.echo(f"warning: even fitted anchors cover only {100 * fit.coverage:.0f} % of the boxes: check for tiny or "
                   "very elongated labels (geonet check), or change --size.", err=True)
