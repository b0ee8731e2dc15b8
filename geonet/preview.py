"""Preview PNGs: boxes drawn over imagery, to check an overlay by eye.

Display rule: three or more bands show the first three selected bands as RGB, one or two bands
show the first as grey. ``uint8`` data is shown as is; any other dtype is stretched per band
between its 2nd and 98th percentiles over valid pixels. Boxes are drawn with
``torchvision.utils.draw_bounding_boxes``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

__all__ = ["to_display", "draw_boxes", "chip_previews"]

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
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns]).reshape(-1, 4)
        colours = [IGNORE_COLOUR if a.get("iscrowd") else TARGET_COLOUR for a in anns]
        rgb = draw_boxes(rgb, boxes, colour=colours, width=2)
        path = out_dir / (Path(im["file_name"]).stem + ".png")
        save_png(rgb, path)
        written.append(path)
    return written
