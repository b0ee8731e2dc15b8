"""A checkpoint ready to detect on batches of tiles: device, precision, thresholds and test-time flips.

The model is loaded from a geonet checkpoint (:mod:`geonet.checkpoint`), put in eval mode on the device, its
frozen batch norms folded into its convolutions (:func:`geonet.model.fold_batch_norm`) and laid out
channels-last; it runs under bf16 autocast on CUDA and on CPUs with native bf16 (:mod:`geonet.device`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.ops import batched_nms

from geonet.checkpoint import file_sha256, load_checkpoint
from geonet.device import autocast_dtype, resolve_device, resolve_precision
from geonet.model import fold_batch_norm

__all__ = ["Detector", "TTA_MERGE_IOU"]

#: NMS IoU of the four flipped views' boxes together (:meth:`Detector._flip_tta`), unless ``nms_iou`` is given: the
#: model's validation-chosen NMS IoU if smaller, else this. Measured on the NEON leave-one-site-out folds (light
#: augmentation; same-class pairs at IoU > 0.3 at the operating point, mean F1): without flips 16 pairs, F1 0.259;
#: flips merged at the model's IoU (0.3-0.4) 78 pairs, F1 0.334; at 0.3 between views only, the model's IoU within
#: a view, 39 pairs, F1 0.333; one NMS at 0.3, 0 pairs, F1 0.338.
TTA_MERGE_IOU = 0.3


class Detector:
    """A checkpoint ready to run on batches of tiles.

    Args:
        path: geonet checkpoint (``best.pt``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (:func:`geonet.device.resolve_device`).
        precision: ``"auto"`` (bf16 autocast on CUDA (fp16 where bf16 is unsupported) and on CPUs with native
            bf16, else fp32; :func:`geonet.device.resolve_precision`), ``"32"``, ``"bf16"``, ``"16"``.
        score_thresh: minimum score of a detection. Default: the checkpoint's operating point (the
            score that maximised F1 at IoU 0.5 on the validation set of the saved epoch), else the
            model's own threshold (0.05). ``score_source`` says which.
        nms_iou: IoU of the NMS inside a tile and across tile seams. Default: the one chosen with the
            operating point on the validation set, else the model's (0.5). With ``tta``, the views' boxes are
            merged at the given ``nms_iou``, else at that default or :data:`TTA_MERGE_IOU`, the smaller.
        tta: test-time flips (4 views per tile: 4x the compute; :meth:`_flip_tta`). On the NEON
            leave-one-site-out folds (light augmentation) they raised mean recall at the operating point from
            0.190 to 0.310 and F1 from 0.259 to 0.338.

    Attributes:
        header: the checkpoint's :class:`geonet.checkpoint.CheckpointHeader`.
        model: the :class:`geonet.model.GeoRetinaNet`, in eval mode on ``device``, its batch norms folded
            into the convolutions (:func:`geonet.model.fold_batch_norm`; for inference, not for training).
        nms_iou: the NMS IoU in use (also the merge's default).
        tta_nms_iou: the IoU at which the flipped views are merged (``None`` without ``tta``).

    Raises:
        InputError: a bad checkpoint, or ``cuda`` without a CUDA device.
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str = "auto", precision: str = "auto",
                 score_thresh: float | None = None, nms_iou: float | None = None, tta: bool = False):
        model, header = load_checkpoint(path)
        self.tta = tta
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.amp_dtype = autocast_dtype(self.precision)
        op = header.operating_point
        if score_thresh is not None:
            model.score_thresh = float(score_thresh)
            self.score_source = "given"
        elif op is not None:
            model.score_thresh = max(float(model.score_thresh), op.score_thresh)
            self.score_source = f"validation max F1 at IoU {op.iou:g}"
        else:
            self.score_source = "model default"
        if nms_iou is not None:
            model.nms_thresh = float(nms_iou)
        elif op is not None and op.nms_iou is not None:
            model.nms_thresh = op.nms_iou
        self.nms_iou = float(model.nms_thresh)
        if not tta:
            self.tta_nms_iou = None
        elif nms_iou is not None:
            self.tta_nms_iou = self.nms_iou  # the user's choice
        else:
            self.tta_nms_iou = min(self.nms_iou, TTA_MERGE_IOU)
        self.model = model.to(self.device).eval()
        # Measured on the 2-core CPU (512 px tiles, batch 2, forward only), ResNet-18 / MobileNetV2 FPN:
        # channels-last 1.22x / 1.35x in bf16 and 1.22x / 1.25x in fp32; folding the frozen norms another
        # 1.08x in bf16 (bf16 activations no longer promoted to fp32 by the norms' fp32 statistics).
        fold_batch_norm(self.model)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.model.transform.channels_last = True
        self.header = header
        self.classes: list[str] = list(header.classes)
        self.in_channels = int(header.model_config.in_channels)
        self.path = str(path)
        self.sha256 = file_sha256(path)
        self.model_id = f"{Path(path).name}@{self.sha256[:12]}"

    def __call__(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detect on ``batch`` ``[B, C, H, W]`` (raw band values, any dtype, on the CPU or the device).

        Returns:
            One dict per tile, on the device: ``boxes`` FloatTensor[N, 4] (xyxy, tile pixels),
            ``scores`` FloatTensor[N], ``labels`` Int64Tensor[N] (1..K).
        """
        x = batch.to(self.device, non_blocking=True)
        if not self.tta:
            return self.model.predict_batch(x, autocast=self.amp_dtype)
        return self._flip_tta(x)

    def _flip_tta(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Test-time flips: the batch as is, flipped left-right, top-bottom and both; the boxes flipped back,
        then one class-aware NMS per tile over the four views' boxes at ``tta_nms_iou`` (the best-scoring view of
        each object)."""
        h, w = x.shape[-2:]
        m = self.model
        views = {(): x, (-1,): x.flip(-1), (-2,): x.flip(-2), (-1, -2): x.flip(-1).flip(-2)}
        per_tile: list[list[dict]] = [[] for _ in range(len(x))]
        for dims, v in views.items():
            for i, o in enumerate(m.predict_batch(v, autocast=self.amp_dtype)):
                b = o["boxes"].clone()
                if -1 in dims:
                    b[:, [0, 2]] = w - o["boxes"][:, [2, 0]]
                if -2 in dims:
                    b[:, [1, 3]] = h - o["boxes"][:, [3, 1]]
                per_tile[i].append({**o, "boxes": b})
        out = []
        for views_i in per_tile:
            b = torch.cat([o["boxes"] for o in views_i])
            s = torch.cat([o["scores"] for o in views_i])
            lab = torch.cat([o["labels"] for o in views_i])
            keep = batched_nms(b, s, lab, self.tta_nms_iou)[: m.detections_per_img]
            out.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
        return out
