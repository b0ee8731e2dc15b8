"""Box helpers that torchvision does not have, and numpy wrappers of the ones it has.

Boxes are ``[x1, y1, x2, y2]`` (``xyxy``) in one planar frame (pixels, or metres in a metric CRS);
COCO ``bbox`` fields are ``[x, y, w, h]`` (``xywh``). Conversions go through
``torchvision.ops.box_convert`` and IoU through ``torchvision.ops.box_iou``; only intersection over the
area of the first box (used for ignore regions and for covered partial boxes) is written here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert

__all__ = ["xywh_to_xyxy", "xyxy_to_xywh", "box_ioa", "pair_iou", "intersecting_pairs", "connected_components",
           "near_duplicate_pairs", "STACK_IOU"]


def xywh_to_xyxy(boxes) -> np.ndarray:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``: float64 ``[N, 4]`` (any array-like of N x 4)."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    return box_convert(b, "xywh", "xyxy").numpy()


def xyxy_to_xywh(boxes) -> np.ndarray:
    """``[x1, y1, x2, y2]`` -> COCO ``[x, y, w, h]``: float64 ``[N, 4]``."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    return box_convert(b, "xyxy", "xywh").numpy()


def _area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_ioa(a: Tensor, b: Tensor) -> Tensor:
    """Intersection of ``a`` and ``b`` over the area of ``a`` (``[..., 4]`` xyxy each, broadcast).

    ``box_ioa(a[:, None], b[None])`` gives the ``[N, M]`` matrix; ``box_ioa(a, b)`` with ``[N, 4]`` each
    gives the ``[N]`` values of aligned pairs. A box of ``a`` with zero area gets 0.
    """
    return _intersection(a, b) / _area(a).clamp(min=1e-9)


def pair_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of aligned pairs (``[..., 4]`` xyxy each, broadcast): ``[N]`` for ``[N, 4]`` inputs, where
    ``torchvision.ops.box_iou`` would build the whole ``[N, N]`` matrix."""
    inter = _intersection(a, b)
    return inter / (_area(a) + _area(b) - inter).clamp(min=1e-9)


def intersecting_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` of boxes ``a[i]`` and ``b[j]`` (``[N, 4]``, ``[M, 4]`` xyxy) that intersect or
    touch, found with a shapely STR-tree (no ``N x M`` matrix); sorted by ``i``, then ``j``."""
    import shapely

    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j = shapely.STRtree(shapely.box(*b.T)).query(shapely.box(*a.T), predicate="intersects")
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64)


#: IoU above which two same-class boxes count as stacked on one object (issue 10: the output may hold no more
#: near-duplicate pairs, IoU > 0.3 and same class, than the truth does).
STACK_IOU = 0.3


def near_duplicate_pairs(boxes, labels=None, iou: float = STACK_IOU) -> int:
    """Number of same-class box pairs whose IoU exceeds ``iou``: boxes stacked on one object.

    Args:
        boxes: ``[N, 4]`` xyxy (any frame, pixels or CRS units; array or tensor).
        labels: ``[N]`` class ids (``None``: one class).
        iou: the IoU above which two boxes count as a pair.

    Returns:
        The count of unordered pairs ``i < j`` (found with :func:`intersecting_pairs`, no ``N x N`` matrix).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    i, j = intersecting_pairs(b, b)
    keep = i < j
    if labels is not None:
        lab = np.asarray(labels).reshape(-1)
        keep &= lab[i] == lab[j]
    i, j = i[keep], j[keep]
    if len(i) == 0:
        return 0
    t = torch.from_numpy(b)
    return int((pair_iou(t[i], t[j]) > iou).sum())


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label ``[n]`` of each of ``n`` nodes linked by edges ``(i[k], j[k])`` (scipy's csgraph).

    Used to group overlapping boxes (split blocks, partial detections, evaluation images).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc

    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (np.asarray(i), np.asarray(j))), shape=(n, n))
    return cc(graph, directed=False)[1]
