"""Seam-aware, streaming merge of tile detections into scene detections.

Tiles overlap by at least the largest object, so every object that is cut by one tile's edge is seen
whole by a neighbour. Plain NMS cannot use that: it keeps the half-box (when the halves' IoU with the
whole box is below the threshold) or keeps the half when it scores higher. The rule here:

1. **Partial or whole.** A detection that touches an *interior* edge of its tile (within
   ``edge_margin`` pixels; scene edges do not count) is *partial*: the tile saw only part of the
   object. Every other detection is *whole*.
2. **Whole detections: core-priority NMS.** The scene is partitioned into tile *cores*: along each
   axis, a tile's core runs from the middle of its overlap with the previous tile to the middle of
   its overlap with the next. A whole detection whose centre lies in its own tile's core is
   preferred over one that does not; then the score decides. Greedy class-aware NMS
   (``torchvision.ops.batched_nms``, IoU >= ``iou_threshold``) with that priority keeps one box per
   object. An object no larger than the overlap has its centre in exactly one core, at least
   overlap/2 from that tile's interior edges, so that tile sees it whole. A kept detection whose
   centre is *outside* its tile's core and that a kept core detection of the same class covers
   (intersection over its area >= ``cover_ios``) is dropped too: it is the view of a cut object
   whose box stops short of the tile edge (detectors rarely end a cut box exactly at the edge), and
   the tile owning that core sees the object whole.
3. **Partial detections** are dropped when a kept whole detection of the same class covers them
   (intersection over the partial's area >= ``cover_ios``; the lookup uses an STR-tree). A partial
   that no whole detection covers belongs to an object larger than the overlap: it is merged with
   the partials of the same class across the seam (boxes that intersect and whose extents along
   the seam overlap by 1-D IoU >= 0.5) into their union box, scored by the best piece.

So an object cut by a seam comes out as exactly one box covering the whole object: neither a
duplicate nor a truncated box.

**Streaming, bounded memory.** Tiles arrive in row-major order. The detections of a tile row are
final once every row whose tiles overlap it is complete (the next row; two with overlaps above half
a tile or where the last row shifts inward): only those rows are held, whatever the scene size. NMS chains longer than one tile row (box A suppressed by B, B by C in the row after)
could in principle differ from a whole-scene NMS; with the core priority they need three boxes of
one object overlapping across two seams, which the tests never produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
import torch
from torchvision.ops import batched_nms

from geonet.chip import connected_components, window_offsets

__all__ = ["TileGrid", "SeamMerger", "Detections"]


@dataclass(frozen=True)
class TileGrid:
    """The tile layout of a scene (in the pixel frame detection runs in).

    Attributes:
        xs, ys: tile start columns / rows (``window_offsets`` of the width / height).
        tile: tile side in pixels.
        width, height: scene size in pixels.
    """

    xs: tuple[int, ...]
    ys: tuple[int, ...]
    tile: int
    width: int
    height: int

    @classmethod
    def build(cls, width: int, height: int, tile: int, overlap: int) -> TileGrid:
        """Tiles of ``tile`` px every ``tile - overlap`` px, covering the scene edge to edge."""
        stride = max(1, tile - overlap)
        return cls(tuple(window_offsets(width, tile, stride)), tuple(window_offsets(height, tile, stride)), tile,
                   width, height)

    @property
    def n_tiles(self) -> int:
        return len(self.xs) * len(self.ys)

    def _core_1d(self, starts: Sequence[int], i: int, length: int) -> tuple[float, float]:
        lo = 0.0 if i == 0 else (starts[i - 1] + self.tile + starts[i]) / 2.0
        hi = float(max(length, self.tile)) if i == len(starts) - 1 else (starts[i] + self.tile + starts[i + 1]) / 2.0
        if i == 0:
            lo = -np.inf
        if i == len(starts) - 1:
            hi = np.inf
        return lo, hi

    def core(self, r: int, c: int) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of tile ``(r, c)``'s core; the cores partition the plane."""
        x0, x1 = self._core_1d(self.xs, c, self.width)
        y0, y1 = self._core_1d(self.ys, r, self.height)
        return x0, y0, x1, y1

    def interior_edges(self, r: int, c: int) -> tuple[bool, bool, bool, bool]:
        """Whether the left, top, right and bottom edges of tile ``(r, c)`` are shared with a neighbour."""
        return c > 0, r > 0, c < len(self.xs) - 1, r < len(self.ys) - 1


@dataclass
class Detections:
    """Boxes ``[N, 4]`` (xyxy, scene pixel frame), ``scores [N]``, ``labels [N]`` as CPU numpy arrays."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.boxes)

    @staticmethod
    def cat(parts: Sequence[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Detections()
        return Detections(np.concatenate([p.boxes for p in parts]), np.concatenate([p.scores for p in parts]),
                          np.concatenate([p.labels for p in parts]))


@dataclass
class _Row:
    boxes: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    partial: list = field(default_factory=list)
    core: list = field(default_factory=list)
    done: int = 0

    def arrays(self):
        if not self.boxes:
            return (torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                    torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
        return (torch.cat(self.boxes), torch.cat(self.scores), torch.cat(self.labels), torch.cat(self.partial),
                torch.cat(self.core))


def _ios(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the area of each ``a`` box, for aligned pairs ``[N, 4]`` x ``[N, 4]``."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    area = np.maximum((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), 1e-9)
    return iw * ih / area


def _iou_1d(a0, a1, b0, b1):
    inter = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None)
    union = np.maximum(a1, b1) - np.minimum(a0, b0)
    return inter / np.maximum(union, 1e-9)


class SeamMerger:
    """Streaming seam-aware merge (module docstring).

    Args:
        grid: the tile layout.
        iou_threshold: IoU of the class-aware NMS between whole detections of different tiles.
        edge_margin: pixels from an interior tile edge within which a box counts as touching it.
        cover_ios: share of a partial box that a whole box must cover to absorb it.
        device: where NMS runs (``batched_nms`` on the model's device).

    Use: call :meth:`add` for every tile in row-major order (tiles skipped as nodata with empty
    arrays), and collect :meth:`pop_final` after each call; :meth:`finish` returns the rest.
    A row is final when every row whose tiles overlap it is complete; only the rows whose tiles
    overlap the rows still open are held (two or three with overlaps up to half a tile).
    """

    def __init__(self, grid: TileGrid, *, iou_threshold: float = 0.5, edge_margin: float = 2.0,
                 cover_ios: float = 0.5, device: str | torch.device = "cpu"):
        self.grid = grid
        self.iou_threshold = iou_threshold
        self.edge_margin = edge_margin
        self.cover_ios = cover_ios
        self.device = torch.device(device)
        self.rows: dict[int, _Row] = {}
        self.kept: dict[int, tuple] = {}  # per final row: kept whole (boxes, scores, labels, core)
        self.consumed: dict[int, set[int]] = {}  # per row: partial pieces already merged into an earlier output
        self.next_final = 0
        self.max_held = 0

    def _overlapping(self, r: int) -> list[int]:
        """Rows whose tiles overlap row ``r``'s tiles (``r`` excluded)."""
        ys, t = self.grid.ys, self.grid.tile
        return [k for k in range(len(ys)) if k != r and abs(ys[k] - ys[r]) < t]

    def add(self, r: int, c: int, boxes, scores, labels) -> None:
        """Add tile ``(r, c)``'s detections, in the tile's own pixel frame (``[N, 4]`` xyxy)."""
        g = self.grid
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=self.device).reshape(-1, 4)
        scores = torch.as_tensor(scores, dtype=torch.float32, device=self.device).reshape(-1)
        labels = torch.as_tensor(labels, dtype=torch.int64, device=self.device).reshape(-1)
        x0, y0 = g.xs[c], g.ys[r]
        left, top, right, bottom = g.interior_edges(r, c)
        m = self.edge_margin
        partial = torch.zeros(len(boxes), dtype=torch.bool, device=self.device)
        if left:
            partial |= boxes[:, 0] <= m
        if top:
            partial |= boxes[:, 1] <= m
        if right:
            partial |= boxes[:, 2] >= g.tile - m
        if bottom:
            partial |= boxes[:, 3] >= g.tile - m
        scene = boxes + torch.tensor([x0, y0, x0, y0], dtype=torch.float32, device=self.device)
        cx = (scene[:, 0] + scene[:, 2]) / 2
        cy = (scene[:, 1] + scene[:, 3]) / 2
        k0, k1, k2, k3 = g.core(r, c)
        core = (cx >= k0) & (cx < k2) & (cy >= k1) & (cy < k3)
        row = self.rows.setdefault(r, _Row())
        if len(boxes):
            row.boxes.append(scene)
            row.scores.append(scores)
            row.labels.append(labels)
            row.partial.append(partial)
            row.core.append(core)
        row.done += 1
        held = sum(len(b) for rw in self.rows.values() for b in rw.boxes) + sum(len(k[0]) for k in self.kept.values())
        self.max_held = max(self.max_held, held)

    def _row_complete(self, r: int) -> bool:
        return r in self.rows and self.rows[r].done == len(self.grid.xs)

    def pop_final(self) -> Detections:
        """Detections of the rows that became final since the last call (scene pixel frame)."""
        out = []
        n_rows = len(self.grid.ys)
        while self.next_final < n_rows:
            r = self.next_final
            later = [k for k in self._overlapping(r) if k > r]
            if not (self._row_complete(r) and all(self._row_complete(k) for k in later)):
                break
            out.append(self._finalize(r))
            self.next_final += 1
            self._prune()
        return Detections.cat(out)

    def _prune(self) -> None:
        """Forget rows that no open row overlaps."""
        open_rows = range(self.next_final, len(self.grid.ys))
        needed = set(open_rows)
        for r in open_rows:
            needed.update(self._overlapping(r))
            break  # the first open row overlaps the most previous rows
        for k in [k for k in self.rows if k < self.next_final]:
            self.rows.pop(k)  # final rows live on only through their kept boxes
        for k in [k for k in self.kept if k not in needed]:
            self.kept.pop(k)
        for k in [k for k in self.consumed if k < self.next_final]:
            self.consumed.pop(k)

    def finish(self) -> Detections:
        """Everything not yet returned (call after the last tile)."""
        out = self.pop_final()
        if self.next_final < len(self.grid.ys):
            raise RuntimeError(f"tiles missing: rows {self.next_final}.. are incomplete")
        return out

    def _finalize(self, r: int) -> Detections:
        dev = self.device
        before = [k for k in self._overlapping(r) if k < r]
        after = [k for k in self._overlapping(r) if k > r]
        # --- whole detections: priority NMS over kept(before) + whole(r) + whole(after)
        parts_b, parts_s, parts_l, parts_src, parts_c = [], [], [], [], []
        for k in before:
            if k in self.kept and len(self.kept[k][0]):
                kb, ks, kl, kc = self.kept[k]
                parts_b.append(kb)
                parts_s.append(ks + 4.0)  # already final: never suppressed
                parts_l.append(kl)
                parts_c.append(kc)
                parts_src.append(torch.full((len(kb),), -1, dtype=torch.int64, device=dev))
        arrays = {k: self.rows[k].arrays() for k in [r] + after}
        for k in [r] + after:
            b, s, lab, p, c = (t.to(dev) for t in arrays[k])
            w = ~p
            parts_b.append(b[w])
            parts_s.append(s[w] + 2.0 * c[w].float())  # core detections first
            parts_l.append(lab[w])
            parts_c.append(c[w])
            parts_src.append(torch.full((int(w.sum()),), 0 if k == r else 1, dtype=torch.int64, device=dev))
        cb, cs, cl, csrc = torch.cat(parts_b), torch.cat(parts_s), torch.cat(parts_l), torch.cat(parts_src)
        ccore = torch.cat(parts_c)
        keep_mask = torch.zeros(len(cb), dtype=torch.bool, device=dev)
        if len(cb):
            keep_mask[batched_nms(cb, cs, cl, self.iou_threshold)] = True
        # a kept detection outside its tile's core that a kept core detection covers is the cut (or
        # shifted) view of an object another tile sees whole: drop it
        core_b = cb[keep_mask & ccore].cpu().numpy()
        core_l = cl[keep_mask & ccore].cpu().numpy()
        cand = torch.nonzero(keep_mask & ~ccore & (csrc == 0)).flatten()
        if len(cand):
            gone = ~self._not_covered(cb[cand].cpu().numpy(), cl[cand].cpu().numpy(), core_b, core_l)
            keep_mask[cand[torch.as_tensor(gone, device=dev)]] = False
        b_r, s_r, l_r, p_r, _ = (t.to(dev) for t in arrays[r])
        sel_r = keep_mask & (csrc == 0)
        kept_r = (cb[sel_r], s_r[~p_r][keep_mask[csrc == 0]], cl[sel_r], ccore[sel_r])
        self.kept[r] = kept_r
        cov_b, cov_l = cb[keep_mask].cpu().numpy(), cl[keep_mask].cpu().numpy()
        # --- partial detections of row r (minus pieces already merged into an earlier row's output)
        pb, ps, pl = b_r[p_r].cpu().numpy(), s_r[p_r].cpu().numpy(), l_r[p_r].cpu().numpy()
        alive = self._not_covered(pb, pl, cov_b, cov_l)
        if self.consumed.get(r):
            alive[list(self.consumed[r])] = False
        pb, ps, pl = pb[alive], ps[alive], pl[alive]
        # uncovered partials of later rows, for merging across horizontal seams
        nb, ns, nl, owner = [], [], [], []
        for k in after:
            b, s, lab, p, _ = arrays[k]
            kb, ks, kl = b[p].cpu().numpy(), s[p].cpu().numpy(), lab[p].cpu().numpy()
            idx = np.flatnonzero(self._not_covered(kb, kl, cov_b, cov_l))
            idx = np.array([i for i in idx if i not in self.consumed.get(k, set())], dtype=np.int64)
            if len(idx):
                nb.append(kb[idx])
                ns.append(ks[idx])
                nl.append(kl[idx])
                owner.extend((k, int(i)) for i in idx)
        nb = np.concatenate(nb) if nb else np.zeros((0, 4))
        ns = np.concatenate(ns) if ns else np.zeros(0)
        nl = np.concatenate(nl) if nl else np.zeros(0, np.int64)
        merged, used = self._merge_partials(pb, ps, pl, nb, ns, nl)
        for u in used:
            k, i = owner[u]
            self.consumed.setdefault(k, set()).add(i)
        whole = Detections(kept_r[0].cpu().numpy().astype(np.float64), kept_r[1].cpu().numpy().astype(np.float64),
                           kept_r[2].cpu().numpy())
        return Detections.cat([whole, merged])

    def _not_covered(self, pb, pl, cov_b, cov_l) -> np.ndarray:
        """Mask of partial boxes that no covering box of the same class covers by ``cover_ios``."""
        alive = np.ones(len(pb), dtype=bool)
        if len(pb) == 0 or len(cov_b) == 0:
            return alive
        tree = shapely.STRtree(shapely.box(*cov_b.T))
        pi, ci = tree.query(shapely.box(*pb.T), predicate="intersects")
        if len(pi):
            same = pl[pi] == cov_l[ci]
            ios = _ios(pb[pi], cov_b[ci])
            hit = same & (ios >= self.cover_ios)
            alive[np.unique(pi[hit])] = False
        return alive

    def _merge_partials(self, pb, ps, pl, nb, ns, nl) -> tuple[Detections, list[int]]:
        """Union the uncovered partial pieces of one object (row r, plus row r+1 across the seam)."""
        if len(pb) == 0:
            return Detections(), []
        allb = np.concatenate([pb, nb]) if len(nb) else pb
        alls = np.concatenate([ps, ns]) if len(nb) else ps
        alll = np.concatenate([pl, nl]) if len(nb) else pl
        tree = shapely.STRtree(shapely.box(*allb.T))
        a, b = tree.query(shapely.box(*allb.T), predicate="intersects")
        keep = (a < b) & (alll[a] == alll[b])
        a, b = a[keep], b[keep]
        seam = np.maximum(_iou_1d(allb[a, 0], allb[a, 2], allb[b, 0], allb[b, 2]),
                          _iou_1d(allb[a, 1], allb[a, 3], allb[b, 1], allb[b, 3])) >= 0.5
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(connected_components(len(allb), a[seam], b[seam]).tolist()):
            groups.setdefault(g, []).append(i)
        out_b, out_s, out_l, used_next = [], [], [], []
        for members in groups.values():
            if not any(m < len(pb) for m in members):
                continue  # only row r+1 pieces: they are handled when that row is final
            g = allb[members]
            out_b.append([g[:, 0].min(), g[:, 1].min(), g[:, 2].max(), g[:, 3].max()])
            out_s.append(alls[members].max())
            out_l.append(alll[members[0]])
            used_next.extend(m - len(pb) for m in members if m >= len(pb))
        return Detections(np.array(out_b, dtype=np.float64).reshape(-1, 4), np.array(out_s, dtype=np.float64),
                          np.array(out_l, dtype=np.int64)), used_next
