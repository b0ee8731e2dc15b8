"""Training: checkpoints, resume, faults. Tiny synthetic scenes, resnet18 at 64-128 px."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from geonet.checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint
from geonet.cli.main import cli
from geonet.errors import InputError
from geonet.training import NonFiniteLoss, TrainConfig, TrainingInterrupted, prepare_data, train
from synth import make_scene, paint, write_raster

FAST = dict(size=64, backbone="resnet18", weights="none", fit_anchors=False, augment="light", amp="32", batch_size=2,
            anchor_sizes=[16, 32, 64, 128, 256], epochs=2,
            limit_train_batches=2, val_fraction=0.25)


def _scenes(tmp_path, n, size, min_side, max_side):
    """Four seeded synthetic scenes and one label file for all of them: ``(rasters, labels)``."""
    frames, rasters = [], []
    for k in range(4):
        r, lab, _ = make_scene(tmp_path, f"s{k}", seed=k, n=n, width=size, height=size, min_side=min_side,
                               max_side=max_side)
        rasters.append(str(r))
        frames.append(gpd.read_file(lab))
    labels = tmp_path / "labels.geojson"
    gpd.GeoDataFrame(pd.concat(frames), crs="EPSG:4326").to_file(labels)
    return rasters, str(labels)


@pytest.fixture
def scenes(tmp_path):
    rasters, labels = _scenes(tmp_path, n=10, size=128, min_side=10, max_side=24)
    return tmp_path, rasters, labels


def _cfg(tmp, rasters, labels, name="run", **kw):
    return TrainConfig.from_options({"output": str(tmp / name), "imagery": rasters, "labels": labels, **FAST, **kw})


def header(path):
    """The checkpoint's header (weights_only=True inside)."""
    return read_checkpoint(path)[0]


def test_run_folder_and_self_describing_checkpoint(scenes):
    tmp, rasters, labels = scenes
    res = train(_cfg(tmp, rasters, labels), progress=False)
    run = Path(res.run_dir)
    for f in ("best.pt", "last.pt", "last.ckpt", "config.yaml", "model_config.json", "metrics.csv", "curves.png",
              "summary.json", "split.json"):
        assert (run / f).exists(), f
    assert list((run / "tb").glob("events.*"))
    ck = header(run / "best.pt")
    assert ck.format_version == FORMAT_VERSION and ck.geonet_version and ck.train_config and ck.metrics and ck.box_stats
    assert ck.classes == ["labels"] and ck.bands == [1, 2, 3] and ck.dtype == "uint8"
    assert ck.gsd == pytest.approx([0.1, 0.1], rel=1e-3) and ck.chip_size == 64
    assert ck.box_stats_m["side"][-1] == pytest.approx(ck.box_stats["side"][-1] * 0.1, rel=1e-2)
    assert len(ck.model_config.mean) == 3 and ck.model_config.anchor_sizes[0] == 16
    model, meta = load_checkpoint(run / "best.pt")  # detection needs nothing else
    assert not model.training and meta.classes == ["labels"]
    split = json.loads((run / "split.json").read_text())
    assert {s["source"] for s in split["train"]}.isdisjoint({s["source"] for s in split["val"]}) and split["val"]
    df = pd.read_csv(run / "metrics.csv")
    assert "val/AP" in df and "val/AP50" in df and "train/loss_epoch" in df


def test_checkpoint_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    p = tmp_path / "evil.pt"
    torch.save({"format": "geonet-detector", "x": Evil()}, p)
    with pytest.raises(InputError, match="not a geonet checkpoint"):
        read_checkpoint(p)
    assert not (tmp_path / "pwned").exists()


def _ctrl_c(at):
    import lightning.pytorch as pl

    class CtrlC(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == at:
                raise KeyboardInterrupt

    return CtrlC()


def _straight_then_cut_and_resumed(scenes, kw, at, match):
    """Train ``straight``; train ``cut`` with Ctrl-C at the start of epoch ``at``, check the interruption, then
    ``--resume`` it. Returns the ``last.pt`` checkpoints of both and their per-epoch logs."""
    from geonet.training import load_run_config

    tmp, rasters, labels = scenes
    train(_cfg(tmp, rasters, labels, "straight", **kw), progress=False)
    with pytest.raises(TrainingInterrupted, match=match) as ei:
        train(_cfg(tmp, rasters, labels, "cut", **kw), progress=False, extra_callbacks=[_ctrl_c(at)])
    assert ei.value.exit_code == 130
    kept = header(tmp / "cut" / "last.pt").epoch
    train(load_run_config(tmp / "cut"), resume=True, progress=False)
    (a, wa), (b, wb) = read_checkpoint(tmp / "straight" / "last.pt"), read_checkpoint(tmp / "cut" / "last.pt")
    for k, v in wa.items():
        assert torch.equal(v, wb[k]), k
    la, lb = (pd.read_csv(tmp / r / "metrics.csv").dropna(subset=["train/loss_epoch"]) for r in ("straight", "cut"))
    return kept, a, b, la, lb


def test_resume_after_ctrl_c_gives_identical_weights(scenes):
    kept, a, b, la, lb = _straight_then_cut_and_resumed(scenes, dict(epochs=3, limit_train_batches=3), 2, "--resume")
    assert kept == 1  # two complete epochs kept
    assert a.epoch == b.epoch == 2
    # the log keeps the epochs before the interruption, once each
    assert list(lb["epoch"]) == list(la["epoch"]) == [0, 1, 2]
    assert np.allclose(lb["train/loss_epoch"], la["train/loss_epoch"])


def test_short_epochs_save_on_validation_epochs_and_resume_from_there(scenes, monkeypatch):
    """With many short epochs the resumable state is saved on validated epochs and the last (not after every
    epoch); Ctrl-C keeps the last saved epoch, says so, and --resume ends with the uninterrupted weights."""
    from geonet.training import callbacks
    from geonet.training import run as run_mod

    monkeypatch.setattr(run_mod, "VALIDATIONS", 2)  # 4 epochs: validate (and save) every 2nd
    monkeypatch.setattr(callbacks, "SAVE_EVERY_S", 1e9)
    saves = []
    real = callbacks.RunCheckpoint._save_resume
    monkeypatch.setattr(callbacks.RunCheckpoint, "_save_resume",
                        lambda self, trainer: (saves.append(trainer.current_epoch), real(self, trainer))[1])
    kept, a, b, la, lb = _straight_then_cut_and_resumed(scenes, dict(epochs=4, limit_train_batches=2), 3,
                                                        "state after 2 complete epoch")
    # before the first step and after epochs 1 and 3 (0-based); the cut run: the same up to its Ctrl-C in epoch 3,
    # whose resume (no save before its first step) saves after epoch 3
    assert saves == [0, 1, 3] + [0, 1] + [3]
    assert kept == 1
    assert a.epoch == b.epoch == 3
    # epoch 2 ran twice (before the Ctrl-C, unsaved, and after --resume); the log keeps it once
    assert list(lb["epoch"]) == list(la["epoch"]) == [0, 1, 2, 3]


def test_save_due():
    from geonet.training.callbacks import save_due

    due = [e for e in range(10) if save_due(e, max_epochs=10, val_every=4, seconds_since_save=0.0, every_s=60)]
    assert due == [3, 7, 9]
    assert save_due(0, max_epochs=10, val_every=4, seconds_since_save=61.0, every_s=60)


def test_ctrl_c_delivered_inside_a_finaliser_still_stops(scenes):
    """A SIGINT that lands in a __del__ would be swallowed by Python; training must still stop."""
    import lightning.pytorch as pl

    class Finaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    class CtrlCInDel(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                Finaliser()  # collected at once: the signal arrives inside __del__

    tmp, rasters, labels = scenes
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp, rasters, labels, "del", epochs=3, limit_train_batches=3), progress=False,
              extra_callbacks=[CtrlCInDel()])
    assert header(tmp / "del" / "last.pt").epoch == 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(scenes):
    tmp, rasters, labels = scenes
    cfg = _cfg(tmp, rasters, labels, epochs=3, limit_train_batches=3, optimizer="sgd", lr=1e9, grad_clip=None,
               warmup_steps=0)
    with pytest.raises(NonFiniteLoss) as ei:
        train(cfg, progress=False)
    msg = str(ei.value)
    assert "at step" in msg and "learning rate" in msg and "\n" not in msg
    # the resumable state written before the first step is still there, untouched
    ck = torch.load(tmp / "run" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 0
    assert not (tmp / "run" / "best.pt").exists() or header(tmp / "run" / "best.pt").epoch >= 0


def test_band_count_mismatch(scenes):
    tmp, rasters, labels = scenes
    four = write_raster(tmp / "two.tif", paint(np.zeros((0, 4)), 128, 128, bands=2),
                        transform=__import__("affine").Affine(0.1, 0, 500000, 0, -0.1, 4500000))
    with pytest.raises(InputError, match="band"):
        train(_cfg(tmp, rasters + [str(four)], labels), progress=False)


def test_degenerate_boxes_dropped_and_counted(scenes):
    tmp, rasters, labels = scenes
    import shapely
    g = gpd.read_file(labels).to_crs("EPSG:32618")  # the rasters' CRS, so a flat box stays exactly flat
    x, y = g.geometry.iloc[0].centroid.coords[0]
    line_like = shapely.box(x, y, x + 2.0, y + 0.05)  # 0.5 px high at 0.1 m: a sliver, not an object
    g2 = gpd.GeoDataFrame(pd.concat([g, gpd.GeoDataFrame({"geometry": [line_like]}, crs=g.crs)]), crs=g.crs)
    p = tmp / "deg.geojson"
    g2.to_file(p)
    res = train(_cfg(tmp, rasters, str(p), epochs=1, limit_train_batches=1), progress=False)
    assert res.n_degenerate == 1


def test_cli_train_yaml_config_flags_override(scenes):
    tmp, rasters, labels = scenes
    conf = tmp / "c.yaml"
    conf.write_text(yaml.safe_dump({"imagery": rasters, "labels": labels, "size": 64, "backbone": "resnet18",
                                    "weights": "none",
                                    "epochs": 5, "batch_size": 2, "anchor_sizes": [16, 32, 64, 128, 256],
                                    "val_fraction": 0.25, "limit_train_batches": 1}))
    res = CliRunner().invoke(cli, ["train", "--config", str(conf), "--epochs", "1", "-o", str(tmp / "r"),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((tmp / "r" / "config.yaml").read_text())
    assert saved["optim"]["epochs"] == 1 and saved["model"]["backbone"] == "resnet18"
    assert saved["chip"]["val_fraction"] == 0.25
    assert "best epoch" in res.output
    res = CliRunner().invoke(cli, ["train", "--config", str(conf), "--epochs", "1", "-o", str(tmp / "r"),
                                   "--overwrite", "--json", "--fpn-channels", "32", "--normalize", "image"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["epochs_run"] == 1 and summary["run_dir"].endswith("r") and "\r" not in res.output
    mc = header(tmp / "r" / "best.pt").model_config  # the model options reach the checkpoint and the loaded model
    assert mc.fpn_channels == 32 and mc.normalize == "image"
    model, _ = load_checkpoint(tmp / "r" / "best.pt")
    assert model.transform.per_image and model.head.classification_head.cls_logits.in_channels == 32


@pytest.mark.parametrize("case", ["no-labels", "bad-key", "exists", "fpn-channels"])
def test_cli_train_bad_input(scenes, case):
    tmp, rasters, labels = scenes
    args = ["train", "--imagery", rasters[0], "--labels", labels, "-o", str(tmp / "r"), "--no-progress"]
    if case == "no-labels":
        p = tmp / "empty.geojson"
        p.write_text('{"type": "FeatureCollection", "features": []}')
        args[4] = str(p)
        needle = "no features"
    elif case == "bad-key":
        conf = tmp / "c.yaml"
        conf.write_text("epochz: 3\n")
        args += ["--config", str(conf)]
        needle = "unknown keys ['epochz']"
    elif case == "fpn-channels":
        args += ["--fpn-channels", "4"]
        needle = "--fpn-channels must be between 8 and 1024"
    else:
        (tmp / "r").mkdir()
        (tmp / "r" / "x").write_text("x")
        needle = "--overwrite"
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output


@pytest.mark.slow
def test_sigint_leaves_resumable_checkpoint(scenes):
    tmp, rasters, labels = scenes
    run = tmp / "sig"
    cmd = [sys.executable, "-m", "geonet.cli.main", "train", "--labels", labels, "-o", str(run), "--size", "64",
           "--backbone", "resnet18", "--weights", "none", "--no-fit-anchors", "--batch-size", "2",
           "--anchor-sizes", "16,32,64,128,256", "--epochs", "40",
           "--limit-train-batches", "2", "--no-progress"]
    for r in rasters:
        cmd += ["--imagery", r]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (run / "last.pt").exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.2)
    assert (run / "last.pt").exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    ck = torch.load(run / "last.ckpt", weights_only=True)
    assert ck["epoch"] >= 0
    res = CliRunner().invoke(cli, ["train", "--resume", "-o", str(run), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert header(run / "last.pt").epoch == 39


@pytest.mark.slow
def test_detector_learns_synthetic_objects(tmp_path):
    """The loss falls and validation AP50 rises far above chance on bright rectangles (~90 steps)."""
    rasters, labels = _scenes(tmp_path, n=20, size=256, min_side=12, max_side=30)
    res = train(_cfg(tmp_path, rasters, labels, size=128, batch_size=4, epochs=30, limit_train_batches=None),
                progress=False)
    df = pd.read_csv(Path(res.run_dir) / "metrics.csv")
    loss = df.dropna(subset=["train/loss_epoch"])["train/loss_epoch"].to_numpy()
    assert loss[-3:].mean() < 0.7 * loss[:2].mean()
    assert res.best_metrics["AP50"] > 0.3
    op = header(Path(res.run_dir) / "best.pt").operating_point
    assert op.iou == 0.5 and 0.05 <= op.score_thresh < 1 and op.f1 > 0.3


def test_train_from_chip_folder_and_voc(scenes):
    tmp, rasters, labels = scenes
    res = CliRunner().invoke(cli, ["chip", "--imagery", rasters[0], "--imagery", rasters[1], "--labels", labels,
                                   "-o", str(tmp / "chips"), "--size", "64", "--split", "val=0.5"])
    assert res.exit_code == 0, res.output
    r = train(TrainConfig.from_options(dict(output=str(tmp / "from_chips"), chips=str(tmp / "chips"), weights="none",
                                            backbone="resnet18", epochs=1, batch_size=2, limit_train_batches=1,
                                            anchor_sizes=[16, 32, 64, 128, 256])), progress=False)
    assert r.n_val > 0 and header(tmp / "from_chips" / "best.pt").chip_size == 64
    assert len(gpd.read_file(tmp / "from_chips" / "val_area.geojson")) == 1  # chips carry their georeferencing
    # validation ground truth uses the image ids the samples carry (the chips' COCO ids, not positions)
    ann = tmp / "chips" / "annotations.json"
    coco = json.loads(ann.read_text())
    for im in coco["images"]:
        im["id"] += 100
    for a in coco["annotations"]:
        a["image_id"] += 100
    ann.write_text(json.dumps(coco))
    data = prepare_data(TrainConfig.from_options({"output": "unused", "chips": str(tmp / "chips")}))
    gt_ids = sorted(im["id"] for im in data.val_gt["images"])
    assert gt_ids and min(gt_ids) > 100
    assert gt_ids == sorted(int(data.val[i][1]["image_id"]) for i in range(len(data.val)))
    # Pascal VOC (not georeferenced): PNG + XML
    from PIL import Image
    voc = tmp / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        img = rng.integers(0, 80, (96, 96, 3)).astype(np.uint8)
        img[20:50, 30:60] = 230
        Image.fromarray(img).save(voc / "JPEGImages" / f"i{k}.png")
        (voc / "Annotations" / f"i{k}.xml").write_text(
            f"<annotation><filename>i{k}.png</filename><object><name>pool</name><bndbox><xmin>31</xmin>"
            "<ymin>21</ymin><xmax>60</xmax><ymax>50</ymax></bndbox></object></annotation>")
    r = train(TrainConfig.from_options(dict(output=str(tmp / "from_voc"), voc=str(voc), backbone="resnet18", epochs=1,
                                            weights="none",
                                            batch_size=2, anchor_sizes=[16, 32, 64, 128, 256], val_fraction=0.25)),
              progress=False)
    ck = header(tmp / "from_voc" / "best.pt")
    assert ck.classes == ["pool"] and ck.gsd is None and r.n_val == 1


def test_resume_warns_only_about_options_that_differ():
    cfg = TrainConfig.from_options(dict(output="x", imagery=["a.tif"], epochs=120, batch_size=4, amp="bf16",
                                        val_fraction=0.2, anchor_sizes=[32.0, 64.0]))
    assert cfg.differences({"epochs": 120, "amp": "bf16", "imagery": ["a.tif"], "val_fraction": 0.2,
                            "anchor_sizes": [32, 64]}) == []
    assert cfg.differences({"epochs": 200, "imagery": ["b.tif"], "anchor_sizes": [16, 64]}) == [
        "epochs", "imagery", "anchor_sizes"]


def test_config_round_trip_and_old_flat_files(tmp_path):
    """config.yaml is nested; the flat files of format 1 still load (for --resume of old runs)."""
    from geonet.training import load_run_config

    cfg = TrainConfig.from_options(dict(output=str(tmp_path), imagery=["a.tif"], labels="l.shp", size=256, lr=1e-3,
                                        backbone="resnet18", anchor_sizes=[16, 32, 64, 128, 256], seed=3))
    d = cfg.to_dict()
    assert d["chip"]["size"] == 256 and d["optim"]["lr"] == 1e-3 and d["model"]["backbone"] == "resnet18"
    assert "mean" not in d["model"] and "seed" not in d["chip"] and d["seed"] == 3
    assert TrainConfig.from_dict(d) == cfg
    flat = {"output": str(tmp_path), "imagery": ["a.tif"], "labels": "l.shp", "size": 256, "lr": 1e-3,
            "backbone": "resnet18", "anchor_sizes": [16, 32, 64, 128, 256], "seed": 3, "val_fraction": 0.2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(flat))
    assert load_run_config(tmp_path) == cfg
    with pytest.raises(InputError, match="unknown keys"):
        TrainConfig.from_dict({"chip": {"sise": 3}})


def test_scale_range_option(tmp_path):
    """--scale-range sets the scale jitter of the augmentation, survives config.yaml, and is checked."""
    from geonet.augment import OverheadAugment

    cfg = TrainConfig.from_options(dict(output=str(tmp_path), imagery=["a.tif"], labels="l.shp",
                                        scale_range=[0.5, 2]))
    assert cfg.scale_range == (0.5, 2.0)
    d = cfg.to_dict()
    assert yaml.safe_load(yaml.safe_dump(d))["scale_range"] == [0.5, 2.0]
    assert TrainConfig.from_dict(d) == cfg
    assert OverheadAugment.for_training(strength="strong", scale=cfg.scale_range).scale == (0.5, 2.0)
    assert OverheadAugment.for_training(strength="strong").scale == (0.8, 1.25)
    aug = OverheadAugment.for_training(strength="strong", scale=(2.0, 2.0 + 1e-9))  # resizes by 2
    img = torch.zeros(3, 40, 40)
    tgt = {"boxes": torch.tensor([[4.0, 4.0, 14.0, 24.0]]), "labels": torch.ones(1, dtype=torch.int64),
           "ignore": torch.zeros(0, 4)}
    out, t = aug(img, tgt, torch.Generator().manual_seed(0))
    assert out.shape[-2:] == (80, 80)
    wh = t["boxes"][0, 2:] - t["boxes"][0, :2]
    assert sorted(wh.tolist()) == pytest.approx([20.0, 40.0], abs=0.01)  # twice the size, maybe rotated
    for bad in ([0.05, 2], [2, 0.5], [0.5, 1, 2]):
        with pytest.raises(InputError, match="--scale-range"):
            TrainConfig.from_options(dict(output=str(tmp_path), imagery=["a.tif"], labels="l.shp",
                                          scale_range=bad)).validate()
    with pytest.raises(InputError, match="augment none"):
        TrainConfig.from_options(dict(output=str(tmp_path), imagery=["a.tif"], labels="l.shp", scale_range=[0.5, 2],
                                      augment="none")).validate()


def test_val_area_is_the_ground_of_the_val_split(scenes):
    """val_area.geojson covers exactly the val windows: the --aoi for a held-out evaluation."""
    import shapely

    from geonet.training import split_listing, val_area

    tmp, rasters, labels = scenes
    data = prepare_data(TrainConfig.from_options(dict(output="unused", imagery=rasters, labels=labels, size=64,
                                                      val_fraction=0.25)))
    area = val_area(data)
    val_sources = {Path(v["source"]).name for v in split_listing(data)["val"]}
    assert val_sources and area is not None and area.area > 0
    for r in rasters:  # each scene is 128 px at 0.1 m: inside the area iff it is a val scene
        from geonet.raster import describe_raster
        from geonet.georef import to_crs

        info = describe_raster(r)
        centre = to_crs(np.array([info.footprint().centroid], dtype=object), info.crs, "EPSG:4326")[0]
        assert shapely.contains(area, centre) == (Path(r).name in val_sources)



def test_fitted_anchors_cover_rotated_boxes():
    """Tall boxes (h/w 3-4.5) turn wide under the 90-degree rotations: the fitted ratios must cover both."""
    from geonet.anchors import anchor_coverage
    from geonet.training.data import TrainData
    from geonet.training.run import model_config_for

    rng = np.random.default_rng(0)
    w = rng.uniform(8, 14, 200)
    h = w * rng.uniform(3, 4.5, 200)
    xy = rng.uniform(0, 300, (200, 2))
    boxes = np.column_stack([xy, xy + np.column_stack([w, h])])
    data = TrainData(train=None, val=None, classes=["a"], in_channels=3, bands=[1, 2, 3], dtype="uint8", nodata=None,
                     gsd=None, chip_size=512, val_gt=None, n_train_boxes=200, n_degenerate=0, box_stats={},
                     train_boxes=boxes)
    cfg = TrainConfig.from_options({"fit_anchors": True})
    mc = model_config_for(cfg, data, [0, 0, 0], [1, 1, 1])
    rotated = boxes[:, [1, 0, 3, 2]]
    cov_up, _ = anchor_coverage(boxes, mc, (512, 512))
    cov_rot, _ = anchor_coverage(rotated, mc, (512, 512))
    assert min(mc.anchor_ratios) < 1 < max(mc.anchor_ratios)
    assert cov_up > 0.6 and cov_rot > 0.6, (mc.anchor_ratios, cov_up, cov_rot)


def test_validation_ignore_regions_keep_their_class(tmp_path):
    """A class-2 detection on a class-2 ignore region is ignored, not a false positive (class-2 AP50 1.0)."""
    from geonet.datasets import ChipDataset
    from geonet.metrics import coco_metrics
    from geonet.training.data import gt_coco

    write_raster(tmp_path / "a.tif", paint(np.zeros((0, 4)), 64, 64))
    coco = {"images": [{"id": 1, "file_name": "a.tif", "width": 64, "height": 64}],
            "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "truck"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 30, 12, 12], "iscrowd": 0},
                {"id": 3, "image_id": 1, "category_id": 2, "bbox": [50, 2, 14, 8], "iscrowd": 1}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    ds = ChipDataset(tmp_path / "ann.json")
    gt = gt_coco(ds, ds.classes)
    assert [a["category_id"] for a in gt["annotations"] if a["iscrowd"]] == [2]
    dets = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 2, "bbox": [30, 30, 12, 12], "score": 0.8},
            {"image_id": 1, "category_id": 2, "bbox": [50, 2, 14, 8], "score": 0.95}]  # on the truck ignore region
    m = coco_metrics(gt, dets)
    assert m["per_class"]["truck"]["AP50"] == pytest.approx(1.0)


@pytest.mark.slow
def test_bf16_training_on_small_chips_stays_finite(tmp_path):
    """bf16 on the CPU gave NaN weight gradients in the P7 conv on 1 x 1 maps (64-128 px chips) by step ~28;
    the P6/P7 block now runs in fp32."""
    import torch as _torch

    from geonet.device import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU")
    rasters, labels = _scenes(tmp_path, n=10, size=128, min_side=10, max_side=24)
    res = train(_cfg(tmp_path, rasters, labels, amp="bf16", epochs=None, steps=60, limit_train_batches=None),
                progress=False)
    _, state = read_checkpoint(Path(res.run_dir) / "last.pt")
    assert all(_torch.isfinite(v.float()).all() for v in state.values())


def test_epoch_sampler_splits_across_processes(monkeypatch):
    """With a process group: equal shares (padded with repeats), every image in some share, the same order as
    one process for the same global batch."""
    from geonet.training.data import EpochSampler

    for n, world in ((11, 3), (1, 2), (8, 2)):
        shares = []
        for rank in range(world):
            monkeypatch.setattr(EpochSampler, "_group", staticmethod(lambda rank=rank: (rank, world)))
            s = EpochSampler(n, seed=5)
            s.set_epoch(2)
            shares.append([i for i, _ in s])
            assert len(shares[-1]) == len(s) == -(-n // world)
        assert set(i for share in shares for i in share) == set(range(n))
        monkeypatch.setattr(EpochSampler, "_group", staticmethod(lambda: (0, 1)))
        single = EpochSampler(n, seed=5)
        single.set_epoch(2)
        interleaved = [share[k] for k in range(len(shares[0])) for share in shares][:n]
        assert interleaved == [i for i, _ in single]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """DDP over 2 CPU processes (gloo), batch 2 each, against 1 process with batch 4: the same optimiser steps
    (the schedule counts steps after the split) and validation AP within 0.02; rank 0 alone writes."""
    rasters, labels = _scenes(tmp_path, n=20, size=256, min_side=12, max_side=30)
    results = {}
    for name, extra in (("one", ["--batch-size", "4"]), ("ddp", ["--batch-size", "2", "--devices", "2"])):
        run = tmp_path / name
        cmd = [sys.executable, "-m", "geonet.cli.main", "train", "--labels", labels, "-o", str(run), "--size", "128",
               "--backbone", "resnet18", "--weights", "none", "--no-fit-anchors", "--augment", "light",
               "--anchor-sizes", "16,32,64,128,256", "--epochs", "24", "--amp", "32", "--device", "cpu",
               "--split", "val=0.25", "--no-progress", "--json", "--normalize", "dataset", *extra]
        # --normalize dataset: the 0.02 AP tolerance was set with it (with the per-image default the two runs
        # differed by 0.027 AP and 0.001 AP50: sampling noise, per-image statistics do not depend on the split)
        for r in rasters:
            cmd += ["--imagery", r]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(proc.stdout)  # one report: rank 0's
        results[name]["steps"] = torch.load(run / "last.ckpt", weights_only=True)["global_step"]
        assert not list(run.glob(".*tmp*")) and (run / "summary.json").exists()
    one, ddp = results["one"], results["ddp"]
    assert ddp["processes"] == 2 and ddp["steps"] == one["steps"] > 0
    assert one["best_metrics"]["AP50"] > 0.2, (one["best_metrics"], ddp["best_metrics"])  # it learned: the comparison means something
    assert abs(ddp["best_metrics"]["AP"] - one["best_metrics"]["AP"]) <= 0.02, (one["best_metrics"],
                                                                                ddp["best_metrics"])


@pytest.mark.slow
def test_ddp_ctrl_c_then_resume(scenes):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) stops both DDP processes with exit 130 and one
    error line; --resume with the saved configuration (2 processes) finishes the schedule."""
    tmp, rasters, labels = scenes
    run = tmp / "ddp"
    cmd = [sys.executable, "-m", "geonet.cli.main", "train", "--labels", labels, "-o", str(run), "--size", "64",
           "--backbone", "resnet18", "--weights", "none", "--no-fit-anchors", "--batch-size", "2", "--amp", "32",
           "--anchor-sizes", "16,32,64,128,256", "--epochs", "30", "--device", "cpu", "--devices", "2",
           "--no-progress"]
    for r in rasters:
        cmd += ["--imagery", r]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not (run / "last.pt").exists() and time.time() - t0 < 300 and proc.poll() is None:
        time.sleep(0.2)
    assert (run / "last.pt").exists(), proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert err.count("Error: training interrupted") == 1 and "Traceback" not in err
    assert torch.load(run / "last.ckpt", weights_only=True)["epoch"] < 29
    res = subprocess.run([sys.executable, "-m", "geonet.cli.main", "train", "--resume", "-o", str(run), "--no-progress",
                          "--json"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["processes"] == 2
    ck = torch.load(run / "last.ckpt", weights_only=True)
    assert ck["epoch"] == 29 and header(run / "last.pt").epoch == 29
