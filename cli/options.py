"""Options shared by several commands, as decorators (in the style of rasterio's ``rio`` CLI).

Values are validated by the library functions, which raise one-line :class:`geonet.errors.InputError`\\ s;
the converters here only parse text.
"""

from __future__ import annotations

import click

from geonet.errors import InputError
from geonet.raster import parse_bands


def _bands(ctx, param, value):
    return parse_bands(value) if value else None


imagery_opt = click.option(
    "--imagery", "imagery", multiple=True, required=True, metavar="DIR|FILE|GLOB",
    help="Raster(s): a folder, files, or a quoted glob ('tiles/*.tif'). Repeat for several.")
labels_opt = click.option("--labels", "labels", required=True, metavar="FILE",
                          help="Vector labels in any OGR format and any CRS (.shp, .geojson, .gpkg).")
layer_opt = click.option("--layer", default=None, help="Layer of a multi-layer label source (GeoPackage).")
class_field_opt = click.option("--class-field", default=None, metavar="FIELD",
                               help="Attribute with the class name [default: one class named after the file].")
bands_opt = click.option("--bands", default=None, callback=_bands, metavar="3,2,1",
                         help="Bands to read, 1-based, in order [default: all but alpha].")
nodata_opt = click.option("--nodata", type=float, default=None, help="Nodata value [default: from the file].")
point_size_opt = click.option("--point-size", type=float, default=1.0, show_default=True, metavar="METRES",
                              help="Side of the square box given to point labels.")
overwrite_opt = click.option("--overwrite", is_flag=True, help="Replace an existing output.")
seed_opt = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")


def parse_split(value: str | None) -> float:
    """``--split val=0.2`` -> 0.2 (``None`` -> 0.0)."""
    if not value:
        return 0.0
    text = value.strip()
    if "=" in text:
        key, _, num = text.partition("=")
        if key.strip().lower() != "val":
            raise InputError(f"--split {value!r}: only the val share can be set.", fix="use --split val=0.2.")
        text = num
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--split {value!r} is not a fraction.", fix="use --split val=0.2.") from None


def shared(*decorators):
    """Apply several option decorators in the order listed."""
    def wrap(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return wrap
