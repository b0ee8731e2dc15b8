"""Seam-aware, streaming merge of tile detections into scene detections.

Everything here is in the *detection frame*: scene pixels divided by the resampling scale of
:class:`geonet.pipeline.ScenePlan` (the scene's own pixels when no resampling happens), in which the
:class:`geonet.tiling.TileGrid` is laid out. Boxes are ``[x1, y1, x2, y2]``.

Tiles overlap by at least the largest object, so every object that is cut by one tile's edge is seen
whole by a neighbour. Plain NMS cannot use that: it keeps the half-box (when the halves' IoU with the
whole box is below the threshold) or keeps the half when it scores higher. The rule here:

1. **Partial or whole.** A detection that touches an *interior* edge of its tile (within
   ``edge_margin`` pixels; scene edges do not count) is *partial*: the tile saw only part of the
   object. Every other detection is *whole*.
2. **Whole detections: priority NMS.** Each whole detection gets a priority: :data:`FINAL` for the
   kept detections of rows already returned (they are never suppressed again), :data:`CORE` when its
   centre lies in its own tile's *core* (along each axis, from the middle of the tile's overlap with
   the previous tile to the middle of its overlap with the next; the cores partition the frame), else
   :data:`OFF_CORE`. Greedy class-aware NMS (``torchvision.ops.batched_nms``, IoU > ``iou_threshold``)
   ranks by priority, then score, and keeps one box per object. An object no larger than the overlap
   has its centre in exactly one core, at least overlap/2 from that tile's interior edges, so that tile
   sees it whole. A kept off-core detection that a kept core detection of the same class covers
   (intersection over its area >= ``cover_ios``) is dropped too: it is the view of a cut object whose
   box stops short of the tile edge (detectors rarely end a cut box exactly at the edge), and the tile
   owning that core sees the object whole. The box kept for an object carries the best score of the
   whole detections it stands for (those it suppressed or covered): the core preference picks the
   tile, not the confidence.
3. **Partial detections** are dropped when a kept whole detection of the same class covers them
   (intersection over the partial's area >= ``cover_ios``). A partial that no whole detection covers
   belongs to an object larger than the overlap: it is merged with its pieces across the seam into
   their union box, scored by the best piece. Two pieces join only when they come from neighbouring
   tiles on opposite sides of one seam (left and right of a vertical seam in the same tile row, or
   above and below a horizontal seam in the same tile column), each touching that seam's edge of its
   tile, are of one class, intersect, and their extents *along the seam* overlap by 1-D IoU >= 0.5; or
   when two tiles saw the same piece (IoU >= 0.5). Pieces of one tile are never joined, so two
   adjacent objects cut by the same tile edge are never fused.

So an object cut by a seam comes out as exactly one box covering the whole object: neither a
duplicate nor a truncated box.

**Streaming, bounded memory.** Tiles arrive in row-major order. The detections of a tile row are
final once every row whose tiles overlap it is complete (the next row; two with overlaps above half
a tile or where the last row shifts inward): only those rows are held, whatever the scene size. NMS
chains longer than one tile row (box A suppressed by B, B by C in the row after) could in principle
differ from a whole-scene NMS; with the core priority they need three boxes of one object overlapping
across two seams, which the tests never produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from geonet.boxes import box_ioa, connected_components, intersecting_pairs, pair_iou
from geonet.tiling import TileGrid

__all__ = ["SeamMerger", "Detections", "FINAL", "CORE", "OFF_CORE"]

#: NMS priorities of whole detections (module docstring, step 2). Scores lie in [0, 1], so the NMS
#: rank ``priority * 2 + score`` puts every detection of a higher priority before any of a lower one.
FINAL, CORE, OFF_CORE = 2, 1, 0


@dataclass
class Detections:
    """Merged detections as CPU numpy arrays: ``boxes [N, 4]`` (xyxy, detection frame, float64),
    ``scores [N]`` (float64), ``labels [N]`` (int64 class ids)."""

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
class _Boxes:
    """Tile detections in the detection frame, on the merger's device.

    Attributes:
        boxes: FloatTensor[N, 4] xyxy.
        scores: FloatTensor[N].
        labels: Int64Tensor[N].
        core: BoolTensor[N], centre inside its tile's core.
        edges: BoolTensor[N, 4], touches the left, top, right, bottom interior edge of its tile.
        tile: Int64Tensor[N, 2], ``(row, col)`` of its tile.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    core: Tensor
    edges: Tensor
    tile: Tensor

    FIELDS = ("boxes", "scores", "labels", "core", "edges", "tile")

    @property
    def partial(self) -> Tensor:
        """BoolTensor[N]: touches an interior edge of its tile."""
        return self.edges.any(dim=1)

    @staticmethod
    def empty(device: torch.device) -> _Boxes:
        return _Boxes(torch.zeros((0, 4), device=device), torch.zeros(0, device=device),
                      torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.bool, device=device),
                      torch.zeros((0, 4), dtype=torch.bool, device=device),
                      torch.zeros((0, 2), dtype=torch.int64, device=device))

    @staticmethod
    def cat(parts: Sequence[_Boxes], device: torch.device) -> _Boxes:
        if not parts:
            return _Boxes.empty(device)
        return _Boxes(*(torch.cat([getattr(p, f) for p in parts]) for f in _Boxes.FIELDS))

    def __getitem__(self, mask: Tensor) -> _Boxes:
        return _Boxes(*(getattr(self, f)[mask] for f in _Boxes.FIELDS))

    def __len__(self) -> int:
        return len(self.boxes)

    def to_detections(self) -> Detections:
        return Detections(self.boxes.cpu().numpy().astype(np.float64), self.scores.cpu().numpy().astype(np.float64),
                          self.labels.cpu().numpy())


@dataclass
class _Pieces:
    """Partial (or covering) detections as CPU numpy arrays: ``boxes [N, 4]``, ``scores [N]``, ``labels [N]``,
    ``edges [N, 4]`` (interior tile edges touched: left, top, right, bottom), ``tile [N, 2]`` (row, col);
    for pieces of later rows, ``owner[k] = (row, index among that row's partials)``."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    edges: np.ndarray
    tile: np.ndarray
    owner: list[tuple[int, int]] = field(default_factory=list)

    ARRAYS = ("boxes", "scores", "labels", "edges", "tile")

    @staticmethod
    def of(b: _Boxes) -> _Pieces:
        return _Pieces(*(getattr(b, f).cpu().numpy() for f in _Pieces.ARRAYS))

    def __getitem__(self, mask: np.ndarray) -> _Pieces:
        owner = [self.owner[k] for k in np.flatnonzero(mask)] if self.owner else []
        return _Pieces(*(getattr(self, f)[mask] for f in _Pieces.ARRAYS), owner)

    @staticmethod
    def cat(parts: Sequence[_Pieces]) -> _Pieces:
        if not parts:
            return _Pieces(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                           np.zeros((0, 4), bool), np.zeros((0, 2), np.int64))
        return _Pieces(*(np.concatenate([getattr(p, f) for p in parts]) for f in _Pieces.ARRAYS),
                       [o for p in parts for o in p.owner])


def _as_tensor(x, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``x`` (tensor, array, list) as a tensor; read-only arrays (as Ray hands them over) are copied."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()
    return torch.as_tensor(x, dtype=dtype, device=device)


def _extent_iou(a0, a1, b0, b1):
    """1-D IoU of the extents ``[a0, a1]`` and ``[b0, b1]`` (arrays)."""
    inter = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None)
    union = np.maximum(a1, b1) - np.minimum(a0, b0)
    return inter / np.maximum(union, 1e-9)


class SeamMerger:
    """Streaming seam-aware merge (module docstring).

    Args:
        grid: the tile layout.
        iou_threshold: IoU of the class-aware NMS between whole detections of different tiles.
        edge_margin: pixels from an interior tile edge within which a box counts as touching it.
        cover_ios: share of a box that a kept whole box must cover to absorb it.
        device: where NMS runs (``batched_nms`` on the model's device).

    Use: call :meth:`add` for every tile in row-major order (tiles skipped as nodata with empty
    arrays), and collect :meth:`pop_final` after each call; :meth:`finish` returns the rest.

    Attributes:
        max_held: the most detections held at once (bounded by a few tile rows).
    """

    def __init__(self, grid: TileGrid, *, iou_threshold: float = 0.5, edge_margin: float = 2.0,
                 cover_ios: float = 0.5, device: str | torch.device = "cpu"):
        self.grid = grid
        self.iou_threshold = iou_threshold
        self.edge_margin = edge_margin
        self.cover_ios = cover_ios
        self.device = torch.device(device)
        self.rows: dict[int, list[_Boxes]] = {}  # open rows: the detections of each tile added so far
        self.done: dict[int, int] = {}  # open rows: tiles added
        self.kept: dict[int, _Boxes] = {}  # final rows still overlapping an open row: their kept whole boxes
        self.consumed: dict[int, set[int]] = {}  # per open row: partials already merged into an earlier output
        self.next_final = 0
        self.max_held = 0

    # ------------------------------------------------------------------ input

    def add(self, r: int, c: int, boxes, scores, labels) -> None:
        """Add tile ``(r, c)``'s detections: ``boxes [N, 4]`` xyxy in the tile's own pixel frame,
        ``scores [N]``, ``labels [N]`` (tensors or arrays, any device)."""
        g, m, dev = self.grid, self.edge_margin, self.device
        boxes = _as_tensor(boxes, torch.float32, dev).reshape(-1, 4)
        interior = torch.tensor(g.interior_edges(r, c), dtype=torch.bool, device=dev)  # left, top, right, bottom
        edges = torch.stack([boxes[:, 0] <= m, boxes[:, 1] <= m, boxes[:, 2] >= g.tile - m,
                             boxes[:, 3] >= g.tile - m], dim=1) & interior  # [N, 4]
        x0, y0 = g.xs[c], g.ys[r]
        frame = boxes + torch.tensor([x0, y0, x0, y0], dtype=torch.float32, device=dev)  # [N, 4]
        cx, cy = (frame[:, 0] + frame[:, 2]) / 2, (frame[:, 1] + frame[:, 3]) / 2
        k0, k1, k2, k3 = g.core(r, c)
        core = (cx >= k0) & (cx < k2) & (cy >= k1) & (cy < k3)
        if len(boxes):
            self.rows.setdefault(r, []).append(_Boxes(
                frame, _as_tensor(scores, torch.float32, dev).reshape(-1),
                _as_tensor(labels, torch.int64, dev).reshape(-1), core, edges,
                torch.tensor([[r, c]], dtype=torch.int64, device=dev).expand(len(boxes), 2)))
        self.done[r] = self.done.get(r, 0) + 1
        held = sum(len(b) for parts in self.rows.values() for b in parts) + sum(len(k) for k in self.kept.values())
        self.max_held = max(self.max_held, held)

    # ------------------------------------------------------------------ output

    def pop_final(self) -> Detections:
        """Detections of the rows that became final since the last call (detection frame)."""
        out = []
        while self.next_final < len(self.grid.ys):
            r = self.next_final
            later = [k for k in self.grid.overlapping_rows(r) if k > r]
            if not all(self._complete(k) for k in [r] + later):
                break
            out.append(self._finalize(r))
            self.next_final += 1
            self._prune()
        return Detections.cat(out)

    def finish(self) -> Detections:
        """Everything not yet returned (call after the last tile).

        Raises:
            RuntimeError: tiles are missing.
        """
        out = self.pop_final()
        if self.next_final < len(self.grid.ys):
            raise RuntimeError(f"tiles missing: rows {self.next_final}.. are incomplete")
        return out

    # ------------------------------------------------------------------ steps

    def _complete(self, r: int) -> bool:
        return self.done.get(r, 0) == len(self.grid.xs)

    def _row(self, r: int) -> _Boxes:
        return _Boxes.cat(self.rows.get(r, []), self.device)

    def _prune(self) -> None:
        """Forget what no open row needs: the tiles of final rows (they live on through their kept
        boxes), and the kept boxes of rows that no open row overlaps."""
        first_open = self.next_final
        needed = set(range(first_open, len(self.grid.ys)))
        if first_open < len(self.grid.ys):
            needed.update(self.grid.overlapping_rows(first_open))  # the first open row overlaps the most
        for store in (self.rows, self.done, self.consumed):
            for k in [k for k in store if k < first_open]:
                store.pop(k)
        for k in [k for k in self.kept if k not in needed]:
            self.kept.pop(k)

    def _finalize(self, r: int) -> Detections:
        """The final detections of row ``r``: its kept whole boxes, then its merged partial pieces."""
        before = [k for k in self.grid.overlapping_rows(r) if k < r]
        after = [k for k in self.grid.overlapping_rows(r) if k > r]
        rows = {k: self._row(k) for k in [r] + after}
        kept_r, covers = self._whole(r, before, after, rows)
        self.kept[r] = kept_r
        merged = self._partials(r, after, rows, covers)
        return Detections.cat([kept_r.to_detections(), merged])

    def _whole(self, r: int, before: list[int], after: list[int], rows: dict[int, _Boxes]
               ) -> tuple[_Boxes, _Boxes]:
        """Priority NMS of the whole detections (step 2).

        Returns:
            ``(kept_r, covers)``: the kept whole detections of row ``r``, and every kept whole
            detection around it (final rows, row ``r``, later rows) that may cover a partial one.
        """
        dev = self.device
        final = _Boxes.cat([self.kept[k] for k in before if k in self.kept and len(self.kept[k])], dev)
        whole = {k: rows[k][~rows[k].partial] for k in [r] + after}
        cand = _Boxes.cat([final] + [whole[k] for k in [r] + after], dev)
        priority = torch.cat([torch.full((len(final),), FINAL, device=dev)]
                             + [torch.where(whole[k].core, CORE, OFF_CORE).to(dev) for k in [r] + after])
        source = torch.cat([torch.full((len(final),), -1, device=dev)]
                           + [torch.full((len(whole[k]),), k, device=dev) for k in [r] + after])
        keep = torch.zeros(len(cand), dtype=torch.bool, device=dev)
        rank = priority * 2.0 + cand.scores
        if len(cand):
            keep[batched_nms(cand.boxes, rank, cand.labels, self.iou_threshold)] = True
        best = self._absorb_suppressed(cand, keep, rank)
        # an off-core detection of row r covered by a kept core detection is the cut (or shifted) view
        # of an object whose owning tile sees it whole
        off = torch.nonzero(keep & ~cand.core & (source == r)).flatten()
        if len(off):
            core_idx = torch.nonzero(keep & cand.core).flatten()
            cover = self._covering(_Pieces.of(cand[off]), _Pieces.of(cand[core_idx]))
            gone = torch.as_tensor(cover >= 0, device=dev)
            keep[off[gone]] = False
            target = core_idx[torch.as_tensor(cover[cover >= 0], device=dev)]
            best.scatter_reduce_(0, target, best[off[gone]], reduce="amax")
        cand.scores = best
        return cand[keep & (source == r)], cand[keep]

    def _absorb_suppressed(self, cand: _Boxes, keep: Tensor, rank: Tensor) -> Tensor:
        """Scores ``[N]`` of the candidates, where each kept box takes the best score of those it suppressed.

        Greedy NMS suppresses a box by the best-ranked kept box of its class with IoU > ``iou_threshold``.
        """
        best = cand.scores.clone()
        sup = torch.nonzero(~keep).flatten().cpu().numpy()
        kept = torch.nonzero(keep).flatten().cpu().numpy()
        boxes, labels, rk = cand.boxes.cpu(), cand.labels.cpu().numpy(), rank.cpu().numpy()
        i, j = intersecting_pairs(boxes[sup].numpy(), boxes[kept].numpy())
        si, kj = sup[i], kept[j]
        hit = (pair_iou(boxes[si], boxes[kj]).numpy() > self.iou_threshold) & (labels[si] == labels[kj])
        si, kj = si[hit], kj[hit]
        order = np.argsort(-rk[kj], kind="stable")  # the best-ranked suppressor of each box first
        si, kj = si[order], kj[order]
        _, first = np.unique(si, return_index=True)
        if len(first):
            target = torch.as_tensor(kj[first], device=best.device)
            best.scatter_reduce_(0, target, cand.scores[torch.as_tensor(si[first], device=best.device)],
                                 reduce="amax")
        return best

    def _covering(self, pieces: _Pieces, covers: _Pieces) -> np.ndarray:
        """For each piece, the index of the box of ``covers`` of the same class that covers the most of it
        (intersection over the piece's area >= ``cover_ios``), or -1."""
        out = np.full(len(pieces.boxes), -1, dtype=np.int64)
        i, j = intersecting_pairs(pieces.boxes, covers.boxes)
        if len(i):
            ioa = box_ioa(torch.as_tensor(pieces.boxes[i]), torch.as_tensor(covers.boxes[j])).numpy()
            hit = (pieces.labels[i] == covers.labels[j]) & (ioa >= self.cover_ios)
            i, j, ioa = i[hit], j[hit], ioa[hit]
            order = np.lexsort((-ioa, i))  # per piece, the largest share first
            i, j = i[order], j[order]
            first = np.r_[True, i[1:] != i[:-1]] if len(i) else np.zeros(0, bool)
            out[i[first]] = j[first]
        return out

    def _uncovered(self, pieces: _Pieces, covers: _Pieces) -> np.ndarray:
        """Mask ``[N]`` of the pieces that no box of ``covers`` of the same class covers by ``cover_ios``."""
        return self._covering(pieces, covers) < 0

    def _partials(self, r: int, after: list[int], rows: dict[int, _Boxes], covers: _Boxes) -> Detections:
        """Step 3: drop covered partials; union the rest of row ``r`` with their pieces in later rows."""
        cov = _Pieces.of(covers)
        mine = _Pieces.of(rows[r][rows[r].partial])
        alive = self._uncovered(mine, cov)
        alive[list(self.consumed.get(r, ()))] = False  # already merged into an earlier row's output
        mine = mine[alive]
        if len(mine.boxes) == 0:
            return Detections()
        later = []
        for k in after:
            theirs = _Pieces.of(rows[k][rows[k].partial])
            theirs.owner = [(k, i) for i in range(len(theirs.boxes))]
            ok = self._uncovered(theirs, cov)
            ok[list(self.consumed.get(k, ()))] = False
            later.append(theirs[ok])
        out, used = self._union_pieces(mine, _Pieces.cat(later))
        for k, i in used:
            self.consumed.setdefault(k, set()).add(i)
        return out

    @staticmethod
    def _union_pieces(mine: _Pieces, later: _Pieces) -> tuple[Detections, list[tuple[int, int]]]:
        """Union boxes of the pieces of one object: ``mine`` (row r) plus ``later`` (rows across the seam).

        Pieces are linked across one seam only (module docstring, step 3); each linked group holding a
        piece of row r becomes one box scored by its best piece. Returns the boxes and the ``owner`` of
        each later piece used.
        """
        allp = _Pieces.cat([mine, later])
        b, n_mine = allp.boxes, len(mine.boxes)
        i, j = intersecting_pairs(b, b)
        (ri, ci), (rj, cj) = allp.tile[i].T, allp.tile[j].T
        same = allp.labels[i] == allp.labels[j]
        # i left of j across a vertical seam (same tile row): compare extents along the seam (y)
        across_v = (ri == rj) & (cj == ci + 1) & allp.edges[i, 2] & allp.edges[j, 0] & \
            (_extent_iou(b[i, 1], b[i, 3], b[j, 1], b[j, 3]) >= 0.5)
        # i above j across a horizontal seam (same tile column): compare extents along the seam (x)
        across_h = (ci == cj) & (rj > ri) & allp.edges[i, 3] & allp.edges[j, 1] & \
            (_extent_iou(b[i, 0], b[i, 2], b[j, 0], b[j, 2]) >= 0.5)
        # the same piece seen by two tiles (e.g. tile rows overlapping along a vertical seam)
        twice = ((ri != rj) | (ci != cj)) & (pair_iou(torch.as_tensor(b[i]), torch.as_tensor(b[j])).numpy() >= 0.5)
        link = same & (across_v | across_h | twice)
        groups: dict[int, list[int]] = {}
        for k, g in enumerate(connected_components(len(b), i[link], j[link]).tolist()):
            groups.setdefault(g, []).append(k)
        out_b, out_s, out_l, used = [], [], [], []
        for members in groups.values():
            if not any(m < n_mine for m in members):
                continue  # only later pieces: they are handled when their row is final
            g = b[members]
            out_b.append([g[:, 0].min(), g[:, 1].min(), g[:, 2].max(), g[:, 3].max()])
            out_s.append(allp.scores[members].max())
            out_l.append(allp.labels[members[0]])
            used.extend(later.owner[m - n_mine] for m in members if m >= n_mine)
        return Detections(np.array(out_b, dtype=np.float64).reshape(-1, 4), np.array(out_s, dtype=np.float64),
                          np.array(out_l, dtype=np.int64)), used
