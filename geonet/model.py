"""The detector: torchvision's RetinaNet, configured for overhead imagery.

RetinaNet as in Lin et al., "Focal Loss for Dense Object Detection" (ICCV 2017, arXiv:1708.02002):
a ResNet (or MobileNet) + FPN backbone with levels P3-P7 (P6 from C5 by a 3x3 stride-2 conv, P7 from
P6), a classification subnet and a box subnet of four 3x3 conv + ReLU layers each (unshared between
the two), focal loss with alpha = 0.25 and gamma = 2, and the prior pi = 0.01 bias initialisation of
the classification layer. All of it is torchvision's implementation
(:class:`torchvision.models.detection.RetinaNet`); geonet adds only:

* a registry of backbones (:data:`BACKBONES`), including MobileNetV2/V3 with true P3-P5 strides;
* configurable anchors, focal-loss alpha/gamma, matcher IoUs, score threshold, NMS IoU and
  detections per image (:class:`ModelConfig`);
* any band count: the first conv takes ``in_channels`` bands; with pretrained weights its RGB kernel
  is adapted as timm's ``adapt_input_conv`` does (1 band: sum over RGB; C > 3: RGB repeated
  cyclically and scaled by 3 / C), so that a band with the statistics of any RGB band starts with the
  same response;
* normalisation by per-band mean/std of the training data, stored in the model and checkpoint,
  instead of ImageNet statistics, and **no resize**: torchvision's 800/1333 resize is switched off,
  images are fed at their native size (and GSD);
* losses normalised by the positive anchors of the whole batch, as in the paper (torchvision
  normalises per image, see :class:`GeoClassificationHead`);
* ignore regions: anchors that lie mostly (intersection over anchor area >= 0.5) inside an ignore
  region and match no object are excluded from the classification loss (``matched = -2``, the
  matcher's "between thresholds" value).

Class ids are ``1..K`` (0 is background). As in the paper, the classification subnet has ``K`` sigmoid
outputs per anchor, output ``k`` for class ``k + 1``, so no detection can carry the background id
(torchvision's RetinaNet has ``K + 1`` and can label a box 0). Checkpoints of format 1 and 2 had the
``K + 1`` layer; :mod:`geonet.checkpoint` drops its background column on loading.

**Anchors** are generated in fp32 whatever the autocast dtype (torchvision's generator takes the
dtype of the feature maps: under bf16 autocast its anchors were off by up to 4 px on a 1024 px input
and 13 % of the positive anchor assignments on a 512 px chip changed), once per input shape
(:class:`GeoAnchorGenerator`). Box decoding and NMS run in fp32.

**Pyramid.** Five anchor sizes use P3-P7 (strides 8-128); six use P2-P7, adding a stride-4 level for
objects under ~16 px (vehicles, small crowns), at the cost of the extra level's compute.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
    _box_loss,
    _sum,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, sigmoid_focal_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from geonet.boxes import box_ioa
from geonet.errors import InputError
from geonet.torchgeo_weights import is_torchgeo, resolve_torchgeo

log = logging.getLogger(__name__)

__all__ = ["BACKBONES", "ModelConfig", "GeoRetinaNet", "build_model", "adapt_first_conv", "anchor_generator"]


@dataclass
class ModelConfig:
    """Everything needed to rebuild the detector (stored in every checkpoint).

    Attributes:
        backbone: a key of :data:`BACKBONES`.
        num_classes: object classes K (background excluded).
        in_channels: input bands.
        anchor_sizes: base anchor side in pixels per pyramid level: 5 values for P3..P7, or 6 for
            P2..P7 (a stride-4 level for small objects).
        anchor_scales: multipliers of the base size at each level (octave scales).
        anchor_ratios: aspect ratios height / width.
        focal_alpha, focal_gamma: focal loss parameters.
        fg_iou, bg_iou: matcher thresholds (anchor IoU >= fg_iou: object; < bg_iou: background).
        score_thresh: minimum score of a detection.
        nms_iou: IoU of the per-class NMS inside an image.
        detections_per_img: detections kept per image after NMS.
        topk_candidates: candidates per level before NMS.
        mean, std: per-band normalisation statistics in raw band units (length ``in_channels``).
        p6_from: ``"c5"`` (the paper) or ``"p5"`` (torchvision's COCO v1 weights).
        trainable_layers: backbone stages that are trained (5 = all); ``None``: 3 with pretrained
            weights, 5 from scratch (resolved by :func:`build_model`).
        frozen_bn: use frozen batch norm in the backbone; ``None``: with pretrained weights only
            (resolved by :func:`build_model`).
        fpn_channels: channels of the FPN levels P3-P7 and of the subnets' convs (the paper's 256). The
            subnets' four 3x3 convs at every level cost ``fpn_channels ** 2`` each: at 256 they were 85 % of a
            MobileNetV2-FPN RetinaNet's multiply-adds. ``None``: 256 with ``--weights coco`` (the COCO head
            has 256), else :data:`FPN_CHANNELS` (resolved by :func:`build_model`).
        normalize: ``"dataset"``: every image is normalised with ``mean`` and ``std`` (the training data's);
            ``"image"``: each image (training window, detection tile) with its own per-band mean and standard
            deviation, so a per-band gain and offset of a whole image (another sensor, site, season or
            white balance) changes nothing (:class:`GeoTransform`). Nodata pixels hold the training means
            and count in the image's statistics. ``None``: ``"dataset"`` with TorchGeo weights (they were
            pretrained on their own normalisation), else :data:`NORMALIZE` (resolved by :func:`build_model`).
    """

    backbone: str = "mobilenet_v2"
    num_classes: int = 1
    in_channels: int = 3
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    anchor_scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    score_thresh: float = 0.05
    nms_iou: float = 0.5
    detections_per_img: int = 300
    topk_candidates: int = 1000
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    p6_from: str = "c5"
    trainable_layers: int | None = None
    frozen_bn: bool | None = None
    fpn_channels: int | None = None
    normalize: str | None = None

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise InputError(f"--backbone {self.backbone!r} is unknown.", fix=f"choose one of {', '.join(BACKBONES)}.")
        if len(self.anchor_sizes) not in (5, 6):
            raise InputError(f"--anchor-sizes needs 5 values (P3..P7) or 6 (P2..P7), got {len(self.anchor_sizes)}.",
                             fix="e.g. --anchor-sizes 32,64,128,256,512, or 8,16,32,64,128,256 with P2.")
        for name in ("anchor_sizes", "anchor_scales", "anchor_ratios"):
            vals = getattr(self, name)
            if not vals or min(vals) <= 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive numbers, got {list(vals)}.",
                                 fix=f"e.g. --{name.replace('_', '-')} "
                                     f"{','.join(f'{v:g}' for v in getattr(ModelConfig, name))}.")
        if not 0 <= self.bg_iou <= self.fg_iou <= 1:
            raise InputError(f"matcher IoUs must satisfy 0 <= bg ({self.bg_iou}) <= fg ({self.fg_iou}) <= 1.",
                             fix="e.g. --fg-iou 0.5 --bg-iou 0.4.")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise InputError(f"normalisation stats have {len(self.mean)} bands but the model takes "
                             f"{self.in_channels}.")
        if self.num_classes < 1:
            raise InputError("the model needs at least one class.")
        if self.normalize is not None and self.normalize not in NORMALIZE_CHOICES:
            raise InputError(f"--normalize {self.normalize!r}: choose {' or '.join(NORMALIZE_CHOICES)}.")
        if self.fpn_channels is not None and not 8 <= self.fpn_channels <= 1024:
            raise InputError(f"--fpn-channels must be between 8 and 1024, got {self.fpn_channels}.",
                             fix=f"e.g. --fpn-channels {FPN_CHANNELS}, or 256 as in the paper.")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("anchor_sizes", "anchor_scales", "anchor_ratios"):
            d[k] = [float(v) for v in d[k]]
        return d

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides of the pyramid levels the anchors sit on (P3..P7, or P2..P7)."""
        return (4, 8, 16, 32, 64, 128)[6 - len(self.anchor_sizes):]

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("fpn_channels", 256)  # configs written before the option existed had 256
        kw.setdefault("normalize", "dataset")  # and the training data's band statistics
        for k in ("anchor_sizes", "anchor_scales", "anchor_ratios"):
            if k in kw:
                kw[k] = tuple(float(v) for v in kw[k])
        return cls(**kw)


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: how to build the body and which torchvision weights are its ImageNet ones."""

    family: str  # "resnet" or "mobilenet"
    builder: Callable[..., nn.Module]
    imagenet: str  # name of the torchvision weights enum member, e.g. "ResNet50_Weights.IMAGENET1K_V1"


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet", torchvision.models.resnet18, "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": BackboneSpec("resnet", torchvision.models.resnet34, "ResNet34_Weights.IMAGENET1K_V1"),
    "resnet50": BackboneSpec("resnet", torchvision.models.resnet50, "ResNet50_Weights.IMAGENET1K_V1"),
    "resnet101": BackboneSpec("resnet", torchvision.models.resnet101, "ResNet101_Weights.IMAGENET1K_V1"),
    "mobilenet_v2": BackboneSpec("mobilenet", torchvision.models.mobilenet_v2, "MobileNet_V2_Weights.IMAGENET1K_V1"),
    "mobilenet_v3_large": BackboneSpec("mobilenet", torchvision.models.mobilenet_v3_large,
                                       "MobileNet_V3_Large_Weights.IMAGENET1K_V1"),
}

#: ``ModelConfig.normalize`` values.
NORMALIZE_CHOICES = ("dataset", "image")

#: Default normalisation without TorchGeo weights (:attr:`ModelConfig.normalize`): on the NEON held-out-site
#: folds (bench/quality_bench.py, rows default and dataset-norm) it raised F1 on every fold measured.
NORMALIZE = "image"

#: Default FPN and subnet width without COCO weights (:attr:`ModelConfig.fpn_channels`).
FPN_CHANNELS = 256

#: torchvision's COCO-trained RetinaNet (ResNet-50-FPN, v1 head, P6 from P5).
COCO_WEIGHTS = "RetinaNet_ResNet50_FPN_Weights.COCO_V1"


def _weights_enum(name: str):
    """``"ResNet50_Weights.IMAGENET1K_V1"`` -> the torchvision weights enum member."""
    enum_name, member = name.split(".")
    enum = getattr(torchvision.models, enum_name, None) or getattr(torchvision.models.detection, enum_name)
    return getattr(enum, member)


def _download_state_dict(weights, option: str = "--weights") -> dict:
    """Fetch torchvision weights through torch.hub's cache (no download when the file is there); a one-line
    error with the fix when that fails (offline)."""
    from torch.hub import get_dir

    url = weights.url
    fname = os.path.basename(url)
    cache = Path(get_dir()) / "checkpoints"
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub prints "Downloading: ..." there
            return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # URLError, HTTPError, socket errors, ... when offline
        raise InputError(
            f"{option}: {fname} is not in the torch hub cache and cannot be downloaded "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:100]}).",
            fix=f"on a machine with internet, download {url} and place it at {cache / fname} "
                "(set TORCH_HOME to move the cache), or pass --weights PATH to a local state dict of the "
                "backbone, or --weights none to train from scratch.") from None


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """Adapt an RGB first-conv kernel ``[O, 3, k, k]`` to ``in_channels`` bands.

    Follows timm's ``adapt_input_conv``: for 1 band, the sum over the RGB kernels; for C > 3, the RGB
    kernels repeated cyclically to C and scaled by 3 / C (so the response to C bands with RGB-like
    statistics equals that of the RGB input); for 2 bands, the first two RGB kernels scaled by 3 / 2.

    Returns:
        ``[O, in_channels, k, k]`` kernel, same dtype.
    """
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / float(in_channels))


class GeoAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator (same layout: centres at multiples of the stride, base anchors rounded
    to whole pixels), always in fp32 and cached per input shape and device (module docstring)."""

    def __init__(self, sizes, aspect_ratios):
        super().__init__(sizes, aspect_ratios)
        self._cache: dict[tuple, Tensor] = {}

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """``B x [sum_l H_l * W_l * A, 4]`` anchors (xyxy, pixels of the padded batch), one per image."""
        grid_sizes = [tuple(int(v) for v in f.shape[-2:]) for f in feature_maps]
        image_size = tuple(int(v) for v in image_list.tensors.shape[-2:])
        device = feature_maps[0].device
        key = (image_size, tuple(grid_sizes), str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            strides = [[torch.tensor(image_size[0] // g[0], dtype=torch.int64, device=device),
                        torch.tensor(image_size[1] // g[1], dtype=torch.int64, device=device)] for g in grid_sizes]
            self.set_cell_anchors(torch.float32, device)
            anchors = torch.cat(self.grid_anchors([list(g) for g in grid_sizes], strides)).float()
            if len(self._cache) >= 32:  # training on windows of many sizes
                self._cache.clear()
            self._cache[key] = anchors
        return [anchors] * len(image_list.image_sizes)


def anchor_generator(cfg: ModelConfig) -> GeoAnchorGenerator:
    """The anchors of ``cfg``: ``len(scales) * len(ratios)`` per location and level."""
    sizes = tuple(tuple(float(s) * float(k) for k in cfg.anchor_scales) for s in cfg.anchor_sizes)
    ratios = (tuple(float(r) for r in cfg.anchor_ratios),) * len(sizes)
    return GeoAnchorGenerator(sizes, ratios)


class FP32LastLevelP6P7(LastLevelP6P7):
    """torchvision's P6/P7 block (3x3 stride-2 convs on C5 or P5, then on ReLU(P6)), run in fp32 under autocast.

    The maps are tiny (P7 is 1 x 1 for a 128 px input), so fp32 costs nothing; in bf16 on the CPU the
    weight gradient of a stride-2 3x3 conv on a 1 x 1 map came out NaN (oneDNN; seen training 64-128 px
    chips from scratch), which poisoned the whole model through gradient clipping.
    """

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]):
        with torch.autocast(p[-1].device.type, enabled=False):  # only the last level is read
            return super().forward(p[:-1] + [p[-1].float()], c[:-1] + [c[-1].float()], names)


class GeoTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform without resizing, normalising with the data's own band statistics.

    Images are normalised (``(x - mean) / std`` per band), padded with 0 (the band mean) to a multiple
    of 32 and batched; boxes are left untouched (native size and GSD). With ``channels_last`` the batch
    is laid out NHWC for faster convolutions. Training goes through ``forward`` (a list of images of
    any sizes), detection through :meth:`batch` (one ``[B, C, H, W]`` tensor); both use the same
    normalisation and padding.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, per_image: bool = False):
        super().__init__(min_size=1, max_size=1, image_mean=list(mean), image_std=list(std), size_divisible=32)
        self.channels_last = False
        self.per_image = per_image

    def normalize(self, image: Tensor) -> Tensor:
        """``[C, H, W]`` or ``[B, C, H, W]`` float raw values -> normalised, same shape.

        With ``per_image``, each image's own per-band mean and standard deviation replace the stored ones; the
        standard deviation is floored at 5 % of the stored one, so a flat image (water, a roof) is not blown up.
        """
        if not self.per_image:
            return super().normalize(image)
        floor = 0.05 * torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)[:, None, None]
        mean = image.mean(dim=(-2, -1), keepdim=True)  # [..., C, 1, 1]
        std = image.std(dim=(-2, -1), keepdim=True)
        return (image - mean) / torch.maximum(std, floor)

    def resize(self, image, target=None):
        return image, target

    def batch_images(self, images, size_divisible: int = 32):
        batched = super().batch_images(images, size_divisible)
        if self.channels_last:
            batched = batched.contiguous(memory_format=torch.channels_last)
        return batched

    def batch(self, x: Tensor) -> Tensor:
        """Normalise and pad a ``[B, C, H, W]`` batch of raw band values (any dtype) -> float32
        ``[B, C, H', W']``, ``H'`` and ``W'`` the next multiples of 32."""
        x = self.normalize(x.float())  # [C, 1, 1] statistics broadcast over [B, C, H, W]
        h, w = x.shape[-2:]
        ph, pw = math.ceil(h / self.size_divisible) * self.size_divisible, \
            math.ceil(w / self.size_divisible) * self.size_divisible
        if (ph, pw) != (h, w):
            x = torch.nn.functional.pad(x, (0, pw - w, 0, ph - h))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result  # no resize happened, nothing to map back


class GeoClassificationHead(RetinaNetClassificationHead):
    """RetinaNet classification subnet with configurable focal-loss alpha and gamma.

    The loss is normalised by the number of positive anchors in the whole batch, as in the paper.
    (torchvision divides each image's loss by that image's own positives, at least 1, so a
    background-only chip contributes the unnormalised sum over all its anchors: measured here, that
    made the training loss jump from ~1.7 to ~25 in the first epochs on data with negative chips.)
    """

    def __init__(self, in_channels, num_anchors, num_classes, *, alpha: float = 0.25, gamma: float = 2.0, **kw):
        super().__init__(in_channels, num_anchors, num_classes, **kw)
        self.alpha = alpha
        self.gamma = gamma

    def compute_loss(self, targets, head_outputs, matched_idxs):
        losses = []
        num_foreground = 0
        cls_logits = head_outputs["cls_logits"]  # [B, A, K]
        for targets_per_image, cls_logits_per_image, matched_idxs_per_image in zip(targets, cls_logits, matched_idxs):
            foreground = matched_idxs_per_image >= 0  # [A]
            num_foreground += int(foreground.sum())
            gt_classes_target = torch.zeros_like(cls_logits_per_image)  # [A, K]; output k is class k + 1
            gt_classes_target[foreground, targets_per_image["labels"][matched_idxs_per_image[foreground]] - 1] = 1.0
            valid = matched_idxs_per_image != self.BETWEEN_THRESHOLDS
            losses.append(sigmoid_focal_loss(cls_logits_per_image[valid], gt_classes_target[valid], alpha=self.alpha,
                                             gamma=self.gamma, reduction="sum"))
        return _sum(losses) / max(1, num_foreground)


class GeoRegressionHead(RetinaNetRegressionHead):
    """RetinaNet box subnet; its loss is normalised by the batch's positive anchors (see above)."""

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        losses = []
        num_foreground = 0
        bbox_regression = head_outputs["bbox_regression"]  # [B, A, 4]
        for targets_per_image, bbox_regression_per_image, anchors_per_image, matched_idxs_per_image in zip(
                targets, bbox_regression, anchors, matched_idxs):
            fg = torch.where(matched_idxs_per_image >= 0)[0]  # [P]
            num_foreground += fg.numel()
            matched_gt = targets_per_image["boxes"][matched_idxs_per_image[fg]]  # [P, 4]
            losses.append(_box_loss(self._loss_type, self.box_coder, anchors_per_image[fg, :], matched_gt,
                                    bbox_regression_per_image[fg, :]))
        return _sum(losses) / max(1, num_foreground)


class GeoRetinaNet(RetinaNet):
    """torchvision RetinaNet plus ignore regions in the loss (see module docstring).

    Forward, as torchvision's: in training ``model(images, targets)`` returns
    ``{"classification": Tensor, "bbox_regression": Tensor}``; in eval ``model(images)`` returns one dict
    per image with ``boxes`` (FloatTensor[N, 4], ``[x1, y1, x2, y2]`` pixels of that image,
    ``0 <= x1 < x2 <= W``), ``scores`` (FloatTensor[N]) and ``labels`` (Int64Tensor[N], ``1..K``).
    ``images`` is a list of FloatTensor ``[C, H, W]`` of raw band values; targets may carry
    ``ignore`` (FloatTensor[M, 4]). Detection over tiles uses :meth:`predict_batch`.
    """

    IGNORE_IOA = 0.5

    def compute_loss(self, targets, head_outputs, anchors):
        matched_idxs = []
        for anchors_per_image, targets_per_image in zip(anchors, targets):  # anchors: [A, 4]
            if targets_per_image["boxes"].numel() == 0:
                m = torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64, device=anchors_per_image.device)
            else:
                quality = box_ops.box_iou(targets_per_image["boxes"], anchors_per_image)  # [N, A]
                m = self.proposal_matcher(quality)
            ignore = targets_per_image.get("ignore")
            if ignore is not None and ignore.numel():
                ioa = box_ioa(anchors_per_image[:, None], ignore.to(anchors_per_image)[None])  # [A, M]
                on_ignore = (ioa.max(dim=1).values >= self.IGNORE_IOA) & (m < 0)
                m = torch.where(on_ignore, torch.full_like(m, self.proposal_matcher.BETWEEN_THRESHOLDS), m)
            matched_idxs.append(m)
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        """Detections of a batch in one pass over the images (torchvision loops per image and level).

        Per level, the ``topk_candidates`` best (anchor, class) scores of every image; scores above
        ``score_thresh`` are decoded in fp32 and clipped to their image; one ``batched_nms`` keyed by
        image and class; at most ``detections_per_img`` per image, best first.

        Args:
            head_outputs: ``cls_logits`` and ``bbox_regression``: per level, ``[B, HWA_l, K]`` and
                ``[B, HWA_l, 4]``.
            anchors: per image, per level ``[HWA_l, 4]`` (equal for every image of a batch).
            image_shapes: ``(h, w)`` of each image before padding.

        Returns:
            One dict per image: ``boxes`` FloatTensor[N, 4] (xyxy), ``scores`` FloatTensor[N], ``labels``
            Int64Tensor[N] in ``1..K``.
        """
        cls_levels, reg_levels = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        n_img = len(image_shapes)
        device = cls_levels[0].device
        boxes, scores, labels = [], [], []
        for logits, reg, anc in zip(cls_levels, reg_levels, anchors[0]):
            k_cls = logits.shape[-1]
            s = torch.sigmoid(logits.float()).flatten(1)  # [B, HWA_l * K]
            top_s, top_i = s.topk(min(self.topk_candidates, s.shape[1]), dim=1)  # [B, k]
            a_idx = torch.div(top_i, k_cls, rounding_mode="floor")  # [B, k]
            r = torch.gather(reg.float(), 1, a_idx[..., None].expand(-1, -1, 4))  # [B, k, 4]
            b = self.box_coder.decode_single(r.reshape(-1, 4), anc.float()[a_idx.reshape(-1)])  # [B * k, 4]
            boxes.append(b.reshape(n_img, -1, 4))
            scores.append(top_s)
            labels.append(top_i % k_cls + 1)
        boxes, scores, labels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)  # [B, M, ...]
        limit = torch.tensor([[w, h, w, h] for h, w in image_shapes], dtype=torch.float32, device=device)  # [B, 4]
        boxes = torch.minimum(boxes.clamp(min=0), limit[:, None, :])  # clipped to each image
        img, m = torch.nonzero(scores > self.score_thresh, as_tuple=True)
        b, s, lab = boxes[img, m], scores[img, m], labels[img, m]
        keep = capped_batched_nms(b, s, img, img * (k_cls + 1) + lab, self.nms_thresh, self.detections_per_img,
                                  n_img)  # by image and class; best first
        img_k = img[keep]
        order = torch.sort(img_k, stable=True).indices  # group by image, best first within each
        keep, img_k = keep[order], img_k[order]
        counts = torch.bincount(img_k, minlength=n_img)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(keep), device=device) - start[img_k]
        keep = keep[rank < self.detections_per_img]
        per_image = torch.bincount(img[keep], minlength=n_img).tolist()
        return [{"boxes": bb, "scores": ss, "labels": ll} for bb, ss, ll in
                zip(b[keep].split(per_image), s[keep].split(per_image), lab[keep].split(per_image))]

    @torch.inference_mode()
    def predict_batch(self, batch: Tensor, *, autocast: torch.dtype | None = None) -> list[dict[str, Tensor]]:
        """Detect on a batch of equally sized tiles (the eval half of ``forward``, without its per-image copies).

        Args:
            batch: ``[B, C, H, W]`` raw band values, any dtype, on the model's device.
            autocast: run the backbone and heads under ``torch.autocast`` with this dtype (bf16, fp16);
                anchors, box decoding and NMS stay in fp32.

        Returns:
            One dict per tile: ``boxes`` FloatTensor[N, 4] (xyxy, tile pixels), ``scores`` FloatTensor[N],
            ``labels`` Int64Tensor[N] (``1..K``), on the model's device.
        """
        h, w = batch.shape[-2:]
        x = self.transform.batch(batch)  # [B, C, H', W'] normalised, padded
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            features = list(self.backbone(x).values())  # P3..P7 (or P2..P7), each [B, fpn_channels, h_l, w_l]
            head = self.head(features)  # cls_logits [B, HWA, K], bbox_regression [B, HWA, 4]
        images = ImageList(x, [(h, w)] * x.shape[0])
        anchors = self.anchor_generator(images, features)  # B x [HWA, 4], fp32
        per_level = [f.size(2) * f.size(3) for f in features]
        a = head["cls_logits"].size(1) // sum(per_level)
        per_level = [n * a for n in per_level]
        split_head = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
        split_anchors = [list(an.split(per_level)) for an in anchors]
        return self.postprocess_detections(split_head, split_anchors, images.image_sizes)


def capped_batched_nms(boxes: Tensor, scores: Tensor, images: Tensor, groups: Tensor, iou: float, cap: int,
                       n_images: int) -> Tensor:
    """``torchvision.ops.batched_nms`` when only the best ``cap`` kept boxes of each image are wanted.

    Greedy NMS keeps a box when no better-scoring kept box of its group overlaps it, so whether a box is kept
    depends only on the boxes that score higher. NMS over each image's ``m`` best candidates therefore keeps
    exactly the boxes that NMS over all candidates keeps among those ``m``; once that is at least ``cap`` boxes
    (or all of the image's candidates), the image's best ``cap`` kept boxes are final. ``m`` starts at
    ``4 * cap`` and grows 4x for images that are not final yet. Same result as ``batched_nms`` followed by a
    per-image cap; measured on the 2-core CPU with a random ResNet-18 RetinaNet at score threshold 0 (5,000
    candidates per 512 px tile, cap 50): NMS 21 ms -> 0.2 ms per tile (torch profiler).

    Args:
        boxes: FloatTensor[N, 4] xyxy. scores: FloatTensor[N]. images: Int64Tensor[N], the image of each box
            (``0..n_images-1``). groups: Int64Tensor[N], the NMS group (image and class) of each box.
        iou: NMS IoU threshold. cap: kept boxes wanted per image. n_images: images in the batch.

    Returns:
        Int64Tensor of indices into ``boxes``: a superset of every image's best ``cap`` kept boxes, each of them
        kept by ``batched_nms(boxes, scores, groups, iou)``, sorted by decreasing score.
    """
    if len(scores) <= 4 * cap:
        return batched_nms(boxes, scores, groups, iou)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(images[order], stable=True).indices]  # by image, best first within each
    total = torch.bincount(images, minlength=n_images)
    start = torch.cumsum(total, 0) - total
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - start[images[order]]  # rank within its image
    m = 4 * cap
    while True:
        cand = torch.nonzero(rank < m).squeeze(1)
        keep = cand[batched_nms(boxes[cand], scores[cand], groups[cand], iou)]
        kept = torch.bincount(images[keep], minlength=n_images)
        if bool(((kept >= cap) | (total <= m)).all()):
            return keep
        m *= 4


def fold_batch_norm(module: nn.Module) -> int:
    """Fold every inference-mode batch norm into the convolution before it, in place (for detection only).

    A frozen (or eval-mode) batch norm after a convolution is an affine map per channel, so it can be
    folded into that convolution's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_weights``); the
    norm becomes ``nn.Identity``. The outputs are the same up to float rounding. Under bf16 autocast it also
    keeps the activations in bf16: ``FrozenBatchNorm2d`` multiplies a bf16 activation by fp32 statistics,
    which promotes every backbone activation to fp32 and back before the next convolution.

    Pairs folded: consecutive ``(Conv2d, norm)`` children of an ``nn.Sequential`` (torchvision's
    ``Conv2dNormActivation``, MobileNet blocks, ResNet ``downsample``), and ``convN``/``bnN`` children of any
    other module (torchvision's ResNet stem and blocks). Nothing else is touched.

    Args:
        module: a model in eval mode (not for training: the folded weights train differently).

    Returns:
        The number of norms folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    norms = (FrozenBatchNorm2d, nn.BatchNorm2d)
    pairs: list[tuple[nn.Module, str, str]] = []
    for parent in module.modules():
        kids = parent._modules
        names = list(kids)
        for i, name in enumerate(names):
            conv = kids[name]
            if not isinstance(conv, nn.Conv2d):
                continue
            if isinstance(parent, nn.Sequential):
                bn_name = names[i + 1] if i + 1 < len(names) else None
            else:
                bn_name = "bn" + name[4:] if name.startswith("conv") and name[4:].isdigit() else None
            bn = kids.get(bn_name) if bn_name else None
            if isinstance(bn, norms) and not (isinstance(bn, nn.BatchNorm2d) and bn.training) \
                    and bn.running_mean is not None and bn.running_mean.numel() == conv.out_channels:
                pairs.append((parent, name, bn_name))
    with torch.no_grad():
        for parent, name, bn_name in pairs:
            conv, bn = parent._modules[name], parent._modules[bn_name]
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                          bn.eps, bn.weight, bn.bias)
            parent._modules[bn_name] = nn.Identity()
    return len(pairs)


def _load_local_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise InputError(f"--weights {path}: no such file.", fix="pass coco, imagenet, none or a local weights file.")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"--weights {path}: not a torch state dict that loads with weights_only=True "
                         f"({type(exc).__name__}).", fix="pass a .pth of tensors (state_dict) or a geonet checkpoint.") from None
    if isinstance(sd, dict) and sd.get("format") == "geonet-detector":
        return sd
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise InputError(f"--weights {path}: the file does not hold a state dict of tensors.")
    return sd


def _load_body_state(body: nn.Module, sd: dict, weights: str, backbone: str, *, fix: str) -> None:
    """Load backbone weights ``sd`` into ``body``; the classifier (``fc.``, ``classifier.``) may be absent or extra.

    Raises:
        InputError: other keys missing or unexpected.
    """
    head = ("fc.", "classifier.")
    missing, unexpected = body.load_state_dict({k: v for k, v in sd.items() if not k.startswith(head)}, strict=False)
    missing = [k for k in missing if not k.startswith(head)]
    if unexpected or missing:
        raise InputError(f"--weights {weights}: the keys do not match backbone {backbone} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[:2]}).", fix=fix)


def _body(cfg: ModelConfig, weights: str, option: str = "--weights") -> tuple[nn.Module, bool]:
    """The classification backbone with pretrained weights loaded and the first conv adapted."""
    spec = BACKBONES[cfg.backbone]
    norm = FrozenBatchNorm2d if cfg.frozen_bn else nn.BatchNorm2d
    body = spec.builder(weights=None, norm_layer=norm)
    pretrained = False
    if weights == "imagenet":
        sd = _download_state_dict(_weights_enum(spec.imagenet), option)
        body.load_state_dict(sd)
        pretrained = True
    elif is_torchgeo(weights):
        tg = resolve_torchgeo(weights)
        tg.check_backbone(cfg.backbone)
        tg.check_bands(cfg.in_channels, None)
        first = body.conv1
        body.conv1 = nn.Conv2d(tg.in_chans, first.out_channels, first.kernel_size, first.stride, first.padding,
                               bias=False)
        _load_body_state(body, _download_state_dict(tg.member, option), weights, cfg.backbone,
                         fix="choose ResNet weights of TorchGeo that geonet lists, or report it.")
        pretrained = True
    elif weights not in ("none", "coco", None, ""):
        sd = _load_local_state_dict(weights)
        if sd.get("format") != "geonet-detector":
            sd = {k.removeprefix("module.").removeprefix("backbone.body."): v for k, v in sd.items()}
            _load_body_state(body, sd, weights, cfg.backbone, fix="choose the --backbone the weights were trained for.")
            pretrained = True
    first = body.conv1 if spec.family == "resnet" else body.features[0][0]
    if cfg.in_channels != first.in_channels:
        new = nn.Conv2d(cfg.in_channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                        bias=first.bias is not None)
        with torch.no_grad():
            if pretrained:
                new.weight.copy_(adapt_first_conv(first.weight, cfg.in_channels))
        if spec.family == "resnet":
            body.conv1 = new
        else:
            body.features[0][0] = new
    return body, pretrained


def _mobilenet_fpn(body: nn.Module, trainable_layers: int, extra_from_c5: bool, *, p2: bool = False,
                   channels_out: int = 256) -> BackboneWithFPN:
    """MobileNet + FPN with outputs at strides 8, 16, 32 (C3, C4, C5; with ``p2`` also 4, C2), then P6, P7.

    torchvision's own mobilenet FPN returns two stride-32 maps (for SSDlite / Faster R-CNN); RetinaNet
    needs P3-P5, so each C_k here is the *last* block of its stride.
    """
    features = body.features
    stage_starts = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]  # strided blocks
    c5 = len(features) - 1
    levels = [stage_starts[-k] - 1 for k in ((3, 2, 1) if p2 else (2, 1))] + [c5]  # C2?, C3, C4, C5
    stage_indices = [0] + stage_starts + [c5]
    freeze_before = len(features) if trainable_layers == 0 else \
        stage_indices[max(0, len(stage_indices) - trainable_layers)]
    if trainable_layers < len(stage_indices):
        for b in features[:freeze_before]:
            for p in b.parameters():
                p.requires_grad_(False)
    channels = [features[i].out_channels for i in levels]
    extra = FP32LastLevelP6P7(channels[-1] if extra_from_c5 else channels_out, channels_out)
    return BackboneWithFPN(features, {str(c): str(k) for k, c in enumerate(levels)}, channels, channels_out,
                           extra_blocks=extra)


def build_model(cfg: ModelConfig, *, weights: str = "none") -> GeoRetinaNet:
    """Build the detector.

    Args:
        cfg: model configuration (validated here).
        weights: ``"auto"`` (the best pretrained weights for the backbone: ``"coco"`` for ResNet-50,
            ``"imagenet"`` otherwise), ``"none"`` (random init), ``"imagenet"`` (torchvision's ImageNet backbone
            weights via the torch hub cache), ``"coco"`` (torchvision's COCO RetinaNet, ResNet-50 only; the
            class layer is re-initialised for ``num_classes``), ``"torchgeo:ENUM.MEMBER"`` (TorchGeo's
            multispectral ResNet weights, :mod:`geonet.torchgeo_weights`), or a path to a local file: backbone weights
            with torchvision key names (e.g. ``mobilenet_v2_imagenet.pth``) or a geonet checkpoint (fine-tune).

    Returns:
        A :class:`GeoRetinaNet` in train mode, on the CPU. ``cfg.trainable_layers``, ``cfg.frozen_bn``,
        ``cfg.fpn_channels`` and ``cfg.normalize`` are resolved in place when ``None`` (the checkpoint then
        records what was built).

    Raises:
        InputError: bad config, weights that do not fit the backbone, or weights that cannot be
            downloaded (the message says which file to place where).
    """
    cfg.validate()
    if weights == "auto":
        weights = "coco" if cfg.backbone == "resnet50" else "imagenet"
        option = f"--weights auto (for --backbone {cfg.backbone}: {weights})"
    else:
        option = f"--weights {weights}"
    pretrained = weights not in ("none", "", None)
    if cfg.trainable_layers is None:
        cfg.trainable_layers = 3 if pretrained else 5
    if cfg.frozen_bn is None:
        cfg.frozen_bn = pretrained
    if weights == "coco":
        if cfg.backbone != "resnet50":
            raise InputError(f"--weights coco exists for --backbone resnet50 only (got {cfg.backbone}).",
                             fix="use --backbone resnet50, or --weights imagenet.")
        cfg.p6_from = "p5"
        if cfg.fpn_channels not in (None, 256):
            raise InputError(f"--weights coco has a 256-channel FPN and head; --fpn-channels {cfg.fpn_channels} "
                             "does not fit it.", fix="drop --fpn-channels, or use --weights imagenet.")
    if cfg.fpn_channels is None:
        cfg.fpn_channels = 256 if weights == "coco" else FPN_CHANNELS
    if cfg.normalize is None:
        cfg.normalize = "dataset" if is_torchgeo(weights) else NORMALIZE
    width = cfg.fpn_channels
    body, pretrained = _body(cfg, weights, option)
    pretrained = pretrained or weights == "coco"
    spec = BACKBONES[cfg.backbone]
    layers = cfg.trainable_layers
    p2 = len(cfg.anchor_sizes) == 6
    if cfg.in_channels != 3 and layers < 5 and not is_torchgeo(weights):
        layers = 5  # the adapted first conv must learn (TorchGeo's weights have their own for their bands)
    if spec.family == "resnet":
        c5 = body.fc.in_features
        extra = FP32LastLevelP6P7(c5 if cfg.p6_from == "c5" else width, width)
        returned = [1, 2, 3, 4] if p2 else [2, 3, 4]
        backbone = _resnet_fpn_extractor(body, layers, returned_layers=returned, extra_blocks=extra)
        if width != 256:  # torchvision's extractor fixes 256: the same body and layers, another width
            backbone = BackboneWithFPN(body, backbone.body.return_layers,
                                       [c5 // 2 ** (4 - k) for k in returned], width, extra_blocks=extra)
    else:
        backbone = _mobilenet_fpn(body, layers, cfg.p6_from == "c5", p2=p2, channels_out=width)
    anchors = anchor_generator(cfg)
    num_anchors = anchors.num_anchors_per_location()[0]
    head_cls = GeoClassificationHead(width, num_anchors, cfg.num_classes, alpha=cfg.focal_alpha,
                                     gamma=cfg.focal_gamma)
    head = RetinaNetHead(width, num_anchors, cfg.num_classes)
    # same layers and initialisation as torchvision's (prior pi = 0.01), batch-normalised losses
    head.classification_head = head_cls
    head.regression_head = GeoRegressionHead(width, num_anchors)
    model = GeoRetinaNet(backbone, cfg.num_classes, anchor_generator=anchors, head=head,
                         score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_iou,
                         detections_per_img=cfg.detections_per_img, fg_iou_thresh=cfg.fg_iou,
                         bg_iou_thresh=cfg.bg_iou, topk_candidates=cfg.topk_candidates)
    model.transform = GeoTransform(cfg.mean, cfg.std, per_image=cfg.normalize == "image")
    if weights == "coco":
        _load_coco(model, cfg, option)
    elif weights not in ("none", "imagenet", None, "") and Path(weights).exists():
        sd = _load_local_state_dict(weights)
        if sd.get("format") == "geonet-detector":
            _load_geonet(model, sd, cfg)
    return model


def _load_coco(model: GeoRetinaNet, cfg: ModelConfig, option: str = "--weights coco") -> None:
    sd = _download_state_dict(_weights_enum(COCO_WEIGHTS), option)
    own = model.state_dict()
    keep = {}
    for k, v in sd.items():
        if k in own and own[k].shape == v.shape:
            keep[k] = v
        elif k == "backbone.body.conv1.weight":
            keep[k] = adapt_first_conv(v, cfg.in_channels)
    missing, _ = model.load_state_dict(keep, strict=False)
    log.info("COCO weights loaded; re-initialised: %s", ", ".join(sorted(missing)) or "nothing")


def _load_geonet(model: GeoRetinaNet, ckpt: dict, cfg: ModelConfig) -> None:
    """Initialise from a geonet checkpoint (fine-tuning): every tensor whose shape fits."""
    own = model.state_dict()
    keep = {k: v for k, v in ckpt["state_dict"].items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("backbone.body") for k in keep):
        raise InputError("--weights: the geonet checkpoint's backbone does not fit "
                         f"--backbone {cfg.backbone} with {cfg.in_channels} band(s).")
    model.load_state_dict(keep, strict=False)
