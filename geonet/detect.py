"""Detection: the sliding-window predictor over whole scenes (``geonet detect``).

For each scene:

1. **Grid.** Tiles of the checkpoint's chip size (``tile``, :func:`default_tile`) every ``tile - overlap``
   pixels, covering the scene edge to edge (:class:`geonet.tiling.TileGrid`: the last tile shifts inward). The
   default overlap is the largest training box side, so every object is seen whole by some tile.
2. **GSD.** If the scene's GSD differs from the training GSD by more than 10 %, tiles are read
   resampled to the training GSD (GDAL resampling on read, bilinear; overviews used when
   downsampling); the grid then lives in that resampled frame. ``resample=False`` turns this off.
3. **Reading** (:mod:`geonet.pipeline`). Reader threads read batches of tiles a few batches ahead of the model,
   block-aligned, each block decoded once; all-nodata tiles are skipped, nodata pixels get the training band
   means; batches travel as the raster's dtype and are normalised on the device.
4. **Model** (:class:`geonet.detector.Detector`, in the pipeline's model thread):
   :meth:`geonet.model.GeoRetinaNet.predict_batch` on each ``[B, C, H, W]`` batch (no resize), channels-last with
   the frozen batch norms folded into the convolutions, under bf16 autocast on CUDA and on CPUs with native
   bf16; post-processing is one batched pass.
5. **Merge.** In the caller's thread, while the model runs on the next batch, :class:`geonet.merge.SeamMerger`
   merges tile detections in the detection frame (class-aware ``batched_nms`` on the device, seam-aware: one
   whole box per object cut by a seam) and releases each tile row as soon as it is final.
6. **Write.** Final detections stream to the output (:mod:`geonet.write`) while later rows are
   still being processed: memory holds a few tile rows, whatever the scene size.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from affine import Affine

import geonet
from geonet.atomic import check_writable, make_dir, remove_stale
from geonet.detector import Detector
from geonet.errors import GeonetError, InputError
from geonet.georef import pixel_boxes_to_polygons
from geonet.merge import Detections, SeamMerger
from geonet.pipeline import ScenePlan, TileDetections, TileReader, fill_values, tile_batches, tile_detections
from geonet.preview import PreviewCanvas
from geonet.raster import describe_raster, find_rasters
from geonet.remote import RemoteRaster
from geonet.tiling import TileGrid
from geonet.write import FORMAT_EXTENSIONS, FORMATS, FeatureBatch, output_format, write_features

log = logging.getLogger(__name__)

#: Where scenes run: this process, or Ray tasks (:mod:`geonet.ray_engine`).
ENGINES = ("local", "ray")

__all__ = ["DetectConfig", "Detector", "ScenePlan", "TileReader", "TileDetections", "plan_scene", "tile_detections",
           "write_scene", "batch_size", "detect_scene", "detect", "parse_overlap",
           "tile_batches", "fill_values", "scenes_to_do", "scene_config", "resolve_outputs", "DetectReport",
           "SceneResult"]


@dataclass
class DetectConfig:
    """Options of ``geonet detect`` (see ``geonet detect --help``).

    Attributes:
        model: the checkpoint (``best.pt``).
        tile: tile side in pixels (default: :func:`default_tile`).
        overlap: tile overlap, ``"64"`` pixels or ``"6m"`` metres (default: the largest training box).
        batch_size: tiles per model call (default: 2 on the CPU, 16 on CUDA).
        workers: reader threads (default: half the cores, at least 1, at most 4; 0 reads in the model's thread).
        device, amp: see :mod:`geonet.device`.
        score_thresh: minimum score (default: the checkpoint's operating point).
        nms_iou: IoU of the NMS inside tiles (default: the checkpoint's, chosen on the validation set).
        merge_iou: IoU of the cross-tile NMS (:class:`geonet.merge.SeamMerger`; default: the NMS IoU).
        resample: resample scenes whose GSD differs from the training GSD by more than 10 %.
        allow_no_crs: accept scenes without a CRS and write pixel coordinates.
        nodata: nodata value overriding the scene's (default: the scene's own; a scene without one has
            none: the training imagery's nodata is never assumed).
        tta: test-time flips (:meth:`Detector._flip_tta`; 4x the compute).
        bands: 1-based bands of the scene to read, in order (default: the bands the model was trained on
            when the scene has that many bands, or when training chose them with ``--bands``).
        coord_precision: decimals of GeoJSON coordinates.
        preview: PNG path of a preview (several scenes: one PNG beside each output).
        resume: skip scenes whose output exists.
        overwrite: replace existing outputs (without it or ``resume``, an existing output is an error).
        format: output format when the output is a folder (``geojson``, ``gpkg``, ``shp``, ``fgb``, ``parquet``).
        engine: ``local`` (this process) or ``ray`` (scenes as tasks on a Ray cluster, :mod:`geonet.ray_engine`).
        address: the Ray cluster (``auto``, ``HOST:PORT``); default: a local Ray instance.
        actors: Ray actors (detectors) at once (default: the cluster's GPUs, else one per 2 CPUs).
        asset: the asset of scenes given as STAC items (default: ``visual``, else the item's only GeoTIFF;
            :mod:`geonet.remote`).
        band_tiles: with the Ray engine, a scene of more tiles is split into bands of about this many
            tiles, detected in parallel and joined by the seam merge (0: never split).
    """

    model: str
    tile: int | None = None
    overlap: str | float | None = None
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    amp: str = "auto"
    score_thresh: float | None = None
    nms_iou: float | None = None
    merge_iou: float | None = None
    resample: bool = True
    allow_no_crs: bool = False
    nodata: float | None = None
    bands: list[int] | None = None
    tta: bool = False
    coord_precision: int = 7
    preview: str | None = None
    resume: bool = False
    overwrite: bool = False
    format: str = "geojson"
    engine: str = "local"
    address: str | None = None
    actors: int | None = None
    band_tiles: int = 1024
    asset: str | None = None


def _check_config(cfg: DetectConfig) -> None:
    """Raise :class:`InputError` for out-of-range options (before the model is loaded)."""
    for name, v, lo, eg in (("--tile", cfg.tile, 32, 512), ("--batch-size", cfg.batch_size, 1, 2),
                            ("--workers", cfg.workers, 0, 2), ("--actors", cfg.actors, 1, 2),
                            ("--band-tiles", cfg.band_tiles, 0, 1024)):
        if v is not None and v < lo:
            raise InputError(f"{name} must be >= {lo}, got {v}.", fix=f"e.g. {name} {eg}, or leave it out.")
    for name, v in (("--score-thresh", cfg.score_thresh), ("--nms-iou", cfg.nms_iou), ("--merge-iou", cfg.merge_iou)):
        if v is not None and not 0 <= v <= 1:
            raise InputError(f"{name} must be in [0, 1], got {v}.", fix=f"e.g. {name} 0.5, or leave it out.")
    if cfg.coord_precision < 0:
        raise InputError(f"--precision must be >= 0, got {cfg.coord_precision}.", fix="e.g. --precision 7.")
    if cfg.engine not in ENGINES:
        raise InputError(f"--engine {cfg.engine!r}: choose {' or '.join(ENGINES)}.")
    parse_overlap(cfg.overlap)


def parse_overlap(value: str | float | None) -> tuple[float, str] | None:
    """``"64"``/``"64px"`` -> ``(64, "px")``, ``"6m"`` -> ``(6, "m")``.

    Raises:
        InputError: anything else.
    """
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value), "px"
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(px|m)?\s*", str(value))
    if not m:
        raise InputError(f"--overlap {value!r}: give pixels (64 or 64px) or metres (6m).",
                         fix="e.g. --overlap 64 or --overlap 6m.")
    return float(m.group(1)), m.group(2) or "px"


def plan_scene(path: str | os.PathLike[str], det: Detector, cfg: DetectConfig) -> ScenePlan:
    """Check a scene against the model and lay out its tiles.

    Raises:
        InputError: no CRS (without ``allow_no_crs``), band count or dtype that the model was not
            trained on, an overlap not smaller than the tile.
    """
    ck = det.header
    bands = _scene_bands(path, det, cfg)
    try:
        info = describe_raster(path, bands=bands, nodata=cfg.nodata)
    except InputError as exc:
        if "--bands" in str(exc):
            raise InputError(f"the model reads bands {list(bands or [])} but the scene has fewer bands.", path=path,
                             fix="detect on imagery with the bands the model was trained on, or pass --bands.") from None
        raise
    if len(info.bands) != det.in_channels:
        raise InputError(f"the scene gives {len(info.bands)} band(s); the model takes {det.in_channels}.", path=path,
                         fix=f"pass --bands with {det.in_channels} band number(s), or detect on imagery with the "
                             "bands the model was trained on.")
    if ck.dtype and info.dtype != ck.dtype:
        raise InputError(f"the scene's dtype is {info.dtype}; the model was trained on {ck.dtype} data, so its "
                         "normalisation would not fit.", path=path,
                         fix=f"convert the scene to {ck.dtype} with the same scaling as the training imagery.")
    if info.crs is None and not cfg.allow_no_crs:
        raise InputError("the scene has no CRS, so detections cannot be placed on a map.", path=path,
                         fix="assign one with `gdal_edit.py -a_srs EPSG:XXXX`, or pass --allow-no-crs to write "
                             "pixel coordinates.")
    if info.crs is not None and not info.georeferenced and not cfg.allow_no_crs:
        raise InputError("the scene has a CRS but no geotransform (pixel size and origin), so detections cannot be "
                         "placed on a map.", path=path,
                         fix="georeference it (e.g. `gdal_edit.py -a_ullr ULX ULY LRX LRY`), or pass --allow-no-crs "
                             "to write pixel coordinates.")
    warnings = []
    train_gsd = ck.train_gsd
    scene_gsd = info.gsd_mean
    scale = 1.0
    if train_gsd and scene_gsd:
        ratio = train_gsd / scene_gsd
        if abs(ratio - 1) > 0.10:
            if cfg.resample:
                scale = ratio
            else:
                warnings.append(f"--no-resample: the scene's GSD ({scene_gsd:.3f} m) differs from the training GSD "
                                f"({train_gsd:.3f} m) by {100 * abs(ratio - 1):.0f} %; objects will look "
                                f"{'larger' if ratio > 1 else 'smaller'} than in training.")
    tile = int(cfg.tile or default_tile(ck.chip_size))
    frame_gsd = scene_gsd * scale if scene_gsd else None
    ov = parse_overlap(cfg.overlap)
    if ov is None:
        # the largest training box, in metres through the detection frame's GSD when both are known
        # (training rasters may have had several GSDs), else in training pixels
        largest = ck.largest_box(frame_gsd)
        overlap = int(math.ceil(largest)) if largest else tile // 8
        if overlap >= tile // 2:
            warnings.append(f"the largest training box ({largest:.0f} px) is at least half the tile; overlap capped "
                            f"at {tile // 2} px, so larger objects may be cut.")
            overlap = tile // 2
    elif ov[1] == "m":
        if not frame_gsd:
            raise InputError(f"--overlap {cfg.overlap}: metres need a georeferenced scene.", path=path,
                             fix="give the overlap in pixels.")
        overlap = int(math.ceil(ov[0] / frame_gsd))
    else:
        overlap = int(math.ceil(ov[0]))
    if overlap >= tile:
        raise InputError(f"--overlap {overlap} px is not smaller than the tile ({tile} px).",
                         fix="use an overlap of at least the largest object but below the tile size.")
    width = int(math.ceil(info.width / scale))
    height = int(math.ceil(info.height / scale))
    return ScenePlan(info=info, grid=TileGrid.build(width, height, tile, overlap), scale=scale, overlap=overlap,
                     gsd=frame_gsd, warnings=warnings)


#: Detection tile side (px) when the checkpoint does not say its chip size.
DETECT_TILE = 512


def default_tile(chip_size: int | None) -> int:
    """The default detection tile side in pixels: the checkpoint's chip size (else :data:`DETECT_TILE`).

    The detector is fully convolutional and a larger tile spends less on overlap, but measured larger tiles
    lost recall for models trained on small chips (``bench/tile_bench.py``, OSBS_029's held-out blocks: the demo
    model's AP50 0.550 at its 128 px chip, 0.252 at 416 px; NEON val plots, a 128 px-chip model: recall at the
    max-F1 point 0.504 -> 0.283, F1 0.275 -> 0.233, though 7.2x faster). So tiles stay the chip size; train on
    larger chips (the default recipe takes 512 px or the raster's size) for fewer, larger tiles. Smaller
    tiles than the chip cost too (a 400 px-chip model: AP50 0.417 -> 0.402 at 256 px, 3.6x slower).
    """
    return int(chip_size or DETECT_TILE)


def _scene_bands(path, det: Detector, cfg: DetectConfig) -> list[int] | None:
    """The scene bands to read: ``--bands``; else the model's bands when the scene has as many (all but
    alpha), or when training chose them with ``--bands``.

    Raises:
        InputError: the scene has more bands than the model takes and nothing says which to read.
    """
    if cfg.bands:
        return list(cfg.bands)
    ck = det.header
    scene = describe_raster(path)
    if ck.bands is None or len(scene.bands) == len(ck.bands):
        return ck.bands
    if ck.bands_chosen:
        log.info("%s: reading bands %s, as the model was trained", path, ck.bands)
        return ck.bands
    if len(scene.bands) > det.in_channels:
        raise InputError(f"the scene has {len(scene.bands)} bands; the model takes {det.in_channels} (it was trained "
                         f"on all the bands of {det.in_channels}-band imagery), so which to read is unknown.",
                         path=path, fix=f"pass --bands with the {det.in_channels} band number(s) that match the "
                                        "training imagery, e.g. --bands 1,2,3.")
    return ck.bands


@dataclass
class SceneResult:
    """What :func:`detect_scene` did for one scene."""

    scene: str
    output: str
    detections: int = 0
    tiles: int = 0
    tiles_skipped: int = 0
    seconds: float = 0.0
    seconds_model: float = 0.0
    scale: float = 1.0
    overlap: int = 0
    max_boxes_held: int = 0
    preview: str | None = None
    error: str | None = None


def batch_size(cfg: DetectConfig, device: torch.device | str) -> int:
    """Tiles per model call: ``cfg.batch_size``, else 16 on CUDA and 2 on the CPU."""
    return cfg.batch_size or (16 if torch.device(device).type == "cuda" else 2)


def detect_scene(path: str | os.PathLike[str], det: Detector, cfg: DetectConfig, output: str | os.PathLike[str], *,
                 plan: ScenePlan | None = None, progress=None) -> SceneResult:
    """Detect objects in one scene and write them to ``output`` (streamed, atomic).

    Args:
        path: the scene.
        det: the detector.
        cfg: options.
        output: ``.geojson``, ``.gpkg``, ``.shp``, ``.fgb`` or ``.parquet`` path.
        plan: the scene's plan, if already made.
        progress: a tqdm bar to advance by tiles.

    Raises:
        InputError: see :func:`plan_scene`.
        RunError: the scene fails to decode.
    """
    t_start = time.perf_counter()
    plan = plan or plan_scene(path, det, cfg)
    for w in plan.warnings:
        log.warning("%s: %s", path, w)
    parts = tile_detections(path, det, plan, tile_batches(plan.grid, batch_size(cfg, det.device)),
                            workers=cfg.workers, keep_data=bool(cfg.preview))
    return write_scene(path, det, plan, cfg, output, parts, progress=progress, t_start=t_start)


def write_scene(path: str | os.PathLike[str], det: Detector, plan: ScenePlan, cfg: DetectConfig,
                output: str | os.PathLike[str], parts: Iterable[TileDetections], *, progress=None,
                t_start: float | None = None, run_on: tuple[str, str] | None = None) -> SceneResult:
    """Merge a scene's tile detections across seams (:class:`geonet.merge.SeamMerger`, module docstring
    step 5) and write them to ``output`` (streamed, atomic; step 6).

    Args:
        parts: every tile of ``plan.grid`` exactly once, in row-major order (:func:`tile_detections`, or
            the bands of :mod:`geonet.ray_engine` joined in order).
        run_on: ``(device, precision)`` the model ran on, for the metadata (default: ``det``'s).

    Raises:
        RunError: from ``parts``; an incomplete ``parts`` is a :class:`RuntimeError` (a bug).
    """
    t_start = time.perf_counter() if t_start is None else t_start
    info, grid = plan.info, plan.grid
    res = SceneResult(scene=str(path), output=str(output), scale=plan.scale, overlap=plan.overlap)
    merge_iou = cfg.merge_iou if cfg.merge_iou is not None else det.nms_iou
    merger = SeamMerger(grid, iou_threshold=merge_iou, device=det.device)
    preview = PreviewCanvas(grid, info) if cfg.preview else None
    device, precision = run_on or (det.device.type, det.precision)
    meta = {
        "geonet_version": geonet.__version__, "model": det.path, "model_sha256": det.sha256, "classes": det.classes,
        "scene": str(path), "scene_crs": info.crs_label,
        "scene_gsd_m": info.gsd_mean, "train_gsd_m": det.header.gsd, "resample_scale": plan.scale,
        "tile_px": grid.tile, "overlap_px": plan.overlap, "score_thresh": float(det.model.score_thresh),
        "score_thresh_source": det.score_source,
        "model_nms_iou": det.nms_iou, "merge_iou": merge_iou, "tta": det.tta,
        "tta_nms_iou": det.tta_nms_iou, "device": device,
        "precision": precision, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    scene_name = Path(path).name

    def to_features(d: Detections) -> FeatureBatch:
        boxes = d.boxes * plan.scale  # detection frame -> scene pixels
        if preview is not None:
            preview.add_boxes(d.boxes)
        # without a CRS (--allow-no-crs) the "map" frame is the pixel frame itself
        polys = pixel_boxes_to_polygons(boxes, info.transform if info.crs else Affine.identity())
        return FeatureBatch(geometries=polys, labels=[det.classes[int(k) - 1] for k in d.labels],
                            class_ids=d.labels, scores=d.scores, scene=scene_name, model=det.model_id)

    def merged(td: TileDetections) -> Detections:
        for (r, c) in td.skipped:
            merger.add(r, c, [], [], [])
        for (r, c), b, s, lab in zip(td.tiles, td.boxes, td.scores, td.labels):
            merger.add(r, c, b, s, lab)
        if preview is not None:
            if td.data is not None:
                preview.add_tiles(td.data, td.tiles)
            elif td.thumbnails is not None:
                preview.add_thumbnails(td.thumbnails, td.tiles)
        res.tiles += len(td.tiles)
        res.tiles_skipped += len(td.skipped)
        res.seconds_model += td.seconds_model
        if progress is not None:
            progress.update(len(td.tiles) + len(td.skipped))
        return merger.pop_final()

    def stream() -> Iterator[FeatureBatch]:
        for td in parts:
            final = merged(td)
            if len(final):
                res.detections += len(final)
                yield to_features(final)
        final = merger.finish()
        res.detections += len(final)
        if len(final):
            yield to_features(final)

    features = stream()
    try:
        write_features(output, features, crs=info.crs_label, metadata=meta, classes=det.classes,
                       precision=cfg.coord_precision)
    finally:  # a failed writer or Ctrl-C closes the tile source (its readers and model stop at once)
        features.close()
        close = getattr(parts, "close", None)
        if close is not None:
            close()
    res.max_boxes_held = merger.max_held
    if preview is not None:
        res.preview = str(preview.save(cfg.preview))
    res.seconds = time.perf_counter() - t_start
    return res


@dataclass
class DetectReport:
    """What :func:`detect` did."""

    scenes: list[SceneResult]
    seconds: float
    failed: int
    skipped_done: int
    score_thresh: float = 0.0
    score_source: str = ""
    nms_iou: float = 0.5

    @property
    def ok(self) -> bool:
        return self.failed == 0


def resolve_outputs(scenes: Sequence[str], output: str | os.PathLike[str], fmt: str, *,
                    asset: str | None = None) -> tuple[list[Path | RemoteRaster], list[Path]]:
    """Scene paths (files, or URLs and STAC items' ``asset``: :mod:`geonet.remote`) and their output paths.

    One scene and an output with a known extension: that file. Several scenes, or an output that
    is an existing folder (or ends with a slash): ``<folder>/<scene stem>.<fmt>``.

    Raises:
        InputError: missing scene, unknown extension, an output folder that cannot be created
            (missing ones are), several scenes with one output file, two scenes with the same stem.
    """
    paths = find_rasters(scenes, option="SCENE", asset=asset)
    out = Path(output)
    as_dir = len(paths) > 1 or out.is_dir() or str(output).endswith(os.sep)
    if not as_dir:
        output_format(out)
        return paths, [out]
    if out.suffix.lower() in FORMATS and not out.is_dir():
        raise InputError(f"-o {out}: {len(paths)} scenes need an output folder, not a file.",
                         fix="pass -o OUTDIR/ (a folder).")
    make_dir(out)
    check_writable(out)
    ext = FORMAT_EXTENSIONS.get(fmt)
    if ext is None:
        raise InputError(f"--format {fmt!r}: choose {', '.join(FORMAT_EXTENSIONS)}.", fix="e.g. --format gpkg.")
    outs = [out / (p.stem + ext) for p in paths]
    stems = [o.name for o in outs]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(f"several scenes would write the same output {dup[0]}.", fix="give scenes distinct names.")
    return paths, outs


def scenes_to_do(outs: Sequence[Path], cfg: DetectConfig) -> tuple[list[int], int]:
    """Indices of the scenes to detect and how many were skipped as done (``cfg.resume``: an existing
    output is complete, outputs being written atomically). Removes temporary files of killed runs.

    Raises:
        InputError: an output exists and neither ``cfg.resume`` nor ``cfg.overwrite`` is set.
    """
    existing = [o for o in outs if o.exists()]
    if existing and not (cfg.resume or cfg.overwrite):
        raise InputError(f"-o {existing[0]} exists" + (f" ({len(existing)} outputs exist)" if len(existing) > 1 else "")
                         + ".", fix="pass --overwrite to replace it, --resume to keep finished scenes, or choose "
                                    "another output.")
    for o in outs:
        remove_stale(o)  # temporary files of earlier runs that were killed
    todo = [i for i, o in enumerate(outs) if not (cfg.resume and o.exists())]
    return todo, len(outs) - len(todo)


def scene_config(cfg: DetectConfig, output: Path, n_scenes: int) -> DetectConfig:
    """The options of one scene among ``n_scenes``: with several, the preview goes beside each output."""
    if cfg.preview and n_scenes > 1:
        return DetectConfig(**{**asdict(cfg), "preview": str(output.with_suffix(".png"))})
    return cfg


def detect(scenes: Sequence[str], output: str | os.PathLike[str], cfg: DetectConfig, *,
           show_progress: bool | None = None, on_scene=None) -> DetectReport:
    """Detect objects in one or many scenes.

    ``show_progress``: a progress bar (tiles/s, ETA); default: when stderr is a terminal, so logs get no
    carriage-return frames. ``on_scene``: called with each :class:`SceneResult` as soon as its scene is done
    (the command line prints one line per scene with it).

    A scene that fails (corrupt file, wrong bands...) is reported and skipped when there are
    several; the others are still processed and ``report.failed`` counts the failures. With one
    scene the error is raised. ``cfg.resume`` skips scenes whose output already exists (outputs are
    written atomically, so an existing one is complete).

    Raises:
        InputError: bad options, model, outputs or (single) scene.
        RunError: the (single) scene fails while being read.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    _check_config(cfg)
    if cfg.engine == "ray":
        from geonet.ray_engine import detect_ray

        return detect_ray(scenes, output, cfg, on_scene=on_scene)
    paths, outs = resolve_outputs(scenes, output, cfg.format, asset=cfg.asset)
    det = Detector(cfg.model, device=cfg.device, precision=cfg.amp, score_thresh=cfg.score_thresh, nms_iou=cfg.nms_iou,
                   tta=cfg.tta)
    todo, done_before = scenes_to_do(outs, cfg)
    results: list[SceneResult] = []
    plans: dict[int, ScenePlan | GeonetError] = {}
    for i in todo:
        try:
            plans[i] = plan_scene(paths[i], det, cfg)
        except GeonetError as exc:
            if len(paths) == 1:
                raise
            plans[i] = exc
    total = sum(pl.grid.n_tiles for pl in plans.values() if isinstance(pl, ScenePlan))
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    bar = tqdm(total=total, unit="tile", disable=not show_progress, dynamic_ncols=True, leave=True,
               desc=f"{len(todo)} scene(s)")
    failed = 0
    for i in todo:
        p, o, pl = paths[i], outs[i], plans[i]
        if isinstance(pl, GeonetError):
            log.error("%s", pl)
            results.append(SceneResult(scene=str(p), output=str(o), error=str(pl)))
            failed += 1
            if on_scene is not None:
                on_scene(results[-1])
            continue
        bar.set_postfix_str(p.name)
        try:
            results.append(detect_scene(p, det, scene_config(cfg, o, len(paths)), o, plan=pl, progress=bar))
        except GeonetError as exc:
            if len(paths) == 1:
                bar.close()
                raise
            log.error("%s", exc)
            results.append(SceneResult(scene=str(p), output=str(o), error=str(exc)))
            failed += 1
        if on_scene is not None:
            with bar.external_write_mode():
                on_scene(results[-1])
    bar.close()
    return DetectReport(scenes=results, seconds=time.perf_counter() - t0, failed=failed, skipped_done=done_before,
                        score_thresh=float(det.model.score_thresh), score_source=det.score_source,
                        nms_iou=det.nms_iou)

