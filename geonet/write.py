"""Writing detections: GeoJSON (RFC 7946), GeoPackage and Shapefile, streamed, atomic, QGIS-styled.

Detections stream from a generator of batches straight into OGR through ``pyogrio.write_arrow`` (an
Arrow record-batch stream): memory holds one batch, never the whole output. Geometries are the
detection boxes mapped to the CRS through the scene's affine transform (parallelograms if the
scene is rotated; see :mod:`geonet.georef`).

* ``.geojson``: RFC 7946 -- longitude/latitude on WGS 84, counter-clockwise exterior rings,
  coordinates rounded to ``precision`` decimals (GDAL's ``RFC7946=YES`` and
  ``COORDINATE_PRECISION``); provenance as the foreign member ``"geonet"`` of the FeatureCollection.
* ``.gpkg``: the scene's native CRS; provenance in the layer metadata (``gpkg_metadata``); the QGIS
  style embedded in the ``layer_styles`` table as QGIS writes it, so the layer opens styled.
* ``.shp``: native CRS; provenance in a ``.geonet.json`` sidecar.
* ``.fgb`` (FlatGeobuf, through OGR): native CRS; provenance in a ``.geonet.json`` sidecar.
* ``.parquet`` (GeoParquet 1.0): native CRS as PROJJSON in the ``geo`` file metadata, WKB geometry, written
  batch by batch with pyarrow's ``ParquetWriter`` (the GDAL here has no Parquet driver); provenance in the file
  metadata under ``geonet``. geopandas (``read_parquet``), GDAL >= 3.5 and QGIS with it read it.

Every format also gets a sidecar ``.qml`` (QGIS style: outlines graduated by score, labelled by
class). Files appear atomically: a temporary sibling is written, then renamed over the output.

Fields of every feature: ``label`` (class name), ``class_id`` (1..K), ``score`` (0..1), ``scene``
(file name of the scene), ``model`` (checkpoint file name and the first 12 hex digits of its
sha256).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sqlite3
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyogrio
import shapely

from geonet.atomic import atomic_file, make_parent
from geonet.errors import InputError, RunError
from geonet.georef import to_crs

__all__ = ["FORMATS", "FORMAT_EXTENSIONS", "output_format", "FeatureBatch", "write_features", "qml_style"]

#: Output extension -> OGR driver.
FORMATS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG", ".shp": "ESRI Shapefile",
           ".fgb": "FlatGeobuf", ".parquet": "GeoParquet"}
#: ``--format`` names -> extension.
FORMAT_EXTENSIONS = {"geojson": ".geojson", "gpkg": ".gpkg", "shp": ".shp", "fgb": ".fgb", "parquet": ".parquet"}

SCHEMA = pa.schema([
    pa.field("geometry", pa.binary(), metadata={"ARROW:extension:name": "geoarrow.wkb"}),
    pa.field("label", pa.string()),
    pa.field("class_id", pa.int32()),
    pa.field("score", pa.float32()),
    pa.field("scene", pa.string()),
    pa.field("model", pa.string()),
])


def output_format(path: str | os.PathLike[str], *, option: str = "-o") -> str:
    """The OGR driver for an output path, from its extension.

    Raises:
        InputError: unknown extension, or a parent folder that cannot be created.

    Missing parent folders are created.
    """
    p = Path(path)
    driver = FORMATS.get(p.suffix.lower())
    if driver is None:
        raise InputError(f"{option} {p}: unknown output extension {p.suffix or '(none)'!r}.",
                         fix="use .geojson, .gpkg, .shp, .fgb or .parquet.")
    make_parent(p, option=option)
    return driver


@dataclass
class FeatureBatch:
    """Polygons in the output CRS with their fields (arrays of the same length)."""

    geometries: np.ndarray
    labels: list[str]
    class_ids: np.ndarray
    scores: np.ndarray
    scene: str
    model: str

    def to_arrow(self) -> pa.RecordBatch:
        n = len(self.geometries)
        return pa.record_batch([
            pa.array(list(shapely.to_wkb(self.geometries)) if n else [], pa.binary()),
            pa.array(list(self.labels), pa.string()),
            pa.array(np.asarray(self.class_ids, dtype=np.int32)),
            pa.array(np.asarray(self.scores, dtype=np.float32)),
            pa.array([self.scene] * n, pa.string()),
            pa.array([self.model] * n, pa.string()),
        ], schema=SCHEMA)


def write_features(path: str | os.PathLike[str], batches: Iterable[FeatureBatch], *, crs: str | None,
                   metadata: dict, classes: list[str], precision: int = 7) -> int:
    """Stream feature batches into ``path`` (format from the extension), atomically, with styles.

    Args:
        path: ``.geojson``, ``.gpkg``, ``.shp``, ``.fgb`` or ``.parquet``.
        batches: polygons in ``crs`` (GeoJSON output is reprojected to EPSG:4326 here).
        crs: the CRS of the batches' polygons (WKT or ``EPSG:n``); ``None`` writes pixel coordinates
            without a CRS (``--allow-no-crs``).
        metadata: provenance (geonet version, model hash, tile, overlap, thresholds...).
        classes: class names, for the style's labels.
        precision: decimals of GeoJSON coordinates.

    Returns:
        The number of features written. An empty stream writes a valid empty layer.
    """
    out = Path(path)
    driver = output_format(out)
    count = 0
    to_4326 = driver == "GeoJSON" and crs is not None

    failure: list[BaseException] = []

    def stream() -> Iterator[pa.RecordBatch]:
        nonlocal count
        try:
            for b in batches:
                if to_4326 and len(b.geometries):
                    b.geometries = to_crs(b.geometries, crs, "EPSG:4326")
                count += len(b.geometries)
                yield b.to_arrow()
        except KeyboardInterrupt as exc:
            # Ctrl-C ends the stream cleanly and is raised once the writer returns (_stopped, inside the atomic
            # scope, so nothing is renamed into place): raised through Arrow's C stream into GDAL's writer it
            # left `geonet detect` spinning in pyogrio's write_arrow (py-spy, CI: alive 120 s after Ctrl-C)
            failure.append(exc)
            return
        except BaseException as exc:  # Arrow's C stream would hide it behind a generic error
            failure.append(exc)
            raise

    def _stopped() -> None:
        if failure and isinstance(failure[0], KeyboardInterrupt):
            raise failure[0]

    reader = pa.RecordBatchReader.from_batches(SCHEMA, stream())
    meta_json = json.dumps(metadata, default=str)
    kw: dict = {"driver": driver, "geometry_name": "geometry", "geometry_type": "Polygon", "layer": out.stem}
    if driver == "GeoJSON":
        kw["crs"] = "EPSG:4326" if crs is not None else None
        if crs is not None:
            kw["layer_options"] = {"RFC7946": "YES", "COORDINATE_PRECISION": int(precision),
                                   "FOREIGN_MEMBERS_COLLECTION": json.dumps({"geonet": metadata}, default=str)}
        else:
            kw["layer_options"] = {"FOREIGN_MEMBERS_COLLECTION": json.dumps({"geonet": metadata}, default=str)}
    else:
        kw["crs"] = crs
        if driver == "GPKG":
            kw["dataset_options"] = {"VERSION": "1.2"}  # readable by the GDAL of older QGIS LTRs (3.22: GDAL 3.6)
            kw["layer_metadata"] = {"geonet": meta_json, **{k: str(v) for k, v in metadata.items()
                                                            if isinstance(v, (str, int, float))}}
    qml = qml_style(classes)
    try:
        if driver == "ESRI Shapefile":
            _write_shapefile(out, reader, kw, meta_json, _stopped)
        elif driver == "GeoParquet":
            with atomic_file(out) as tmp:
                _write_geoparquet(tmp, reader, crs, metadata)
                _stopped()
        else:
            with atomic_file(out) as tmp, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*'crs' was not provided.*")  # --allow-no-crs
                pyogrio.write_arrow(reader, tmp, **kw)
                _stopped()
                if driver == "GPKG":
                    embed_style(tmp, out.stem, qml)
    except Exception as exc:
        if failure:  # the producer's own error (a corrupt block, Ctrl-C), not Arrow's wrapper
            raise failure[0] from None
        raise _write_error(out, exc) from None
    try:
        if driver == "FlatGeobuf":
            with atomic_file(out.with_suffix(".geonet.json")) as tmp:
                tmp.write_text(meta_json)
        with atomic_file(out.with_suffix(".qml")) as tmp:
            tmp.write_text(qml)
    except OSError as exc:
        raise _write_error(out.with_suffix(".qml"), exc) from None
    return count


def _write_error(out: Path, exc: Exception) -> RunError:
    """A one-line error for an output that could not be written (full disk, file-size limit, I/O error)."""
    return RunError(f"-o {out}: writing failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); nothing was "
                    "written there.", fix="check the free space and any file-size limit (ulimit -f), or write "
                                          "elsewhere.")


def _write_geoparquet(path: Path, reader: pa.RecordBatchReader, crs: str | None, metadata: dict) -> None:
    """GeoParquet 1.0 (https://geoparquet.org/releases/v1.0.0/): WKB ``geometry`` and the ``geo`` metadata."""
    import pyarrow.parquet as pq
    from pyproj import CRS

    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                    **({"crs": CRS.from_user_input(crs).to_json_dict()} if crs is not None else
                                       {"crs": None})}}}
    schema = SCHEMA.remove_metadata().with_metadata({"geo": json.dumps(geo),
                                                     "geonet": json.dumps(metadata, default=str)})
    schema = schema.set(0, pa.field("geometry", pa.binary()))
    with pq.ParquetWriter(path, schema) as w:
        for batch in reader:
            w.write_table(pa.Table.from_batches([batch]).cast(schema))


def _write_shapefile(out: Path, reader, kw: dict, meta_json: str, stopped: Callable[[], None]) -> None:
    """A Shapefile is several files: write them in a temporary folder, then rename each into place
    (``stopped()`` raises, before any rename, if the stream ended on Ctrl-C)."""
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.stem}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        target = tmpdir / out.name
        kw = {**kw, "layer": out.stem}
        pyogrio.write_arrow(reader, target, **kw)
        stopped()
        (tmpdir / (out.stem + ".geonet.json")).write_text(meta_json)
        for f in sorted(tmpdir.iterdir(), key=lambda p: p.suffix == ".shp"):  # the .shp last
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def qml_style(classes: list[str]) -> str:
    """QGIS layer style: no fill, outlines graduated by ``score`` (yellow to red), labels from ``label``."""
    bins = [(0.0, 0.25, "255,255,178,255"), (0.25, 0.5, "254,204,92,255"), (0.5, 0.75, "253,141,60,255"),
            (0.75, 1.0001, "227,26,28,255")]
    ranges, symbols = [], []
    for k, (lo, hi, colour) in enumerate(bins):
        ranges.append(f'<range lower="{lo:.4f}" upper="{hi:.4f}" symbol="{k}" label="score {lo:.2f} - '
                      f'{min(hi, 1):.2f}" render="true"/>')
        symbols.append(
            f'<symbol type="fill" name="{k}" alpha="1" clip_to_extent="1" force_rhr="0">'
            f'<layer class="SimpleFill" pass="0" enabled="1" locked="0">'
            f'<Option type="Map"><Option type="QString" name="color" value="0,0,0,0"/>'
            f'<Option type="QString" name="outline_color" value="{colour}"/>'
            f'<Option type="QString" name="outline_style" value="solid"/>'
            f'<Option type="QString" name="outline_width" value="0.6"/>'
            f'<Option type="QString" name="outline_width_unit" value="MM"/>'
            f'<Option type="QString" name="style" value="no"/></Option>'
            f'<prop k="color" v="0,0,0,0"/><prop k="outline_color" v="{colour}"/><prop k="outline_style" v="solid"/>'
            f'<prop k="outline_width" v="0.6"/><prop k="outline_width_unit" v="MM"/><prop k="style" v="no"/>'
            f'</layer></symbol>')
    class_list = ", ".join(classes)
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22" styleCategories="Symbology|Labeling">
  <renderer-v2 type="graduatedSymbol" attr="score" graduatedMethod="GraduatedColor" symbollevels="0" enableorderby="0" forceraster="0">
    <ranges>{''.join(ranges)}</ranges>
    <symbols>{''.join(symbols)}</symbols>
    <mode name="equal"/>
    <rotation/>
    <sizescale/>
  </renderer-v2>
  <labeling type="simple">
    <settings calloutType="simple">
      <text-style fieldName="label" isExpression="0" fontSize="8" fontSizeUnit="Point" textColor="255,255,255,255" textOpacity="1" namedStyle="Regular" fontWeight="50" fontFamily="Sans Serif">
        <text-buffer bufferDraw="1" bufferSize="0.7" bufferSizeUnits="MM" bufferColor="0,0,0,255" bufferOpacity="0.8"/>
      </text-style>
      <placement placement="1" offsetType="0" quadOffset="4"/>
      <rendering scaleVisibility="0" obstacle="1" drawLabels="1"/>
    </settings>
  </labeling>
  <layerGeometryType>2</layerGeometryType>
  <!-- geonet detections; classes: {class_list} -->
</qgis>
"""


def embed_style(gpkg: str | os.PathLike[str], layer: str, qml: str) -> None:
    """Store ``qml`` as the default style of ``layer`` in the GeoPackage's ``layer_styles`` table.

    The table layout is the one QGIS creates (and reads on opening a GeoPackage layer).
    """
    con = sqlite3.connect(str(gpkg))
    try:
        with con:
            con.execute("""CREATE TABLE IF NOT EXISTS layer_styles (
                id INTEGER PRIMARY KEY AUTOINCREMENT, f_table_catalog TEXT(256), f_table_schema TEXT(256),
                f_table_name TEXT(256), f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT,
                styleSLD TEXT, useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
                update_time DATETIME DEFAULT CURRENT_TIMESTAMP)""")
            geom = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?",
                               (layer,)).fetchone()
            con.execute("""INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name,
                f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, owner, update_time)
                VALUES ('', '', ?, ?, ?, ?, '', 1, 'geonet detections: outline by score, label by class', '', ?)""",
                        (layer, geom[0] if geom else "geometry", layer, qml,
                         _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")))
            # register the non-spatial table as an attributes table, as QGIS does
            con.execute("""INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier)
                VALUES ('layer_styles', 'attributes', 'layer_styles')""")
    finally:
        con.close()
