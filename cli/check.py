"""``geonet check``: pre-flight report on imagery and labels."""

from __future__ import annotations

import json

import click
from geonet.cli.options import bands_opt, class_field_opt, imagery_opt, layer_opt, nodata_opt, point_size_opt, shared

from geonet.check import check as check_inputs


@click.command("check", short_help="Pre-flight report on imagery and labels (CRS, GSD, bands, boxes).")
@shared(imagery_opt)
@click.option("--labels", "labels", default=None, metavar="FILE", help="Vector labels to check against the imagery.")
@shared(layer_opt, class_field_opt, bands_opt, nodata_opt, point_size_opt)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(imagery, labels, layer, class_field, bands, nodata, point_size, as_json):
    """Report CRS, GSD, size, bands, dtype, nodata and labels for each raster, and box sizes.

    Exits 1 when a problem is found (missing CRS, unreadable raster, labels on no raster).
    """
    rep = check_inputs(imagery, labels, layer=layer, class_field=class_field, bands=bands, nodata=nodata,
                       point_size=point_size)
    click.echo(json.dumps(rep.to_dict(), indent=2) if as_json else render(rep))
    return 1 if rep.problems else 0


def render(rep) -> str:
    lines = [f"{'raster':<40} {'CRS':<12} {'GSD m':>7} {'size':>11} {'bands':>7} {'dtype':>8} {'nodata':>7} {'labels':>6}"]
    for r in rep.rasters:
        name = r.path if len(r.path) <= 40 else "..." + r.path[-37:]
        if r.error:
            lines.append(f"{name:<40} ERROR {r.error}")
            continue
        gsd = "-" if r.gsd_m is None else f"{(r.gsd_m[0] * r.gsd_m[1]) ** 0.5:.3f}"
        size = f"{r.width}x{r.height}"
        nd = "-" if r.nodata is None else f"{r.nodata:g}"
        lines.append(f"{name:<40} {str(r.crs or 'NONE'):<12} {gsd:>7} {size:>11} {len(r.bands):>7} {r.dtype:>8} "
                     f"{nd:>7} {r.labels_inside:>6}")
    if rep.labels_path:
        lines.append("")
        lines.append(f"labels: {rep.labels_path} ({rep.labels_crs}): {rep.labels_total} usable, "
                     f"{rep.labels_empty} empty dropped, {rep.labels_repaired} repaired, "
                     f"{rep.labels_outside} on no raster")
        if rep.per_class:
            lines.append("classes: " + ", ".join(f"{k}={v}" for k, v in rep.per_class.items()))
        for unit, stats in (("px", rep.box_px), ("m", rep.box_m)):
            if stats:
                lines.append(f"box side ({unit}), min/p5/median/p95/max: " + "/".join(f"{v:g}" for v in stats["side"])
                             + f"  width: {stats['width'][2]:g} median, height: {stats['height'][2]:g} median")
    if rep.problems:
        lines.append("")
        lines.append(f"{len(rep.problems)} problem(s):")
        lines.extend(f"  - {p}" for p in rep.problems)
    return "\n".join(lines)
