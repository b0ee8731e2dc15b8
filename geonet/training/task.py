"""The LightningModule that trains a :class:`geonet.model.GeoRetinaNet` (in the manner of torchgeo's tasks).

:class:`DetectionTask` builds the detector from its hyperparameters (``save_hyperparameters``, so
Lightning's ``last.ckpt`` records them), computes the loss, scores the validation split with
pycocotools and sets up the optimiser and schedule.

**Operating point.** Validation detections are kept at the loosest NMS IoU of :data:`NMS_CANDIDATES`,
then suppressed again at each candidate; the NMS IoU whose operating point (the score that maximises
F1 at IoU 0.5) has the highest F1 is chosen (ties go to the lower IoU: fewer stacked boxes) among those whose
kept detections hold no more near-duplicate pairs (same class, IoU > 0.3) than the validation truth, and its
AP, AP50, AP75 and per-class AP50 are the epoch's metrics. ``metrics["operating_point"]`` records the
score threshold and the NMS IoU; ``geonet detect`` uses both by default, the NMS IoU inside tiles and
across tile seams alike (both decide whether two boxes are one object).

**Schedule.** Linear warmup from 0.1 % of the learning rate over ``warmup_steps`` (default: 10 % of
the steps, at most 500), then cosine decay to 0, or steps of 0.1 at 2/3 and 8/9 of training (the
paper's 60k and 80k of 90k iterations). SGD with momentum 0.9 and weight decay 1e-4 (the paper),
learning rate 0.01 x global batch / 16; or AdamW with learning rate 1e-4, the default: on 12 synthetic chips
from scratch, 12 steps took the classification loss from 1.129 to 0.577 with AdamW and to 1.120 with
SGD at 0.0025 (batch 4); AdamW at 1e-3 made it explode to ~1000 at the third step.
"""

from __future__ import annotations

import math
import warnings

import torch
from torchvision.ops import batched_nms

from geonet.boxes import STACK_IOU, near_duplicate_pairs, xywh_to_xyxy
from geonet.errors import RunError
from geonet.metrics import coco_detections, coco_metrics, operating_point
from geonet.model import ModelConfig, build_model
from geonet.training.config import OptimConfig

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    import lightning.pytorch as pl

__all__ = ["DetectionTask", "NonFiniteLoss", "lr_factor", "NMS_CANDIDATES", "choose_operating_point"]

#: NMS IoUs tried on the validation set (module docstring).
NMS_CANDIDATES = (0.3, 0.4, 0.5, 0.6)


class NonFiniteLoss(RunError):
    """The loss became NaN or infinite."""


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (module docstring)."""
    if step < warmup:
        return 0.001 + (1 - 0.001) * step / max(1, warmup)
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 0.1 ** sum(step >= int(total * m) for m in (2 / 3, 8 / 9))


class DetectionTask(pl.LightningModule):
    """Loss, validation AP and optimisation of a RetinaNet.

    Args:
        model_config: :meth:`geonet.model.ModelConfig.to_dict` of the detector.
        weights: initial weights (:func:`geonet.model.build_model`); ``"none"`` when resuming.
        optim: :class:`geonet.training.config.OptimConfig` as a dict.
        steps_per_epoch: optimiser steps per epoch (the schedule's length is ``epochs`` times this).
        classes: class names (``classes[i]`` has id ``i + 1``).
        val_gt: COCO ground truth of the validation split (:func:`geonet.training.data.gt_coco`), or ``None``.
        channels_last: lay the model and its input batches out NHWC (``geonet.training.train`` does, on CUDA and
            on the CPU: measured 1.08x images/s training MobileNetV2 at 512 px in bf16 on the 2-core CPU).

    Attributes:
        last_metrics: the metrics of the latest validation (``{}`` before the first), with
            ``operating_point`` when the validation had a true positive.
    """

    def __init__(self, model_config: dict, *, weights: str = "none", optim: dict | None = None,
                 steps_per_epoch: int = 1, classes: list[str] | None = None, val_gt: dict | None = None,
                 channels_last: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["val_gt"])
        self.model_config = ModelConfig.from_dict(model_config)
        self.model = build_model(self.model_config, weights=weights)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.model.transform.channels_last = True
        self.optim = OptimConfig(**(optim or {}))
        self.classes = list(classes or [])
        self.val_gt = val_gt
        self._val_dets: list[dict] = []
        self.last_metrics: dict = {}

    def setup(self, stage: str) -> None:
        """With DDP: every process must have built the same detector (normalisation and fitted anchors are
        computed from the data in each process); raises :class:`RunError` otherwise."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        mine = self.model_config.to_dict()
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        if any(c != everyone[0] for c in everyone):
            raise RunError("the DDP processes built different detectors (normalisation or fitted anchors differ).",
                           fix="give every process the same data and --seed, or pass --anchor-sizes/--anchor-ratios.")

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        images, targets = batch
        nb = device.type == "cuda"
        images = [im.to(device, non_blocking=nb) for im in images]
        targets = [{k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        return images, targets

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.model(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLoss(
                f"the loss became {float(loss.detach())} at step {self.global_step} (epoch {self.current_epoch}, "
                f"classification {float(losses['classification'].detach()):.4g}, "
                f"box {float(losses['bbox_regression'].detach()):.4g}). "
                "Likely causes: a learning rate too high (--lr), bad boxes, or unnormalised input. The last good "
                f"checkpoint in {self.trainer.default_root_dir} is kept.",
                fix="lower --lr (or add --grad-clip 10) and --resume.")
        bs = len(images)
        # sync_dist: with DDP the logged losses are the mean over processes (a no-op in one process)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("train/cls", losses["classification"], on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log("train/box", losses["bbox_regression"], on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss

    def on_validation_epoch_start(self):
        self._val_dets = []
        self._nms_train = self.model.nms_thresh
        self.model.nms_thresh = max(NMS_CANDIDATES)

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        for t, o in zip(targets, self.model(images)):
            self._val_dets.append((int(t["image_id"]), o["boxes"].float().cpu(), o["scores"].float().cpu(),
                                   o["labels"].cpu()))

    def on_validation_epoch_end(self):
        self.model.nms_thresh = self._nms_train
        dets = self._val_dets
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, dets)
            dets = list({d[0]: d for part in gathered for d in part}.values())  # padded repeats scored once
        m = choose_operating_point(self.val_gt, dets, len(self.classes))
        self.last_metrics = m
        self.log("val/AP", m["AP"], prog_bar=True, sync_dist=False)
        self.log("val/AP50", m["AP50"], prog_bar=True, sync_dist=False)
        self.log("val/AP75", m["AP75"], sync_dist=False)
        if len(self.classes) > 1:
            for name, pc in m["per_class"].items():
                self.log(f"val/AP50_{name}", pc["AP50"], sync_dist=False)

    def configure_optimizers(self):
        o = self.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = o.learning_rate(self.trainer.world_size)
        if o.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
        total = max(1, o.epochs * self.hparams.steps_per_epoch)
        warmup = o.warmup_steps if o.warmup_steps is not None else min(500, max(1, total // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, warmup=warmup, total=total, schedule=o.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def choose_operating_point(gt: dict, dets: list, n_classes: int) -> dict:
    """Validation metrics at the NMS IoU of :data:`NMS_CANDIDATES` with the best operating point (module docstring).

    A candidate qualifies only if its detections at their operating point hold no more near-duplicate pairs
    (same class, IoU > :data:`geonet.boxes.STACK_IOU`, :func:`geonet.boxes.near_duplicate_pairs`, summed
    over the validation images) than the validation truth does: a looser NMS that wins F1 by keeping two
    boxes on one object is not chosen. The smallest candidate (0.3) always qualifies: its NMS leaves no such pair.

    Args:
        gt: COCO ground truth of the validation split.
        dets: ``[(image_id, boxes FloatTensor[N, 4] xyxy, scores [N], labels [N]), ...]`` kept at the loosest
            candidate IoU.
        n_classes: K; detections of other labels are dropped.

    Returns:
        :func:`geonet.metrics.coco_metrics` keys (without ``precision``) plus ``operating_point``
        ``{"iou", "score_thresh", "precision", "recall", "f1", "nms_iou", "pairs", "truth_pairs"}`` when some
        detection matched (``pairs``: the near-duplicate pairs of the kept detections at ``score_thresh``).
    """
    truth_pairs = _truth_pairs(gt)
    best = None
    for nms_iou in NMS_CANDIDATES:
        coco, kept = [], []
        for image_id, boxes, scores, labels in dets:
            keep = batched_nms(boxes, scores, labels, nms_iou) if len(boxes) else torch.zeros(0, dtype=torch.int64)
            ok = keep[(labels[keep] >= 1) & (labels[keep] <= n_classes)]
            coco += coco_detections(image_id, boxes[ok].numpy(), labels[ok].numpy(), scores[ok].numpy())
            kept.append((boxes[ok], scores[ok], labels[ok]))
        m = coco_metrics(gt, coco, keep_eval=True)
        m.pop("precision", None)
        op = operating_point(m.pop("_eval"), 0.5)
        pairs = 0
        if op["tp"] > 0:  # the score that maximises F1 at IoU 0.5: detection's default threshold
            pairs = sum(near_duplicate_pairs(b[s >= op["score_thresh"]], lab[s >= op["score_thresh"]], STACK_IOU)
                        for b, s, lab in kept)
            m["operating_point"] = {**{k: op[k] for k in ("iou", "score_thresh", "precision", "recall", "f1")},
                                    "nms_iou": nms_iou, "pairs": pairs, "truth_pairs": truth_pairs}
        f1 = op["f1"] if op["tp"] > 0 else -1.0
        if best is not None and pairs > truth_pairs:
            continue  # stacks boxes that the truth does not: never chosen over a candidate that does not
        if best is None or f1 > best[0] + 1e-9:
            best = (f1, m)
    return best[1]


def _truth_pairs(gt: dict) -> int:
    """Near-duplicate pairs (:data:`geonet.boxes.STACK_IOU`) of the non-ignore truth boxes, per image, summed."""
    by_image: dict = {}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            by_image.setdefault(a["image_id"], []).append(a)
    return sum(near_duplicate_pairs(xywh_to_xyxy([a["bbox"] for a in anns]), [a["category_id"] for a in anns],
                                    STACK_IOU) for anns in by_image.values())
