import numpy as np
import pytest
import torch

from geonet.anchors import STRIDES, anchor_coverage, best_anchor_iou, fit_anchors
from geonet.errors import InputError
from geonet.model import BACKBONES, NORMALIZE, ModelConfig, adapt_first_conv, build_model


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("bands", [1, 4])
def test_every_backbone_builds_p3_p7_for_any_band_count(backbone, bands):
    if backbone in ("resnet101", "resnet50") and bands == 1:
        pytest.skip("large backbones: one band count is enough")
    cfg = ModelConfig(backbone=backbone, num_classes=2, in_channels=bands, mean=[0.0] * bands, std=[1.0] * bands)
    m = build_model(cfg)
    feats = m.backbone(torch.zeros(1, bands, 128, 128))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    # prior pi = 0.01 on the classification layer, unshared 4-conv subnets
    b = m.head.classification_head.cls_logits.bias
    assert torch.allclose(torch.sigmoid(b), torch.full_like(b, 0.01))
    assert len(m.head.classification_head.conv) == 4 and len(m.head.regression_head.conv) == 4


def test_no_resize_and_data_normalisation():
    cfg = ModelConfig(backbone="resnet18", in_channels=1, mean=[1000.0], std=[250.0], normalize="dataset")
    m = build_model(cfg).eval()
    img = torch.full((1, 200, 300), 1500.0)
    batch, _ = m.transform([img])
    assert batch.tensors.shape[-2:] == (224, 320)  # padded to /32, never resized to 800
    assert batch.image_sizes == [(200, 300)]
    assert torch.allclose(batch.tensors[0, 0, :200, :300], torch.tensor(2.0))


def test_anchor_config_is_used():
    cfg = ModelConfig(backbone="resnet18", anchor_sizes=(8, 16, 32, 64, 128), anchor_scales=(1.0, 2.0),
                      anchor_ratios=(0.5, 1.0, 2.0, 4.0))
    m = build_model(cfg)
    assert m.anchor_generator.num_anchors_per_location() == [8] * 5
    assert m.head.classification_head.num_anchors == 8


def test_adapt_first_conv():
    w = torch.randn(8, 3, 3, 3)
    assert torch.allclose(adapt_first_conv(w, 1), w.sum(1, keepdim=True))
    w5 = adapt_first_conv(w, 5)
    assert w5.shape == (8, 5, 3, 3)
    assert torch.allclose(w5[:, 3], w[:, 0] * 3 / 5)
    # a 5-band input whose bands repeat RGB cyclically gives (almost) the RGB response
    x = torch.randn(1, 3, 9, 9)
    x5 = torch.cat([x, x[:, :2]], 1)
    rgb = torch.nn.functional.conv2d(x, w)
    five = torch.nn.functional.conv2d(x5, w5)
    assert five.shape == rgb.shape


def test_bad_config_errors():
    with pytest.raises(InputError, match="--anchor-sizes needs 5 values .P3..P7. or 6"):
        build_model(ModelConfig(anchor_sizes=(32, 64)))
    with pytest.raises(InputError, match="--backbone"):
        build_model(ModelConfig(backbone="vgg"))
    with pytest.raises(InputError, match="coco exists for --backbone resnet50 only"):
        build_model(ModelConfig(backbone="resnet18"), weights="coco")


def test_offline_pretrained_error_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import urllib.request

    def no_net(*a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", no_net)
    with pytest.raises(InputError) as ei:
        build_model(ModelConfig(backbone="resnet18"), weights="imagenet")
    msg = str(ei.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg and "\n" not in msg


def test_local_weights_key_mismatch(tmp_path):
    p = tmp_path / "w.pth"
    torch.save({"foo.weight": torch.zeros(3)}, p)
    with pytest.raises(InputError, match="do not match backbone"):
        build_model(ModelConfig(backbone="mobilenet_v2"), weights=str(p))


def test_shared_mobilenet_weights(shared_data):
    path = shared_data.parent / "weights" / "mobilenet_v2_imagenet.pth"
    sd = torch.load(path, weights_only=True)
    m = build_model(ModelConfig(backbone="mobilenet_v2", in_channels=1, mean=[0.0], std=[1.0], frozen_bn=True,
                                trainable_layers=3), weights=str(path))
    first = m.backbone.body["0"][0].weight
    assert torch.allclose(first, sd["features.0.0.weight"].sum(1, keepdim=True))  # 1 band: summed RGB kernel
    assert torch.equal(m.backbone.body["7"].conv[0][0].weight, sd["features.7.conv.0.0.weight"])


def test_anchor_coverage_exact_and_fit():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 200, (200, 2))
    wh = rng.uniform(6, 60, (200, 2))
    boxes = np.column_stack([xy, xy + wh])
    cfg = ModelConfig()
    np.testing.assert_allclose(best_anchor_iou(boxes, cfg, (256, 256)),
                               check_against_torchvision(boxes, cfg, (256, 256)), atol=1e-5)
    fit = fit_anchors(boxes, (256, 256))
    assert fit.coverage >= fit.default_coverage
    small = ModelConfig(anchor_sizes=fit.sizes, anchor_ratios=fit.ratios)
    assert anchor_coverage(boxes, small, (256, 256))[0] == pytest.approx(fit.coverage)


def check_against_torchvision(boxes, cfg, image_size):
    """Best IoU by brute force over every anchor torchvision generates."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import box_iou

    from geonet.model import anchor_generator

    h, w = image_size
    gen = anchor_generator(cfg)
    feats = [torch.zeros(1, 1, -(-h // s), -(-w // s)) for s in STRIDES]
    anchors = gen(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), feats)[0]
    return box_iou(torch.as_tensor(boxes, dtype=torch.float32), anchors).max(dim=1).values.double().numpy()


def test_p2_level_for_small_objects():
    """Six anchor sizes add a stride-4 level (P2..P7), for ResNet and MobileNet."""
    for backbone in ("resnet18", "mobilenet_v2"):
        cfg = ModelConfig(backbone=backbone, anchor_sizes=(8, 16, 32, 64, 128, 256))
        m = build_model(cfg).eval()
        feats = m.backbone(torch.zeros(1, 3, 128, 128))
        assert [tuple(f.shape[-2:]) for f in feats.values()] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
        assert cfg.strides == (4, 8, 16, 32, 64, 128)
        out = m.predict_batch(torch.zeros(2, 3, 128, 128))
        assert len(out) == 2


def test_anchors_are_fp32_under_autocast():
    """torchvision's generator takes the feature maps' dtype: bf16 anchors are off by pixels at 1024 px."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from geonet.model import anchor_generator

    cfg = ModelConfig()
    images = ImageList(torch.zeros(1, 3, 1024, 1024), [(1024, 1024)])
    feats32 = [torch.zeros(1, 256, 1024 // s, 1024 // s) for s in cfg.strides]
    feats16 = [f.bfloat16() for f in feats32]
    ref = anchor_generator(cfg)(images, feats32)[0]
    ours = anchor_generator(cfg)(images, feats16)[0]
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)
    tv = AnchorGenerator(anchor_generator(cfg).sizes, anchor_generator(cfg).aspect_ratios)(images, feats16)[0]
    assert (tv.float() - ref).abs().max() >= 1.0  # the bug this guards against


def test_batched_postprocess_matches_torchvision_and_never_labels_background():
    """One batched pass gives torchvision's per-image detections; labels are 1..K, never 0."""
    from torchvision.models.detection.retinanet import RetinaNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", num_classes=3, score_thresh=0.3, nms_iou=0.5)
    m = build_model(cfg).eval()
    n_img, k, per_level = 3, 3, [64 * 9, 16 * 9, 4 * 9]
    logits = [torch.randn(n_img, n, k) * 2 for n in per_level]
    reg = [torch.randn(n_img, n, 4) * 0.3 for n in per_level]
    anchors = [[torch.rand(n, 2) * 100 for n in per_level]]
    anchors = [[torch.cat([a, a + 8 + torch.rand(len(a), 2) * 40], 1) for a in anchors[0]]] * n_img
    shapes = [(120, 128)] * n_img
    ours = m.postprocess_detections({"cls_logits": logits, "bbox_regression": reg}, anchors, shapes)
    # torchvision with a background column that never fires: labels 1..K as ours
    bg = [torch.cat([torch.full((n_img, n, 1), -1e4), lg], 2) for n, lg in zip(per_level, logits)]
    tv = RetinaNet.postprocess_detections(m, {"cls_logits": bg, "bbox_regression": reg}, anchors, shapes)
    for a, b in zip(ours, tv):
        assert a["labels"].min() >= 1 and a["labels"].max() <= k
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4)
        assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["scores"], b["scores"])


def test_old_checkpoints_with_a_background_output_load(tmp_path):
    """Format 1-2 checkpoints had K + 1 outputs per anchor (output 0: background); loading drops it."""
    from geonet.checkpoint import CheckpointHeader, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", num_classes=2)
    m = build_model(cfg).eval()
    p = tmp_path / "v2.pt"
    save_checkpoint(p, m, CheckpointHeader(model_config=cfg, classes=["a", "b"]))
    ck = torch.load(p, weights_only=True)
    key = "head.classification_head.cls_logits"
    w, b = ck["state_dict"][f"{key}.weight"], ck["state_dict"][f"{key}.bias"]
    a = w.shape[0] // 2
    ck["state_dict"][f"{key}.weight"] = torch.cat([torch.randn(a, 1, *w.shape[1:]), w.view(a, 2, *w.shape[1:])],
                                                  1).reshape(a * 3, *w.shape[1:])
    ck["state_dict"][f"{key}.bias"] = torch.cat([torch.randn(a, 1), b.view(a, 2)], 1).reshape(-1)
    ck["format_version"] = 2
    torch.save(ck, p)
    old, header = load_checkpoint(p)
    assert header.format_version == 2
    for k_, v in m.state_dict().items():
        assert torch.equal(v, old.state_dict()[k_]), k_


def test_weights_auto_loads_from_the_hub_cache_and_says_what_to_place_offline(tmp_path, monkeypatch):
    import os
    import urllib.error

    import torch.hub
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    fname = os.path.basename(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url)
    with pytest.raises(InputError) as ei:
        build_model(ModelConfig(backbone="mobilenet_v2"), weights="auto")
    msg = str(ei.value)
    assert "--weights auto" in msg and fname in msg and str(tmp_path / "hub" / "checkpoints" / fname) in msg
    assert "--weights PATH" in msg and "--weights none" in msg and "\n" not in msg
    # a state dict placed in the cache under torchvision's file name is what auto loads
    torch.manual_seed(1)
    sd = torchvision.models.mobilenet_v2().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(sd, tmp_path / "hub" / "checkpoints" / fname)
    cfg = ModelConfig(backbone="mobilenet_v2")
    m = build_model(cfg, weights="auto")
    assert torch.equal(m.backbone.body["0"][0].weight, sd["features.0.0.weight"])
    assert cfg.trainable_layers == 3 and cfg.frozen_bn  # pretrained: the early stages stay frozen


@pytest.mark.parametrize("backbone,frozen", [("resnet18", True), ("mobilenet_v2", True), ("resnet18", False)])
def test_folded_batch_norm_gives_the_same_detections(backbone, frozen):
    """Detection folds the backbone's norms into its convs: same boxes (1e-3 px) and scores, no norm left."""
    import copy

    from torchvision.ops.misc import FrozenBatchNorm2d

    from geonet.model import fold_batch_norm

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, num_classes=2, score_thresh=0.0, detections_per_img=50,
                      mean=[100.0] * 3, std=[40.0] * 3, frozen_bn=frozen)
    m = build_model(cfg).eval()
    norms = (FrozenBatchNorm2d, torch.nn.BatchNorm2d)
    with torch.no_grad():  # statistics far from identity, so a wrong fold shows
        for mod in m.modules():
            if isinstance(mod, norms):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
        # a random head scores every anchor near the prior (0.01, MobileNetV2's within 1e-7): spread the scores,
        # so that the kept boxes and their order are decided by the model, not by rounding among ties
        m.head.classification_head.cls_logits.weight.normal_(0.0, 0.05)
    n_norms = sum(isinstance(mod, norms) for mod in m.modules())
    folded = copy.deepcopy(m)
    assert fold_batch_norm(folded) == n_norms > 0
    assert not any(isinstance(mod, norms) for mod in folded.modules())
    x = torch.randint(0, 255, (2, 3, 128, 160), dtype=torch.uint8)
    with torch.inference_mode():
        z = m.transform.batch(x)
        ha, hb = (mm.head(list(mm.backbone(z).values())) for mm in (m, folded))
    for k in ha:  # the raw head outputs: what the fold changes
        assert torch.allclose(ha[k], hb[k], rtol=1e-4, atol=1e-4), k
    for a, b in zip(m.predict_batch(x), folded.predict_batch(x)):
        assert len(a["boxes"]) == len(b["boxes"]) == 50
        # A random model ties many scores, so rows may swap, and at the 50-box cap a 1e-6 difference of the raw
        # outputs can swap which of two tied boxes is kept (seen on an AVX2 CPU: 3 of 50 boxes). Every box
        # scoring clearly above the cap's lowest score must be in the other set, at its nearest box.
        sure = a["scores"] > a["scores"].min() + 1e-4
        assert int(sure.sum()) >= 20  # the comparison is not vacuous
        d = (a["boxes"][sure][:, None, :] - b["boxes"][None, :, :]).abs().amax(-1)  # [S, 50] px
        j = d.argmin(1)
        assert d.min(1).values.max() < 1e-3 and len(set(j.tolist())) == int(sure.sum())
        assert torch.allclose(a["scores"][sure], b["scores"][j], atol=1e-5)
        assert torch.equal(a["labels"][sure], b["labels"][j])


@pytest.mark.parametrize("cap", [1, 5, 50])
def test_capped_batched_nms_keeps_each_images_best_like_batched_nms(cap):
    """The early-exit NMS gives each image the same best ``cap`` kept boxes as torchvision's batched_nms."""
    from torchvision.ops import batched_nms

    from geonet.model import capped_batched_nms

    g = torch.Generator().manual_seed(cap)
    n_img, n = 3, 4000
    xy = torch.rand(n, 2, generator=g) * 40  # dense: most boxes are suppressed, so the candidates must grow
    boxes = torch.cat([xy, xy + 40 + torch.rand(n, 2, generator=g) * 40], 1)
    scores = torch.rand(n, generator=g)
    images = torch.randint(0, n_img, (n,), generator=g)
    images[images == 2] = torch.where(torch.rand(int((images == 2).sum()), generator=g) < 0.97, 1, 2)  # few in 2
    groups = images * 3 + torch.randint(1, 3, (n,), generator=g)
    ref = batched_nms(boxes, scores, groups, 0.5)
    got = capped_batched_nms(boxes, scores, images, groups, 0.5, cap, n_img)
    assert torch.all(scores[got][1:] <= scores[got][:-1])  # best first
    assert set(got.tolist()) <= set(ref.tolist())
    for i in range(n_img):
        want = ref[images[ref] == i][:cap]
        assert torch.equal(got[images[got] == i][:cap], want), i


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_fpn_channels_set_the_width_of_the_pyramid_and_subnets(backbone, tmp_path):
    """``fpn_channels`` narrows P3-P7 and the subnets; the checkpoint records it and rebuilds the same model."""
    from geonet.checkpoint import CheckpointHeader, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, in_channels=3, mean=[0.0] * 3, std=[1.0] * 3, fpn_channels=64)
    m = build_model(cfg).eval()
    wide = build_model(ModelConfig(backbone=backbone, in_channels=3, mean=[0.0] * 3, std=[1.0] * 3))
    assert wide.backbone.out_channels == 256  # the default
    feats = m.backbone(torch.zeros(1, 3, 128, 128))
    assert m.backbone.out_channels == 64 and all(f.shape[1] == 64 for f in feats.values())
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert m.head.classification_head.conv[0][0].in_channels == 64
    assert sum(p.numel() for p in m.head.parameters()) < sum(p.numel() for p in wide.head.parameters()) / 10
    stats = [5, 8, 20, 35, 40]
    save_checkpoint(tmp_path / "m.pt", m, CheckpointHeader(
        model_config=cfg, classes=["thing"], bands=[1, 2, 3], dtype="uint8", gsd=[0.1, 0.1], chip_size=128,
        box_stats={"width": stats, "height": stats, "side": stats}, metrics={}, epoch=0))
    m2, header = load_checkpoint(tmp_path / "m.pt")
    assert header.model_config.fpn_channels == 64
    x = torch.randint(0, 255, (1, 3, 128, 128), dtype=torch.uint8)
    with torch.inference_mode():
        a, b = (mm.head(list(mm.backbone(mm.transform.batch(x)).values())) for mm in (m, m2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fpn_channels_defaults_and_errors():
    """Configs written before the option had 256; COCO weights need 256; the width is bounded."""
    assert ModelConfig.from_dict({"backbone": "resnet18"}).fpn_channels == 256
    assert ModelConfig.from_dict({"backbone": "resnet18", "fpn_channels": None}).fpn_channels is None
    from geonet.model import FPN_CHANNELS

    cfg = ModelConfig(backbone="mobilenet_v2")
    build_model(cfg)
    assert cfg.fpn_channels == FPN_CHANNELS  # resolved in place, so the checkpoint records what was built
    with pytest.raises(InputError, match="--fpn-channels 128 does not fit") as ei:
        build_model(ModelConfig(backbone="resnet50", fpn_channels=128), weights="coco")  # raised before downloading
    assert "\n" not in str(ei.value)
    with pytest.raises(InputError, match="--fpn-channels must be between 8 and 1024"):
        build_model(ModelConfig(fpn_channels=4))


def test_per_image_normalisation_ignores_a_per_band_gain_and_offset():
    """``normalize="image"``: each image is standardised with its own band statistics, so a per-band gain and
    offset of the whole image (another sensor or season) leaves the model's outputs unchanged; ``"dataset"``
    does not."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 128) * 120 + 40
    y = x * torch.tensor([0.6, 1.3, 0.9])[:, None, None] + torch.tensor([30.0, -20.0, 5.0])[:, None, None]
    outs = {}
    for mode in ("image", "dataset"):
        cfg = ModelConfig(backbone="resnet18", mean=[100.0] * 3, std=[40.0] * 3, fpn_channels=32, normalize=mode)
        torch.manual_seed(1)
        m = build_model(cfg).eval()
        with torch.inference_mode():
            outs[mode] = [torch.cat([f.flatten() for f in m.backbone(m.transform.batch(v)).values()]) for v in (x, y)]
        # training goes through the same normalisation, one [C, H, W] image at a time
        batch, _ = m.transform([x[0]])
        assert torch.allclose(batch.tensors[0, :, :96], m.transform.batch(x[:1])[0, :, :96], atol=1e-5)
    a, b = outs["image"]
    assert torch.allclose(a, b, atol=1e-4)
    a, b = outs["dataset"]
    assert not torch.allclose(a, b, atol=1e-2)
    c = ModelConfig(backbone="resnet18", fpn_channels=32)
    assert build_model(c).transform.per_image and c.normalize == NORMALIZE == "image"  # the default, resolved
    z = ModelConfig(backbone="resnet18", normalize="image")
    assert ModelConfig.from_dict({"backbone": "resnet18"}).normalize == "dataset"  # configs before the option
    assert ModelConfig.from_dict(z.to_dict()).normalize == "image"
    with pytest.raises(InputError, match="--normalize 'scene': choose dataset or image"):
        build_model(ModelConfig(normalize="scene"))
