"""Options shared by several commands, as decorators (in the style of rasterio's ``rio`` CLI), and the
parsers of option text.

Defaults live in the library's config dataclasses; options whose default is the library's take
``default=None`` here and show the library's value in ``--help`` (``show_default=...``). Values are
validated by the library, which raises one-line :class:`geonet.errors.InputError`\\ s; the converters
here only parse text.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from geonet.chip import DEFAULT_SIZE
from geonet.errors import InputError
from geonet.raster import parse_bands


def _bands(ctx, param, value):
    return parse_bands(value) if value else None


def parse_split(value: str | None) -> float | None:
    """``--split val=0.2`` -> 0.2 (``None`` -> ``None``).

    Raises:
        InputError: anything else.
    """
    if value is None or value == "":
        return None
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


def parse_number(text: str) -> float:
    """``"2^(1/3)"``, ``"1.26"`` or ``"1/2"`` -> float (no ``eval``).

    Raises:
        ValueError: not a number in one of those forms.
    """
    t = text.strip()
    if "^" in t:
        b, e = t.split("^", 1)
        return float(b) ** parse_number(e.strip("()"))
    if "/" in t:
        n, d = t.split("/", 1)
        return float(n) / float(d)
    return float(t)


def parse_floats(text: str | None, option: str, example: str = "32,64,128,256,512") -> list[float] | None:
    """``"32,64,128"`` or ``"2^0,2^(1/3)"`` -> list of floats (``None`` -> ``None``); ``example`` goes in the fix.

    Raises:
        InputError: an item that is not a number.
    """
    if text is None:
        return None
    try:
        return [parse_number(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"{option} {text!r} is not a comma-separated list of numbers.",
                         fix=f"e.g. {option} {example}.") from None


def parse_area_bins(text: str | None) -> tuple[float, float] | None:
    """``--area-bins 10,100`` -> ``(10.0, 100.0)``.

    Raises:
        InputError: not two numbers.
    """
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--area-bins {text!r}: give two numbers.", fix="e.g. --area-bins 10,100.") from None
    return lo, hi


def given(options: dict) -> dict:
    """The options the user set (those left at ``None`` take the library's default)."""
    return {k: v for k, v in options.items() if v is not None}


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
point_size_opt = click.option("--point-size", type=float, default=None, metavar="METRES",
                              help="Side of the square box given to point labels (required for point labels).")
size_opt = click.option("--size", type=int, default=None,
                        show_default=f"{DEFAULT_SIZE}, or the longest raster side if smaller",
                        help="Chip (window) side in pixels.")
overwrite_opt = click.option("--overwrite", is_flag=True, help="Replace an existing output.")
seed_opt = click.option("--seed", type=int, default=None, show_default="0", help="Random seed.")
progress_opt = click.option("--progress/--no-progress", default=None,
                            help="Show a progress bar [default: when stderr is a terminal].")
tta_opt = click.option("--tta", is_flag=True, default=None,
                       help="Test-time flips: 4 views per tile (4x the compute); their boxes are merged at IoU 0.3 or "
                            "the checkpoint's NMS IoU, the smaller (at --nms-iou where given).")
json_opt = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON summary on stdout.")


def shared(*decorators: Callable) -> Callable:
    """Apply several option decorators in the order listed."""
    def wrap(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return wrap
