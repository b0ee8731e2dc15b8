"""The window grid: one layout for training chips, on-the-fly training windows and detection tiles.

Along each axis of a region of length ``L`` the windows start at ``0, stride, 2 * stride, ...`` while
they fit; the last one is shifted inward to end exactly at ``L``, so the right and bottom edges are
always covered and never dropped. A region shorter than the window gets one window, padded.

Chipping (:mod:`geonet.chip`) lays this grid inside each raster or split block; detection
(:mod:`geonet.detect`) lays it over the whole scene as a :class:`TileGrid`, whose *cores* decide which
tile owns an object for the seam-aware merge (:mod:`geonet.merge`). All coordinates are pixels of the
frame the grid is laid in, in the corner convention of :mod:`geonet.georef`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["window_offsets", "TileGrid"]


def window_offsets(length: int, size: int, stride: int, start: int = 0) -> list[int]:
    """Window start offsets that cover ``[start, start + length)`` edge to edge (pixels).

    The last window is shifted inward to end at the region's end; a region shorter than ``size``
    gets the single offset ``start`` (the window is then padded).

    Examples:
        >>> window_offsets(1000, 512, 448)
        [0, 448, 488]
        >>> window_offsets(300, 512, 448)
        [0]
    """
    if length <= size:
        return [start]
    offs = list(range(start, start + length - size + 1, stride))
    if offs[-1] + size < start + length:
        offs.append(start + length - size)
    return offs


@dataclass(frozen=True)
class TileGrid:
    """The tile layout of a scene in the *detection frame* (scene pixels, divided by the resampling scale).

    Attributes:
        xs, ys: tile start columns / rows (:func:`window_offsets` of the width / height).
        tile: tile side in pixels.
        width, height: size of the frame in pixels.
    """

    xs: tuple[int, ...]
    ys: tuple[int, ...]
    tile: int
    width: int
    height: int

    @classmethod
    def build(cls, width: int, height: int, tile: int, overlap: int) -> TileGrid:
        """Tiles of ``tile`` px every ``tile - overlap`` px, covering the frame edge to edge."""
        stride = max(1, tile - overlap)
        return cls(tuple(window_offsets(width, tile, stride)), tuple(window_offsets(height, tile, stride)), tile,
                   width, height)

    @property
    def n_tiles(self) -> int:
        return len(self.xs) * len(self.ys)

    def tiles(self) -> list[tuple[int, int]]:
        """Every ``(row, col)`` in row-major order (the order detection reads and merges them)."""
        return [(r, c) for r in range(len(self.ys)) for c in range(len(self.xs))]

    def _core_1d(self, starts: Sequence[int], i: int) -> tuple[float, float]:
        lo = -math.inf if i == 0 else (starts[i - 1] + self.tile + starts[i]) / 2.0
        hi = math.inf if i == len(starts) - 1 else (starts[i] + self.tile + starts[i + 1]) / 2.0
        return lo, hi

    def core(self, r: int, c: int) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of tile ``(r, c)``'s core: along each axis, from the middle of its overlap
        with the previous tile to the middle of its overlap with the next (unbounded at the frame's
        edges). The cores partition the plane."""
        x0, x1 = self._core_1d(self.xs, c)
        y0, y1 = self._core_1d(self.ys, r)
        return x0, y0, x1, y1

    def interior_edges(self, r: int, c: int) -> tuple[bool, bool, bool, bool]:
        """Whether the left, top, right and bottom edges of tile ``(r, c)`` are shared with a neighbour."""
        return c > 0, r > 0, c < len(self.xs) - 1, r < len(self.ys) - 1

    def overlapping_rows(self, r: int) -> list[int]:
        """Tile rows whose tiles overlap row ``r``'s tiles (``r`` excluded), in order."""
        return [k for k in range(len(self.ys)) if k != r and abs(self.ys[k] - self.ys[r]) < self.tile]
