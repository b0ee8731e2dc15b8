"""Detection: the sliding-window predictor over whole scenes (``geonet detect``).

For each scene:

1. **Grid.** Tiles of the checkpoint's chip size (``tile``, :func:`default_tile`) every ``tile - overlap`` pixels, covering
   the scene edge to edge (:class:`geonet.tiling.TileGrid`: the last tile shifts inward). The
   default overlap is the largest training box side, so every object is seen whole by some tile.
2. **GSD.** If the scene's GSD differs from the training GSD by more than 10 %, tiles are read
   resampled to the training GSD (GDAL resampling on read, bilinear; overviews used when
   downsampling); the grid then lives in that resampled frame. ``resample=False`` turns this off.
3. **Reading.** Tiles are read in reader threads (GDAL releases the GIL while it decodes), one GDAL
   dataset handle per thread, a few batches ahead of the model. A batch's tiles of one tile row are read
   with one ``RasterIO`` call over their union window, widened to the file's block boundaries when it is
   tiled, so each block is decoded once per batch. Tiles that are all nodata are skipped without running
   the model; nodata pixels elsewhere get the training band means (they normalise to 0). Batches travel
   as the raster's dtype (uint8: one byte per pixel) and are converted to float and normalised on the
   device.
4. **Model.** :class:`Detector` runs :meth:`geonet.model.GeoRetinaNet.predict_batch` on a
   ``[B, C, H, W]`` batch (no resize, no per-image copies), in its own thread, under bf16 autocast on
   CUDA and on CPUs with native bf16, channels-last, with the backbone's frozen batch norms folded
   into its convolutions (:func:`geonet.model.fold_batch_norm`); post-processing is one batched pass.
5. **Merge.** In the caller's thread, while the model runs on the next batch, :class:`geonet.merge.SeamMerger` merges tile detections in the detection frame (class-aware
   ``batched_nms`` on the device, seam-aware: one whole box per object cut by a seam) and releases
   each tile row as soon as it is final.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from affine import Affine
from rasterio.windows import Window
from torchvision.ops import batched_nms

import geonet
from geonet.atomic import check_writable, make_dir, remove_stale
from geonet.checkpoint import file_sha256, load_checkpoint
from geonet.device import autocast_dtype, resolve_device, resolve_precision
from geonet.errors import GeonetError, InputError, RunError
from geonet.georef import pixel_boxes_to_polygons
from geonet.merge import Detections, SeamMerger
from geonet.model import fold_batch_norm
from geonet.preview import PreviewCanvas
from geonet.raster import RasterInfo, RasterSource, describe_raster, find_rasters
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


class Detector:
    """A checkpoint ready to run on batches of tiles.

    Args:
        path: geonet checkpoint (``best.pt``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (:func:`geonet.device.resolve_device`).
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"32"``, ``"bf16"``, ``"16"``.
        score_thresh: minimum score of a detection. Default: the checkpoint's operating point (the
            score that maximised F1 at IoU 0.5 on the validation set of the saved epoch), else the
            model's own threshold (0.05). ``score_source`` says which.
        nms_iou: IoU of the NMS inside a tile and across tile seams. Default: the one chosen with the
            operating point on the validation set, else the model's (0.5).
        tta: test-time flips (4 views per tile: 4x the compute).

    Attributes:
        header: the checkpoint's :class:`geonet.checkpoint.CheckpointHeader`.
        model: the :class:`geonet.model.GeoRetinaNet`, in eval mode on ``device``, its batch norms folded
            into the convolutions (:func:`geonet.model.fold_batch_norm`; for inference, not for training).
        nms_iou: the NMS IoU in use (also the merge's default).

    Raises:
        InputError: a bad checkpoint, or ``cuda`` without a CUDA device.
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str = "auto", precision: str = "auto",
                 score_thresh: float | None = None, nms_iou: float | None = None, tta: bool = False):
        model, header = load_checkpoint(path)
        self.tta = tta
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.amp_dtype = autocast_dtype(self.precision)
        op = header.operating_point
        if score_thresh is not None:
            model.score_thresh = float(score_thresh)
            self.score_source = "given"
        elif op is not None:
            model.score_thresh = max(float(model.score_thresh), op.score_thresh)
            self.score_source = f"validation max F1 at IoU {op.iou:g}"
        else:
            self.score_source = "model default"
        if nms_iou is not None:
            model.nms_thresh = float(nms_iou)
        elif op is not None and op.nms_iou is not None:
            model.nms_thresh = op.nms_iou
        self.nms_iou = float(model.nms_thresh)
        self.model = model.to(self.device).eval()
        # Measured on the 2-core CPU (512 px tiles, batch 2, forward only), ResNet-18 / MobileNetV2 FPN:
        # channels-last 1.22x / 1.35x in bf16 and 1.22x / 1.25x in fp32; folding the frozen norms another
        # 1.08x in bf16 (bf16 activations no longer promoted to fp32 by the norms' fp32 statistics).
        fold_batch_norm(self.model)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.model.transform.channels_last = True
        self.header = header
        self.classes: list[str] = list(header.classes)
        self.in_channels = int(header.model_config.in_channels)
        self.path = str(path)
        self.sha256 = file_sha256(path)
        self.model_id = f"{Path(path).name}@{self.sha256[:12]}"

    def __call__(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detect on ``batch`` ``[B, C, H, W]`` (raw band values, any dtype, on the CPU or the device).

        Returns:
            One dict per tile, on the device: ``boxes`` FloatTensor[N, 4] (xyxy, tile pixels),
            ``scores`` FloatTensor[N], ``labels`` Int64Tensor[N] (1..K).
        """
        x = batch.to(self.device, non_blocking=True)
        if not self.tta:
            return self.model.predict_batch(x, autocast=self.amp_dtype)
        return self._flip_tta(x)

    def _flip_tta(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Test-time flips: the batch as is, flipped left-right, top-bottom and both; the boxes flipped back,
        then one class-aware NMS per tile at the model's NMS IoU (the best-scoring view of each object)."""
        h, w = x.shape[-2:]
        m = self.model
        views = {(): x, (-1,): x.flip(-1), (-2,): x.flip(-2), (-1, -2): x.flip(-1).flip(-2)}
        per_tile: list[list[dict]] = [[] for _ in range(len(x))]
        for dims, v in views.items():
            for i, o in enumerate(m.predict_batch(v, autocast=self.amp_dtype)):
                b = o["boxes"].clone()
                if -1 in dims:
                    b[:, [0, 2]] = w - o["boxes"][:, [2, 0]]
                if -2 in dims:
                    b[:, [1, 3]] = h - o["boxes"][:, [3, 1]]
                per_tile[i].append({**o, "boxes": b})
        out = []
        for views_i in per_tile:
            b = torch.cat([o["boxes"] for o in views_i])
            s = torch.cat([o["scores"] for o in views_i])
            lab = torch.cat([o["labels"] for o in views_i])
            keep = batched_nms(b, s, lab, m.nms_thresh)[: m.detections_per_img]
            out.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
        return out


@dataclass
class ScenePlan:
    """How one scene is tiled.

    Attributes:
        info: the scene's header.
        grid: tile grid in the *detection frame*: scene pixels divided by ``scale``.
        scale: scene pixels per detection-frame pixel (1 without resampling; 2 when the scene's
            GSD is half the training GSD).
        overlap: overlap in detection-frame pixels.
        gsd: GSD of the detection frame in metres (``None`` without a CRS).
    """

    info: RasterInfo
    grid: TileGrid
    scale: float
    overlap: int
    gsd: float | None
    warnings: list[str] = field(default_factory=list)


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


class TileReader:
    """Batches of tiles of one scene, read in reader threads (see module docstring, step 3).

    Args:
        plan: the scene's plan.
        batches: the ``(row, col)`` tiles of each batch (:func:`tile_batches`).
        fill: per-band value of nodata pixels, in the scene's dtype (:func:`fill_values`).

    ``reader[k]`` is ``{"data": ndarray[B, C, tile, tile] (the scene's dtype), "valid": bool ndarray[B, tile, tile]
    (False on nodata and padding), "tiles": [(row, col)...] read, "skipped": [(row, col)...] all nodata}``,
    or ``{"error": GeonetError}`` when the scene fails to decode (raised by :func:`detect_scene`).
    """

    def __init__(self, plan: ScenePlan, batches: list[list[tuple[int, int]]], fill: np.ndarray):
        import threading

        self.plan = plan
        self.batches = batches
        self.fill = fill
        self._local = threading.local()

    @property
    def source(self) -> RasterSource:
        """This thread's reader of the scene (GDAL dataset handles must not be shared between threads)."""
        src = getattr(self._local, "source", None)
        if src is None:
            src = self._local.source = RasterSource(self.plan.info)
        return src

    def __len__(self) -> int:
        return len(self.batches)

    def _segments(self, tiles):
        seg = [tiles[0]]
        for t in tiles[1:]:
            if t[0] == seg[-1][0] and t[1] == seg[-1][1] + 1:
                seg.append(t)
            else:
                yield seg
                seg = [t]
        yield seg

    def __getitem__(self, k: int) -> dict:
        try:
            return self._read(k)
        except GeonetError as exc:
            return {"error": exc}

    def _read(self, k: int) -> dict:
        plan, g = self.plan, self.plan.grid
        info = plan.info
        t = g.tile
        kept, skipped, arrays, masks = [], [], [], []
        for seg in self._segments(self.batches[k]):
            r = seg[0][0]
            vx0, vx1 = g.xs[seg[0][1]], g.xs[seg[-1][1]] + t
            vy0, vy1 = g.ys[r], g.ys[r] + t
            if plan.scale == 1.0:
                rx0, ry0, rx1, ry1 = vx0, vy0, vx1, vy1
                if info.tiled:  # widen to block boundaries: whole blocks, each decoded once
                    bh, bw = info.block_shape
                    rx0, ry0 = max(0, rx0 // bw * bw), max(0, ry0 // bh * bh)
                    rx1 = min(max(info.width, vx1), -(-rx1 // bw) * bw)
                    ry1 = min(max(info.height, vy1), -(-ry1 // bh) * bh)
                    rx1, ry1 = max(rx1, vx1), max(ry1, vy1)
                data, valid = self.source.read(Window(rx0, ry0, rx1 - rx0, ry1 - ry0))
                ox, oy = vx0 - rx0, vy0 - ry0
            else:
                s = plan.scale
                data, valid = self.source.read(Window(vx0 * s, vy0 * s, (vx1 - vx0) * s, t * s),
                                               out_size=(t, vx1 - vx0))
                ox, oy = 0, 0
            for (rr, cc) in seg:
                x = g.xs[cc] - vx0 + ox
                v = valid[oy:oy + t, x:x + t]
                if not v.any():
                    skipped.append((rr, cc))
                    continue
                d = data[:, oy:oy + t, x:x + t].copy()
                if not v.all():
                    d[:, ~v] = self.fill[:, None]
                arrays.append(d)
                masks.append(v)
                kept.append((rr, cc))
        stack = np.stack(arrays) if arrays else np.zeros((0, len(info.bands), t, t), dtype=info.dtype)
        valid = np.stack(masks) if masks else np.zeros((0, t, t), dtype=bool)
        return {"data": stack, "valid": valid, "tiles": kept, "skipped": skipped}


#: GDAL block cache of the reader threads, in bytes (blocks are decoded once: block-aligned reads; rasterio's
#: ``set_gdal_config`` takes an integer GDAL_CACHEMAX in bytes -- the former ``256`` meant 256 bytes, no cache).
READER_CACHE_BYTES = 256 * 2**20
#: Seconds without a batch from the readers before detection fails (a reader that cannot deliver).
READER_TIMEOUT_S = 300
#: Batches read ahead of the model.
PREFETCH = 4


class _Pipeline:
    """Reading, the model, and merging + writing, overlapped (module docstring, steps 3-6).

    ``workers`` reader threads (GDAL releases the GIL while it decodes; each thread has its own dataset
    handle) read batches in order, :data:`PREFETCH` ahead; a model thread runs the detector on them; the
    caller's thread (merge and write) iterates ``(batch, detections)`` pairs. Threads, not processes: no
    second copy of torch in memory, and no shared-memory files. ``workers=0`` reads in the model thread.
    """

    _DONE = object()

    def __init__(self, reader: TileReader, det: Detector, *, workers: int, path):
        import concurrent.futures
        import queue
        import threading

        from rasterio.env import set_gdal_config

        set_gdal_config("GDAL_CACHEMAX", READER_CACHE_BYTES)
        self.reader, self.det, self.path = reader, det, path
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="geonet-read") if workers else None
        self.out: queue.Queue = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run_model, name="geonet-model", daemon=True)
        self.thread.start()

    def _batches(self):
        n = len(self.reader)
        if self.pool is None:
            yield from (self.reader[k] for k in range(n))
            return
        pending = [self.pool.submit(self.reader.__getitem__, k) for k in range(min(n, PREFETCH))]
        for k in range(n):
            try:
                item = pending.pop(0).result(timeout=READER_TIMEOUT_S)
            except TimeoutError:
                raise RunError(f"no tiles from the readers in {READER_TIMEOUT_S} s.", path=self.path,
                               fix="check the file (`geonet check`) and the storage it is on.") from None
            if k + PREFETCH < n:
                pending.append(self.pool.submit(self.reader.__getitem__, k + PREFETCH))
            yield item

    def _run_model(self) -> None:
        cuda = self.det.device.type == "cuda"
        try:
            for item in self._batches():
                if self.stop.is_set():
                    return
                if "error" in item:
                    raise item["error"]
                outs = []
                if item["tiles"]:
                    t0 = time.perf_counter()
                    data = torch.from_numpy(item["data"])
                    outs = self.det(data.pin_memory() if cuda else data)
                    item["seconds_model"] = time.perf_counter() - t0
                self._put((item, outs))
            self._put(self._DONE)
        except BaseException as exc:  # handed to the caller's thread, which raises it
            self._put(exc)

    def _put(self, x) -> None:
        import queue

        while not self.stop.is_set():
            try:
                self.out.put(x, timeout=0.2)
                return
            except queue.Full:
                continue

    def __iter__(self):
        import queue

        while True:
            try:
                x = self.out.get(timeout=0.2)
            except queue.Empty:
                if not self.thread.is_alive() and self.out.empty():
                    raise RunError("the detection thread stopped without a result.", path=self.path,
                                   fix="run again with -v; report it if it repeats.") from None
                continue
            if x is self._DONE:
                return
            if isinstance(x, BaseException):
                raise x
            yield x

    def close(self) -> None:
        self.stop.set()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.thread.join(timeout=60)


def fill_values(det: Detector, dtype: str) -> np.ndarray:
    """The training band means in the scene's dtype (nodata pixels get them, so they normalise to 0)."""
    mean = np.asarray(det.header.model_config.mean, dtype=np.float64)
    if np.issubdtype(np.dtype(dtype), np.integer):
        lim = np.iinfo(np.dtype(dtype))
        mean = np.clip(np.round(mean), lim.min, lim.max)
    return mean.astype(dtype)


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


def _inside(boxes: torch.Tensor, valid: torch.Tensor, grid: TileGrid, r: int, c: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep detections on the scene: ``(keep [N] bool, boxes [N, 4])`` for tile ``(r, c)``'s boxes (tile
    frame), clipped to the part of the tile inside the frame; kept when the clipped box has an area and
    its centre pixel is valid (not nodata, not padding beyond the scene's edge).

    ``valid``: BoolTensor[tile, tile] of the tile.
    """
    t = grid.tile
    w, h = min(t, grid.width - grid.xs[c]), min(t, grid.height - grid.ys[r])
    limit = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2).long().clamp(0, t - 1)
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2).long().clamp(0, t - 1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & valid[cy, cx]
    return keep, boxes


def tile_batches(grid: TileGrid, size: int) -> list[list[tuple[int, int]]]:
    """The grid's ``(row, col)`` tiles in row-major order, in batches of ``size``."""
    tiles = grid.tiles()
    return [tiles[i:i + size] for i in range(0, len(tiles), size)]


@dataclass
class TileDetections:
    """The detections of one batch of tiles, kept where they lie on the scene (:func:`_inside`).

    Attributes:
        tiles: ``(row, col)`` of the tiles the model ran on; ``skipped``: tiles that were all nodata.
        boxes: per tile, ``[N, 4]`` float32 xyxy in the tile's pixel frame; ``scores`` ``[N]`` float32;
            ``labels`` ``[N]`` int64 (1..K). Tensors on the model's device, or arrays after :meth:`to_host`.
        data: the tiles' pixels ``[B, C, tile, tile]`` for a preview, or ``None``.
        thumbnails: the tiles subsampled for a preview (:meth:`geonet.preview.PreviewCanvas.thumbnails`),
            or ``None``: what travels instead of ``data`` (:mod:`geonet.ray_engine`).
        seconds_model: seconds of the model call.
    """

    tiles: list[tuple[int, int]]
    skipped: list[tuple[int, int]]
    boxes: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    data: np.ndarray | None = None
    thumbnails: list[np.ndarray] | None = None
    seconds_model: float = 0.0

    def to_host(self, grid: TileGrid | None = None) -> TileDetections:
        """A copy with NumPy arrays and no pixels (small, to pickle); with ``grid``, preview thumbnails."""
        thumbs = PreviewCanvas.thumbnails(grid, self.data, self.tiles) if grid is not None and self.data is not None \
            else self.thumbnails
        return TileDetections(tiles=list(self.tiles), skipped=list(self.skipped),
                              boxes=[b.cpu().numpy() for b in self.boxes], scores=[x.cpu().numpy() for x in self.scores],
                              labels=[x.cpu().numpy() for x in self.labels], thumbnails=thumbs,
                              seconds_model=self.seconds_model)


def tile_detections(path: str | os.PathLike[str], det: Detector, plan: ScenePlan, cfg: DetectConfig,
                    batches: list[list[tuple[int, int]]], *, keep_data: bool = False) -> Iterator[TileDetections]:
    """Run the detector over ``batches`` of ``plan``'s tiles (:func:`tile_batches`, or a run of them): reader
    threads, the model in its own thread (module docstring, steps 3-4); one :class:`TileDetections` per
    batch, in order. ``keep_data``: keep the pixels (for a preview). Closing the generator stops the readers
    and the model.

    Raises:
        RunError: the scene fails to decode.
    """
    grid = plan.grid
    workers = cfg.workers if cfg.workers is not None else min(4, max(1, (os.cpu_count() or 2) // 2))
    reader = TileReader(plan, batches, fill_values(det, plan.info.dtype))
    pipeline = _Pipeline(reader, det, workers=workers, path=path)
    try:
        for item, outs in pipeline:
            td = TileDetections(tiles=item["tiles"], skipped=item["skipped"],
                                data=item["data"] if keep_data else None,
                                seconds_model=item.get("seconds_model", 0.0))
            if item["tiles"]:
                valid = torch.from_numpy(item["valid"]).to(det.device)
                for (r, c), o, v in zip(item["tiles"], outs, valid):
                    keep, boxes = _inside(o["boxes"], v, grid, r, c)
                    td.boxes.append(boxes[keep])
                    td.scores.append(o["scores"][keep])
                    td.labels.append(o["labels"][keep])
            yield td
    finally:  # a failed writer (full disk, file-size limit) or Ctrl-C stops the readers and the model at once
        pipeline.close()


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
    parts = tile_detections(path, det, plan, cfg, tile_batches(plan.grid, batch_size(cfg, det.device)),
                            keep_data=bool(cfg.preview))
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
        "model_nms_iou": det.nms_iou, "merge_iou": merge_iou, "device": device,
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

