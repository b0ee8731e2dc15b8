import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from geonet.merge import SeamMerger
from geonet.tiling import TileGrid
from seams import count_errors, oracle_tiles, seam_objects, stream_merge


def _plain_nms(grid, tiles, iou=0.5):
    b, s, l = [], [], []
    for (r, c), (bb, ss, ll) in tiles.items():
        b.append(bb + np.array([grid.xs[c], grid.ys[r], grid.xs[c], grid.ys[r]]))
        s.append(ss)
        l.append(ll)
    b, s, l = np.concatenate(b), np.concatenate(s), np.concatenate(l)
    keep = batched_nms(torch.as_tensor(b), torch.as_tensor(s), torch.as_tensor(l), iou).numpy()
    return b[keep]


def test_core_partition():
    g = TileGrid.build(1000, 700, 256, 64)
    xs = np.linspace(0, 999, 97)
    ys = np.linspace(0, 699, 71)
    for x in xs:
        for y in ys:
            n = sum(1 for r in range(len(g.ys)) for c in range(len(g.xs))
                    if (lambda k: k[0] <= x < k[2] and k[1] <= y < k[3])(g.core(r, c)))
            assert n == 1


@pytest.mark.parametrize("overlap", [48, 64, 96, 128])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seams_zero_duplicates_zero_truncated(overlap, seed):
    rng = np.random.default_rng(seed)
    grid = TileGrid.build(1100, 900, 256, overlap)
    objects = seam_objects(grid, rng, size=(10, min(40, overlap - 4)))
    assert len(objects) > 60
    tiles = oracle_tiles(grid, objects, rng)
    boxes, m = stream_merge(grid, tiles)
    dup, trunc, missed = count_errors(objects, boxes)
    assert (dup, trunc, missed) == (0, 0, 0)
    # plain NMS on the same tile detections leaves duplicates or half boxes
    pd, pt, _ = count_errors(objects, _plain_nms(grid, tiles))
    assert pd + pt > 0


def test_jittered_boxes_still_merge():
    rng = np.random.default_rng(5)
    grid = TileGrid.build(900, 900, 256, 64)
    objects = seam_objects(grid, rng, size=(12, 50))
    tiles = oracle_tiles(grid, objects, rng, jitter=1.0)
    boxes, _ = stream_merge(grid, tiles)
    dup, trunc, missed = count_errors(objects, boxes, tol=4.0)  # 4 sigma of the jitter
    assert (dup, trunc, missed) == (0, 0, 0)


@pytest.mark.parametrize("overlap", [64, 96])
def test_cut_boxes_stopping_short_of_the_edge(overlap):
    rng = np.random.default_rng(11)
    grid = TileGrid.build(1000, 800, 256, overlap)
    objects = seam_objects(grid, rng, size=(12, overlap - 8))
    tiles = oracle_tiles(grid, objects, rng, shortfall=8.0)
    boxes, _ = stream_merge(grid, tiles)
    assert count_errors(objects, boxes) == (0, 0, 0)


def test_objects_larger_than_overlap_are_unioned():
    grid = TileGrid.build(600, 300, 256, 32)
    obj = np.array([[200.0, 100.0, 300.0, 160.0]])  # 100 px wide, overlap 32: no tile sees it whole
    rng = np.random.default_rng(0)
    boxes, _ = stream_merge(grid, oracle_tiles(grid, obj, rng))
    assert len(boxes) == 1 and np.allclose(boxes[0], obj[0])


def test_memory_is_bounded_by_rows():
    rng = np.random.default_rng(0)
    grid = TileGrid.build(600, 6000, 256, 64)  # 27 tile rows
    objects = seam_objects(grid, rng, size=(10, 40))
    tiles = oracle_tiles(grid, objects, rng)
    boxes, m = stream_merge(grid, tiles)
    per_row = len(objects) * 3 / len(grid.ys) * 4  # generous: detections of ~3 rows
    assert m.max_held < max(per_row, 200) and m.max_held < len(objects)
    assert count_errors(objects, boxes)[:2] == (0, 0)


def test_class_aware():
    grid = TileGrid.build(256, 256, 256, 0)
    b = np.array([[10.0, 10, 50, 50], [11, 11, 51, 51]])
    boxes, _ = stream_merge(grid, {(0, 0): (b, np.array([0.9, 0.8]), np.array([1, 2]))})
    assert len(boxes) == 2


def test_two_adjacent_objects_cut_by_one_edge_stay_two():
    """Two touching objects, both wider than the overlap, cut by the same seam: two boxes, never one."""
    grid = TileGrid.build(500, 256, 256, 32)  # tiles at x 0 and 244; overlap 12 px... (shifted inward)
    objs = np.array([[180.0, 100.0, 320.0, 140.0], [180.0, 140.0, 320.0, 180.0]])  # A on top of B, touching
    boxes, _ = stream_merge(grid, oracle_tiles(grid, objs, np.random.default_rng(0)))
    assert len(boxes) == 2
    assert sorted(map(tuple, np.round(boxes, 3))) == sorted(map(tuple, objs))


def test_kept_box_carries_the_best_score_of_its_object():
    """The core tile's weak view is kept (core preference), but with the strong view's score."""
    grid = TileGrid.build(400, 256, 256, 112)  # tiles at x 0 and 144; cores split at x 200
    obj = np.array([150.0, 100.0, 190.0, 140.0])  # centre x 170: tile 0's core; both tiles see it whole
    tiles = {(0, 0): (obj[None], np.array([0.06]), np.array([1])),
             (0, 1): ((obj - [144, 0, 144, 0])[None], np.array([0.90]), np.array([1]))}
    m = SeamMerger(grid)
    for rc in ((0, 0), (0, 1)):
        m.add(*rc, *tiles[rc])
    out = m.finish()
    assert len(out) == 1 and np.allclose(out.boxes[0], obj) and out.scores[0] == pytest.approx(0.90)


def test_off_core_view_covered_by_the_core_view_passes_its_score():
    """A cut view stopping short of the edge (off-core, covered) is dropped; its score moves to the kept box."""
    grid = TileGrid.build(400, 256, 256, 112)
    obj = np.array([150.0, 100.0, 196.0, 140.0])  # centre x 173: tile 0's core
    cut = np.array([0.0 + 8, 100.0, 52.0, 140.0])  # tile 1's view, starting 8 px in from the left edge (off-core)
    tiles = {(0, 0): (obj[None], np.array([0.3]), np.array([1])),
             (0, 1): (cut[None], np.array([0.8]), np.array([1]))}
    m = SeamMerger(grid, iou_threshold=0.9)  # no NMS between them: only the cover rule acts
    for rc in ((0, 0), (0, 1)):
        m.add(*rc, *tiles[rc])
    out = m.finish()
    assert len(out) == 1 and np.allclose(out.boxes[0], obj) and out.scores[0] == pytest.approx(0.8)
