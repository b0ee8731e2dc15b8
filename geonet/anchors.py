"""Anchor coverage and fitting to the label boxes.

**Coverage** is the share of training boxes whose best anchor has IoU >= ``fg_iou`` (0.5): the boxes
the matcher can assign as positives without its low-quality fallback. It is computed exactly for
torchvision's anchor layout: at pyramid level ``l`` (stride ``s = 2^(l+3)``), the anchors of every
shape are centred at ``(i * s, j * s)`` for grid cells ``i, j`` (torchvision's AnchorGenerator
places centres at multiples of the stride, with base anchors rounded to whole pixels). For a box
and an anchor shape, the best centre is the grid point nearest the box centre, because IoU between
two axis-aligned boxes of fixed shapes falls as their centres move apart. So each box needs one IoU
per anchor shape (5 levels x scales x ratios) instead of one per anchor.

**Fitting** searches the base size of P3 (sizes double per level, as in the paper) and the aspect
ratios (the default ``0.5, 1, 2``, or the 10th/50th/90th percentiles of the boxes' height/width),
keeping octave scales; it returns the configuration with the highest coverage (mean best IoU breaks
ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geonet.model import ModelConfig, anchor_generator

__all__ = ["AnchorFit", "anchor_coverage", "anchor_report", "best_anchor_iou", "fit_anchors", "STRIDES"]

#: Strides of P3..P7.
STRIDES = (8, 16, 32, 64, 128)


def _shapes(cfg: ModelConfig) -> list[np.ndarray]:
    """Per level, the ``[S, 4]`` base anchors (centred at 0, rounded as torchvision rounds them)."""
    gen = anchor_generator(cfg)
    return [a.numpy().astype(np.float64) for a in gen.cell_anchors]


def best_anchor_iou(boxes: np.ndarray, cfg: ModelConfig, image_size: tuple[int, int]) -> np.ndarray:
    """Best IoU of each box with any anchor of ``cfg`` in an image of ``image_size`` ``(H, W)``.

    Args:
        boxes: ``[N, 4]`` ``[x1, y1, x2, y2]`` pixel boxes in their chip's frame.

    Returns:
        float64 ``[N]``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0)
    h, w = image_size
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best = np.zeros(len(boxes))
    for stride, base in zip(STRIDES, _shapes(cfg)):
        gw, gh = -(-w // stride), -(-h // stride)  # feature map size (ceil)
        ax = np.clip(np.round(cx / stride), 0, gw - 1) * stride  # [N] nearest centre
        ay = np.clip(np.round(cy / stride), 0, gh - 1) * stride
        a = base[None, :, :] + np.stack([ax, ay, ax, ay], axis=1)[:, None, :]  # [N, S, 4]
        ix = np.clip(np.minimum(a[..., 2], boxes[:, None, 2]) - np.maximum(a[..., 0], boxes[:, None, 0]), 0, None)
        iy = np.clip(np.minimum(a[..., 3], boxes[:, None, 3]) - np.maximum(a[..., 1], boxes[:, None, 1]), 0, None)
        inter = ix * iy  # [N, S]
        area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
        iou = inter / (area_a + area_b[:, None] - inter)
        best = np.maximum(best, iou.max(axis=1))
    return best


def anchor_coverage(boxes: np.ndarray, cfg: ModelConfig, image_size: tuple[int, int]) -> tuple[float, float]:
    """``(coverage, mean best IoU)`` of ``boxes`` (``[N, 4]``, chip frame) under ``cfg`` (module docstring)."""
    iou = best_anchor_iou(boxes, cfg, image_size)
    if len(iou) == 0:
        return 0.0, 0.0
    return float((iou >= cfg.fg_iou).mean()), float(iou.mean())


@dataclass
class AnchorFit:
    """Result of :func:`fit_anchors`: the default and the fitted configuration with their coverage."""

    default_sizes: tuple[float, ...]
    default_ratios: tuple[float, ...]
    default_coverage: float
    default_mean_iou: float
    sizes: tuple[float, ...]
    ratios: tuple[float, ...]
    scales: tuple[float, ...]
    coverage: float
    mean_iou: float
    n_boxes: int

    def as_flags(self) -> str:
        return (f"--anchor-sizes {','.join(f'{s:g}' for s in self.sizes)} "
                f"--anchor-ratios {','.join(f'{r:g}' for r in self.ratios)}")


def fit_anchors(boxes: np.ndarray, image_size: tuple[int, int], *, base: ModelConfig | None = None,
                max_boxes: int = 5000, seed: int = 0) -> AnchorFit:
    """Fit anchor sizes and ratios to training boxes (module docstring).

    Args:
        boxes: ``[N, 4]`` training boxes in their chips' frame.
        image_size: chip ``(H, W)``.
        base: configuration to start from (scales and IoUs are kept); default :class:`ModelConfig`.
        max_boxes: boxes sampled (seeded) when there are more.

    Returns:
        An :class:`AnchorFit`.
    """
    base = base or ModelConfig()
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) > max_boxes:
        boxes = boxes[np.random.default_rng(seed).choice(len(boxes), max_boxes, replace=False)]
    cov0, miou0 = anchor_coverage(boxes, base, image_size)
    wh = np.column_stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    ar = wh[:, 1] / np.maximum(wh[:, 0], 1e-6)
    q = np.percentile(ar, [10, 50, 90]) if len(ar) else np.array([0.5, 1, 2])
    ratio_sets = [tuple(base.anchor_ratios), tuple(float(f"{v:.2g}") for v in q)]
    side = np.sqrt(wh[:, 0] * wh[:, 1]) if len(wh) else np.array([32.0])
    lo = max(4.0, float(np.percentile(side, 1)) * 0.8)
    candidates = sorted({round(v) for v in np.geomspace(lo, max(lo * 1.01, 64.0), 12)} | {32})
    best = (cov0, miou0, tuple(base.anchor_sizes), tuple(base.anchor_ratios))
    for ratios in ratio_sets:
        if len(set(ratios)) < len(ratios):
            continue
        for s0 in candidates:
            sizes = tuple(float(s0 * 2 ** k) for k in range(5))
            cfg = ModelConfig(**{**base.to_dict(), "anchor_sizes": sizes, "anchor_ratios": ratios})
            cov, miou = anchor_coverage(boxes, cfg, image_size)
            if (cov, miou) > best[:2]:
                best = (cov, miou, sizes, ratios)
    return AnchorFit(default_sizes=tuple(base.anchor_sizes), default_ratios=tuple(base.anchor_ratios),
                     default_coverage=cov0, default_mean_iou=miou0, sizes=best[2], ratios=best[3],
                     scales=tuple(base.anchor_scales), coverage=best[0], mean_iou=best[1], n_boxes=len(boxes))


def anchor_report(imagery: Sequence[str], labels: str, *, size: int | None = None, layer: str | None = None,
                  class_field: str | None = None, bands=None, nodata=None, point_size: float | None = None
                  ) -> tuple[AnchorFit, int]:
    """Anchor coverage of the boxes of ``size`` px training windows, default vs fitted (``geonet anchors``).

    ``size`` defaults to :class:`geonet.chip.ChipConfig`'s.

    Returns:
        ``(fit, n_windows)``.

    Raises:
        InputError: bad inputs (see :func:`geonet.chip.plan_chips`).
    """
    from geonet.chip import ChipConfig, plan_chips
    from geonet.labels import LabelIndex, read_labels
    from geonet.raster import describe_raster, find_rasters

    infos = [describe_raster(p, bands=bands, nodata=nodata) for p in find_rasters(imagery)]
    lab = read_labels(labels, layer=layer, class_field=class_field)
    config = ChipConfig(size=size, negative_ratio=0, point_size=point_size)
    plan = plan_chips(infos, LabelIndex(lab, point_size=config.point_size), config)
    boxes = np.concatenate([s.labels.boxes for s in plan.specs]) if plan.specs else np.zeros((0, 4))
    return fit_anchors(boxes, (plan.size, plan.size)), len(plan.specs)
