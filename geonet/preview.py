"""Preview PNGs: boxes drawn over imagery, to check an overlay by eye.

Display rule: three or more bands show the first three selected bands as RGB, one or two bands
show the first as grey. ``uint8`` data is shown as is; any other dtype is stretched per band
between its 2nd and 98th percentiles over valid pixels. Boxes are drawn with
``torchvision.utils.draw_bounding_boxes``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from geonet.atomic import atomic_file
from geonet.boxes import xywh_to_xyxy

if TYPE_CHECKING:
    from geonet.raster import RasterInfo
    from geonet.tiling import TileGrid

__all__ = ["to_display", "draw_boxes", "chip_previews", "PreviewCanvas"]

TARGET_COLOUR = "yellow"
IGNORE_COLOUR = "red"


def to_display(data: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``[C, H, W]`` raster data -> ``[3, H, W]`` uint8 for display (see module docstring)."""
    bands = data[:3] if data.shape[0] >= 3 else np.repeat(data[:1], 3, axis=0)
    if bands.dtype == np.uint8:
        return np.ascontiguousarray(bands)
    out = np.zeros(bands.shape, dtype=np.uint8)
    m = valid if valid is not None and valid.any() else np.ones(bands.shape[1:], bool)
    for k in range(3):
        v = bands[k][m].astype(np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        lo, hi = np.percentile(v, [2, 98])
        scale = 255.0 / (hi - lo) if hi > lo else 1.0
        out[k] = np.clip((bands[k].astype(np.float64) - lo) * scale, 0, 255).astype(np.uint8)
    if valid is not None:
        out[:, ~valid] = 0
    return out


def draw_boxes(rgb: np.ndarray, boxes: np.ndarray, *, colour: str | list[str] = TARGET_COLOUR,
               labels: list[str] | None = None, width: int = 2) -> np.ndarray:
    """Draw ``[N, 4]`` pixel boxes ``[x1, y1, x2, y2]`` on a ``[3, H, W]`` uint8 image; returns a copy."""
    if len(boxes) == 0:
        return rgb.copy()
    img = torch.from_numpy(np.ascontiguousarray(rgb))
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    return draw_bounding_boxes(img, b, labels=labels, colors=colour, width=width).numpy()


def save_png(rgb: np.ndarray, path: str | os.PathLike[str], max_side: int | None = None) -> None:
    """Save ``[3, H, W]`` uint8 as PNG, downsampled so that its longest side is at most ``max_side``."""
    img = Image.fromarray(np.transpose(rgb, (1, 2, 0)))
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    img.save(path)


def chip_previews(chip_dir: Path, coco: dict, n: int) -> list[Path]:
    """Write ``n`` previews of chips with objects to ``chip_dir/preview``, spread across the list.

    Targets are yellow, ignore regions red.
    """
    import rasterio

    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    candidates = [im for im in coco["images"] if im["id"] in by_image] or coco["images"]
    if not candidates:
        return []
    pick = np.unique(np.linspace(0, len(candidates) - 1, num=min(n, len(candidates))).round().astype(int))
    out_dir = chip_dir / "preview"
    out_dir.mkdir(exist_ok=True)
    written = []
    for k in pick:
        im = candidates[int(k)]
        with rasterio.open(chip_dir / im["file_name"]) as src:
            data = src.read()
            valid = src.dataset_mask() > 0
        rgb = to_display(data, valid)
        anns = by_image.get(im["id"], [])
        boxes = xywh_to_xyxy([a["bbox"] for a in anns])
        colours = [IGNORE_COLOUR if a.get("iscrowd") else TARGET_COLOUR for a in anns]
        rgb = draw_boxes(rgb, boxes, colour=colours, width=2)
        path = out_dir / (Path(im["file_name"]).stem + ".png")
        save_png(rgb, path)
        written.append(path)
    return written


class PreviewCanvas:
    """A downsampled copy of a scene built from its detection tiles as they are read, with boxes drawn last.

    Args:
        grid: the scene's tile grid (detection frame).
        info: the scene's header (bands, dtype).
    """

    MAX_SIDE = 2048
    MAX_BOXES = 1_000_000

    def __init__(self, grid: TileGrid, info: RasterInfo):
        self.grid = grid
        self.step = self.step_of(grid)
        h, w = -(-grid.height // self.step), -(-grid.width // self.step)
        nb = min(3, len(info.bands))
        self.canvas = np.zeros((nb, h, w), dtype=np.float32)
        self.valid = np.zeros((h, w), dtype=bool)
        self.dtype = info.dtype
        self.boxes: list[np.ndarray] = []
        self.n_boxes = 0

    @classmethod
    def step_of(cls, grid: TileGrid) -> int:
        """Detection-frame pixels per canvas pixel (the longer side fits :attr:`MAX_SIDE`)."""
        return max(1, math.ceil(max(grid.width, grid.height) / cls.MAX_SIDE))

    @classmethod
    def thumbnails(cls, grid: TileGrid, data: np.ndarray, tiles) -> list[np.ndarray]:
        """Tiles ``data`` ``[B, C, tile, tile]`` at ``tiles`` ``[(row, col), ...]`` subsampled onto the canvas
        grid (up to 3 bands each): what :meth:`add_thumbnails` paints. Small enough to send between processes."""
        s = cls.step_of(grid)
        return [d[:3, (-grid.ys[r]) % s::s, (-grid.xs[c]) % s::s].copy() for d, (r, c) in zip(data, tiles)]

    def add_tiles(self, data: np.ndarray, tiles) -> None:
        """Paint tiles ``data`` ``[B, C, tile, tile]`` at grid positions ``tiles`` ``[(row, col), ...]``."""
        self.add_thumbnails(self.thumbnails(self.grid, data, tiles), tiles)

    def add_thumbnails(self, thumbs: list[np.ndarray], tiles) -> None:
        """Paint :meth:`thumbnails` at grid positions ``tiles``."""
        s, g = self.step, self.grid
        for d, (r, c) in zip(thumbs, tiles):
            y0, x0 = g.ys[r], g.xs[c]
            oy, ox = (-y0) % s, (-x0) % s  # first tile pixel on the canvas grid
            sub = d[: self.canvas.shape[0]].astype(np.float32)
            cy, cx = (y0 + oy) // s, (x0 + ox) // s
            hh = min(sub.shape[1], self.canvas.shape[1] - cy)
            ww = min(sub.shape[2], self.canvas.shape[2] - cx)
            if hh > 0 and ww > 0:
                self.canvas[:, cy:cy + hh, cx:cx + ww] = sub[:, :hh, :ww]
                self.valid[cy:cy + hh, cx:cx + ww] = True

    def add_boxes(self, boxes: np.ndarray) -> None:
        """Remember boxes ``[N, 4]`` (xyxy, detection frame) to draw."""
        if self.n_boxes < self.MAX_BOXES:
            self.boxes.append(np.asarray(boxes, dtype=np.float32) / self.step)
            self.n_boxes += len(boxes)

    def save(self, path) -> Path:
        """Write the PNG atomically."""
        data = self.canvas.astype(self.dtype) if self.dtype == "uint8" else self.canvas
        rgb = to_display(data, self.valid)
        boxes = np.concatenate(self.boxes) if self.boxes else np.zeros((0, 4))
        rgb = draw_boxes(rgb, boxes, colour="yellow", width=1 if self.step > 1 else 2)
        p = Path(path)
        with atomic_file(p) as tmp:
            save_png(rgb, tmp)
        return p
