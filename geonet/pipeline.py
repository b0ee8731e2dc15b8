"""Running the detector over a scene's tiles: reader threads, the model in its own thread, tile detections.

This is steps 3-4 of :mod:`geonet.detect` (which plans the scene and merges and writes the result):

* **Reading.** Tiles are read in reader threads (GDAL releases the GIL while it decodes), one GDAL dataset
  handle per thread, a few batches ahead of the model (:data:`PREFETCH`). A batch's tiles of one tile row are
  read with one ``RasterIO`` call over their union window, widened to the file's block boundaries when it is
  tiled, so each block is decoded once per batch (and kept in GDAL's block cache, :data:`READER_CACHE_BYTES`).
  Tiles that are all nodata are skipped without running the model; nodata pixels elsewhere get the training
  band means (they normalise to 0). Batches travel as the raster's dtype (uint8: one byte per pixel). Threads,
  not processes: no second copy of torch in memory.
* **Model.** :class:`geonet.detector.Detector` runs on each ``[B, C, H, W]`` batch in a model thread while the
  readers read the next batches and the caller merges and writes the previous ones.
* **Tile detections.** Boxes are clipped to the scene and kept where their centre pixel is valid
  (:func:`_inside`); one :class:`TileDetections` per batch, in order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from rasterio.windows import Window

from geonet import interrupt
from geonet.detector import Detector
from geonet.errors import GeonetError, RunError
from geonet.preview import PreviewCanvas
from geonet.raster import RasterInfo, RasterSource
from geonet.tiling import TileGrid

__all__ = ["ScenePlan", "TileReader", "TileDetections", "tile_detections", "tile_batches", "fill_values",
           "READER_CACHE_BYTES", "READER_TIMEOUT_S", "PREFETCH"]


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


class TileReader:
    """Batches of tiles of one scene, read in reader threads (module docstring).

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
    """Reading, the model, and merging + writing, overlapped (module docstring).

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
            interrupt.check()  # a Ctrl-C whose KeyboardInterrupt was swallowed elsewhere still stops here
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


def tile_detections(path: str | os.PathLike[str], det: Detector, plan: ScenePlan,
                    batches: list[list[tuple[int, int]]], *, workers: int | None = None,
                    keep_data: bool = False) -> Iterator[TileDetections]:
    """Run the detector over ``batches`` of ``plan``'s tiles (:func:`tile_batches`, or a run of them): reader
    threads, the model in its own thread (module docstring); one :class:`TileDetections` per batch, in order.
    ``workers``: reader threads (default: half the cores, 1 to 4; 0 reads in the model thread). ``keep_data``:
    keep the pixels (for a preview). Closing the generator stops the readers and the model.

    Raises:
        RunError: the scene fails to decode.
    """
    grid = plan.grid
    workers = workers if workers is not None else min(4, max(1, (os.cpu_count() or 2) // 2))
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
