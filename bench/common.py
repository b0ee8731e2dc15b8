"""Shared helpers of the benchmarks: synthetic scenes, a checkpoint, peak RSS, timing."""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    ``VmHWM`` from ``/proc/self/status`` where there is one: Linux copies the parent's ``ru_maxrss``
    into a child across ``exec``, so ``getrusage`` in a fresh ``subprocess`` reports at least the
    parent's peak. Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakTreeRss:
    """Peak summed RSS (MiB) of this process and all its children (reader workers), sampled every ``dt`` s."""

    def __init__(self, dt: float = 0.05):
        import threading

        import psutil

        self.dt, self.peak_mb, self._proc = dt, 0.0, psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        total = self._proc.memory_info().rss
        for c in self._proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except Exception:  # a worker that just exited
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._sample())
            self._stop.wait(self.dt)

    def __enter__(self) -> PeakTreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def synthetic_scene(path: Path, width: int, height: int, *, seed: int = 0, n_objects: int | None = None,
                    bands: int = 3, block: int = 512) -> Path:
    """A tiled, deflate-compressed uint8 GeoTIFF (EPSG:32618, 0.1 m) with bright rectangles, written by blocks."""
    rng = np.random.default_rng(seed)
    n_objects = n_objects if n_objects is not None else max(1, width * height // 40_000)
    xy = rng.uniform(0, [width - 40, height - 40], (n_objects, 2)).astype(int)
    wh = rng.integers(12, 40, (n_objects, 2))
    profile = dict(driver="GTiff", width=width, height=height, count=bands, dtype="uint8", crs="EPSG:32618",
                   transform=Affine(0.1, 0, 500000, 0, -0.1, 4600000), tiled=True, blockxsize=block,
                   blockysize=block, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        for y0 in range(0, height, block):
            h = min(block, height - y0)
            strip = rng.normal(60, 12, size=(bands, h, width)).clip(0, 255).astype(np.uint8)
            sel = (xy[:, 1] < y0 + h) & (xy[:, 1] + wh[:, 1] > y0)
            for (x, y), (w, hh) in zip(xy[sel], wh[sel]):
                strip[:, max(0, y - y0):min(h, y + hh - y0), x:x + w] = 220
            dst.write(strip, window=rasterio.windows.Window(0, y0, width, h))
    return path


def mosaic_vrt(tile_path: Path, out: Path, size: int) -> Path:
    """A VRT of ``size`` x ``size`` px that repeats ``tile_path`` (a scene far larger than the disk it uses)."""
    with rasterio.open(tile_path) as src:
        tw, th, count = src.width, src.height, src.count
        bx, by = src.block_shapes[0][1], src.block_shapes[0][0]
    parts = [f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}">',
             '<SRS>EPSG:32618</SRS><GeoTransform>500000, 0.1, 0, 4600000, 0, -0.1</GeoTransform>']
    for b in range(1, count + 1):
        parts.append(f'<VRTRasterBand dataType="Byte" band="{b}">')
        for y in range(0, size, th):
            for x in range(0, size, tw):
                w, h = min(tw, size - x), min(th, size - y)
                parts.append(f'<SimpleSource><SourceFilename relativeToVRT="0">{tile_path}</SourceFilename>'
                             f'<SourceBand>{b}</SourceBand><SourceProperties RasterXSize="{tw}" RasterYSize="{th}" '
                             f'DataType="Byte" BlockXSize="{bx}" BlockYSize="{by}"/>'
                             f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                             f'<DstRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/></SimpleSource>')
        parts.append("</VRTRasterBand>")
    parts.append("</VRTDataset>")
    out.write_text("\n".join(parts))
    return out


def random_checkpoint(path: Path, *, backbone: str = "resnet18", chip: int = 512, score_thresh: float = 0.05,
                      classes=("object",), fpn_channels: int | None = None) -> Path:
    """A geonet checkpoint with randomly initialised weights (speed does not depend on the weights);
    ``fpn_channels`` ``None``: geonet's default width."""
    import torch

    from geonet.checkpoint import CheckpointHeader, save_checkpoint
    from geonet.model import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, num_classes=len(classes), mean=[60.0] * 3, std=[30.0] * 3,
                      score_thresh=score_thresh, fpn_channels=fpn_channels)
    model = build_model(cfg)
    stats = [12, 14, 25, 38, 40]
    save_checkpoint(path, model, CheckpointHeader(
        model_config=cfg, classes=list(classes), bands=[1, 2, 3], dtype="uint8", gsd=[0.1, 0.1], chip_size=chip,
        box_stats={"width": stats, "height": stats, "side": stats}, epoch=0))
    return path


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t0


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"cpu: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
