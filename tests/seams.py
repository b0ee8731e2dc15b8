"""Seam scenes: many objects straddling tile seams and corners, and an oracle tile detector.

The oracle returns, for every object a tile sees, the visible part of its box clipped to the tile
(what a good detector outputs for a cut object), so merging alone decides duplicates and truncation.
"""

from __future__ import annotations

import numpy as np

from geonet.merge import SeamMerger
from geonet.tiling import TileGrid


def seam_objects(grid: TileGrid, rng, *, size=(12, 40), per_seam=3):
    """Objects centred on vertical seams, horizontal seams, and tile corners, plus some inside tiles."""
    objs = []

    def add(cx, cy):
        w, h = rng.uniform(*size, size=2)
        x1, y1 = cx - w / 2, cy - h / 2
        x1 = float(np.clip(x1, 0, grid.width - w))
        y1 = float(np.clip(y1, 0, grid.height - h))
        b = np.array([x1, y1, x1 + w, y1 + h])
        if all(_iou(b, o) == 0 for o in objs):
            objs.append(b)

    for c in range(1, len(grid.xs)):
        seam = (grid.xs[c] + grid.xs[c - 1] + grid.tile) / 2  # middle of the overlap
        for edge in (grid.xs[c], grid.xs[c - 1] + grid.tile, seam):  # on both tile edges and the middle
            for _ in range(per_seam):
                add(edge + rng.uniform(-3, 3), rng.uniform(0, grid.height))
    for r in range(1, len(grid.ys)):
        for edge in (grid.ys[r], grid.ys[r - 1] + grid.tile):
            for _ in range(per_seam):
                add(rng.uniform(0, grid.width), edge + rng.uniform(-3, 3))
    for r in range(1, len(grid.ys)):
        for c in range(1, len(grid.xs)):
            add(grid.xs[c] + rng.uniform(-2, 2), grid.ys[r] + rng.uniform(-2, 2))  # corners
    for _ in range(10):
        add(rng.uniform(0, grid.width), rng.uniform(0, grid.height))
    return np.array(objs).reshape(-1, 4)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def oracle_tiles(grid: TileGrid, objects, rng, *, min_visible_px=2.0, jitter=0.0, shortfall=0.0,
                 score_by_visibility=False):
    """``{(r, c): (boxes [N, 4] tile frame, scores, labels)}`` for every tile.

    ``shortfall``: a cut box stops up to this many pixels short of the tile edge that cuts it
    (real detectors rarely end a cut box exactly on the edge). ``score_by_visibility``: scores are
    0.5 + 0.5 x the visible fraction of the object (a cut object scores lower), instead of uniform
    random in [0.5, 1).
    """
    out = {}
    for r, y0 in enumerate(grid.ys):
        for c, x0 in enumerate(grid.xs):
            x1, y1 = x0 + grid.tile, y0 + grid.tile
            b = objects.copy()
            clip = np.column_stack([np.maximum(b[:, 0], x0), np.maximum(b[:, 1], y0), np.minimum(b[:, 2], x1),
                                    np.minimum(b[:, 3], y1)])
            if shortfall:
                cut = clip != b
                pull = rng.uniform(0, shortfall, clip.shape) * np.array([1, 1, -1, -1])
                clip = np.where(cut, clip + pull, clip)
            ok = (clip[:, 2] - clip[:, 0] >= min_visible_px) & (clip[:, 3] - clip[:, 1] >= min_visible_px)
            area = lambda q: (q[:, 2] - q[:, 0]) * (q[:, 3] - q[:, 1])  # noqa: E731
            visible = area(clip[ok]) / area(b[ok])
            clip = clip[ok] - np.array([x0, y0, x0, y0])
            if jitter:
                clip = clip + rng.normal(0, jitter, clip.shape)
                clip = np.clip(clip, 0, grid.tile)
            scores = 0.5 + 0.5 * visible if score_by_visibility else rng.uniform(0.5, 1.0, len(clip))
            out[(r, c)] = (clip, scores, np.ones(len(clip), dtype=np.int64))
    return out


def count_errors(objects, boxes, *, tol=0.5):
    """``(duplicates, truncated, missed)`` of output ``boxes`` against the true ``objects``.

    duplicates: output boxes beyond the first that overlap one object (IoU >= 0.3);
    truncated: output boxes overlapping an object (IoU >= 0.1) whose edge stops more than ``tol``
    pixels inside the object's on some side (a half box);
    missed: objects with no output box covering them to within ``tol`` on every side.
    """
    dup = trunc = missed = 0
    for o in objects:
        ious = np.array([_iou(o, b) for b in boxes]) if len(boxes) else np.zeros(0)
        dup += max(0, int((ious >= 0.3).sum()) - 1)
        touching = boxes[ious >= 0.1] if len(boxes) else np.zeros((0, 4))
        short = np.maximum.reduce([touching[:, 0] - o[0], touching[:, 1] - o[1], o[2] - touching[:, 2],
                                   o[3] - touching[:, 3]]) if len(touching) else np.zeros(0)
        trunc += int((short > tol).sum())
        if not (short <= tol).any():
            missed += 1
    return dup, trunc, missed


def stream_merge(grid: TileGrid, tiles: dict, **kw) -> tuple[np.ndarray, SeamMerger]:
    """Feed ``tiles`` ``{(row, col): (boxes, scores, labels)}`` to a :class:`SeamMerger` in row-major
    order, as detection does, and return every merged box ``[N, 4]`` and the merger."""
    m = SeamMerger(grid, **kw)
    parts = []
    for r in range(len(grid.ys)):
        for c in range(len(grid.xs)):
            m.add(r, c, *tiles[(r, c)])
            parts.append(m.pop_final())
    parts.append(m.finish())
    boxes = np.concatenate([p.boxes for p in parts if len(p)]) if any(len(p) for p in parts) else np.zeros((0, 4))
    return boxes, m
