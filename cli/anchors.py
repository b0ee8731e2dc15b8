"""``geonet anchors``: anchor coverage of the label boxes, default vs fitted configuration."""

from __future__ import annotations

import click
from geonet.cli.options import (
    bands_opt,
    class_field_opt,
    imagery_opt,
    labels_opt,
    layer_opt,
    nodata_opt,
    point_size_opt,
    shared,
    size_opt,
)

from geonet.anchors import anchor_report


@click.command("anchors", short_help="Anchor coverage of the label boxes, default vs fitted anchors.")
@shared(imagery_opt, labels_opt, layer_opt, class_field_opt, bands_opt, nodata_opt, point_size_opt, size_opt)
@click.option("--min-coverage", type=float, default=0.9, show_default=True, help="Warn below this coverage.")
def anchors(imagery, labels, layer, class_field, bands, nodata, point_size, size, min_coverage):
    """Fit anchor sizes and ratios to the label boxes and report coverage.

    Coverage is the share of boxes whose best anchor has IoU >= 0.5 (the matcher's object threshold).
    """
    fit, n_windows = anchor_report(imagery, labels, layer=layer, class_field=class_field, bands=bands, nodata=nodata,
                                   size=size, point_size=point_size)
    click.echo(f"{fit.n_boxes} boxes in {n_windows} windows")
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
