"""``geonet detect --engine ray``: a local Ray instance (2 CPUs); outputs equal the plain command's whatever the
number of actors, a killed worker is retried, ``--resume`` skips finished scenes."""

import os
import sys

import geopandas as gpd
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from geonet.checkpoint import CheckpointHeader, save_checkpoint
from geonet.cli.main import cli
from geonet.detect import DetectConfig, detect
from geonet.model import ModelConfig, build_model
from test_detect import scene

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'geonet[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def busy_ckpt(path):
    """A random ResNet-18 RetinaNet whose classification bias is 0: scores spread over (0, 1), many boxes."""
    cfg = ModelConfig(backbone="resnet18", num_classes=1, in_channels=1, mean=[100.0], std=[50.0],
                      anchor_sizes=(16, 32, 64, 128, 256))
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)
    stats = [5, 8, 20, 35, 40]
    save_checkpoint(path, model, CheckpointHeader(
        model_config=cfg, classes=["thing"], bands=[1], dtype="uint16", gsd=[0.1, 0.1], chip_size=128,
        box_stats={"width": stats, "height": stats, "side": stats}, metrics={}, epoch=0))
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    ck = busy_ckpt(tmp / "m.pt")
    rng = np.random.default_rng(3)
    scenes = []
    for k, (w, h) in enumerate([(300, 260), (420, 300), (260, 260)]):
        xy = rng.uniform(0, min(w, h) - 40, size=(6, 2))
        objects = np.concatenate([xy, xy + rng.uniform(10, 35, size=(6, 2))], axis=1)
        scenes.append(str(scene(tmp, objects, w, h, name=f"s{k}.tif")))
    cfg = dict(model=str(ck), amp="32", score_thresh=0.3, workers=1, batch_size=2, tile=128)
    plain = tmp / "plain"
    rep = detect(scenes, str(plain) + os.sep, DetectConfig(**cfg), show_progress=False)
    assert rep.ok and sum(r.detections for r in rep.scenes) > 30  # enough boxes for the comparison to mean something
    return tmp, scenes, cfg, plain


def features(path):
    g = gpd.read_file(path)
    return g.geometry.bounds.to_numpy(), g["score"].to_numpy(), g["label"].to_numpy()


def assert_same(a_dir, b_dir, names):
    """The same boxes (within one step of the GeoJSON's 7-decimal rounding: 1e-7 degrees, ~1 cm), scores and
    labels, in any order.

    Each box is matched to its nearest in the other file: sorting both by coordinates is not enough, since a
    Ray actor runs torch on its own thread count, and on an AVX2 CPU that moved coordinates by ~1e-9 degrees,
    which swapped two boxes with nearly equal sort keys, and moved one rounded coordinate by one 1e-7 step."""
    for n in names:
        (ba, sa, la), (bb, sb, lb) = features(a_dir / n), features(b_dir / n)
        assert len(sa) == len(sb), n
        d = np.abs(ba[:, None, :] - bb[None, :, :]).max(-1)  # [N, N] degrees
        j = d.argmin(1)
        assert d.min(1).max() < 1.5e-7 and len(set(j.tolist())) == len(j), n
        np.testing.assert_allclose(sa, sb[j], atol=1e-5)
        assert (la == lb[j]).all()


NAMES = ["s0.geojson", "s1.geojson", "s2.geojson"]


@pytest.mark.slow
@pytest.mark.parametrize("actors", [1, 2])
def test_ray_equals_plain_detect(local_ray, job, actors):
    tmp, scenes, cfg, plain = job
    out = tmp / f"ray{actors}"
    rep = detect(scenes, str(out) + os.sep, DetectConfig(**cfg, engine="ray", actors=actors))
    assert rep.ok and len(rep.scenes) == 3
    assert_same(plain, out, NAMES)


@pytest.mark.slow
def test_ray_killed_worker_is_retried_and_resume_skips(local_ray, job):
    from geonet.ray_engine import detect_ray

    tmp, scenes, cfg, plain = job
    marker = tmp / "died"

    def die_once(scene_path, band):  # pickled by value into the actor: the worker process dies on its first s1
        if scene_path.endswith("s1.tif") and not marker.exists():
            marker.touch()
            os._exit(1)

    out = tmp / "killed"
    rep = detect_ray(scenes, str(out) + os.sep, DetectConfig(**cfg, engine="ray", actors=2), before_scene=die_once)
    assert marker.exists(), "the worker was not killed"
    assert rep.ok and len(rep.scenes) == 3
    assert_same(plain, out, NAMES)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rep = detect(scenes, str(out) + os.sep, DetectConfig(**cfg, engine="ray", resume=True))
    assert rep.skipped_done == 3 and rep.scenes == []
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


@pytest.fixture(scope="module")
def big(job):
    """A scene of 56 tiles (8 x 7), detected by the plain command."""
    tmp, _, cfg, _ = job
    rng = np.random.default_rng(11)
    xy = rng.uniform(0, 540, size=(30, 2))
    s = scene(tmp, np.concatenate([xy, xy + rng.uniform(10, 35, size=(30, 2))], axis=1), 700, 600, name="big.tif")
    ref = tmp / "big-plain"
    rep = detect([str(s)], str(ref) + os.sep, DetectConfig(**cfg), show_progress=False)
    assert rep.ok and rep.scenes[0].tiles + rep.scenes[0].tiles_skipped == 56 and rep.scenes[0].detections > 30
    return s, ref


@pytest.mark.slow
def test_ray_large_scene_in_bands_equals_plain_killed_band_retried(local_ray, job, big):
    from geonet.ray_engine import detect_ray

    tmp, scenes, cfg, plain = job
    big_scene, ref = big
    marker, seen = tmp / "band-died", tmp / "bands-seen"
    seen.mkdir()

    def die_in_band_2(scene_path, band):  # pickled into the actors: the first try of band 2 kills its worker
        if band is not None:
            (seen / str(band)).touch()
        if band == 2 and not marker.exists():
            marker.touch()
            os._exit(1)

    out = tmp / "bands"
    rep = detect_ray([str(big_scene), scenes[0]], str(out) + os.sep,
                     DetectConfig(**cfg, engine="ray", actors=2, band_tiles=10), before_scene=die_in_band_2)
    assert marker.exists(), "the worker was not killed"
    assert sorted(int(p.name) for p in seen.iterdir()) == list(range(6))  # 56 tiles, 5 batches of 2 per band
    assert rep.ok and len(rep.scenes) == 2
    assert_same(ref, out, ["big.geojson"])
    assert_same(plain, out, ["s0.geojson"])
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    rep = detect_ray([str(big_scene), scenes[0]], str(out) + os.sep,
                     DetectConfig(**cfg, engine="ray", band_tiles=10, resume=True))
    assert rep.skipped_done == 2 and rep.scenes == []


def test_engine_ray_without_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    from test_detect import make_ckpt

    ck = make_ckpt(tmp_path / "m.pt")
    s = scene(tmp_path, np.array([[10.0, 10, 30, 30]]), 200, 200)
    res = CliRunner().invoke(cli, ["detect", str(s), "-m", str(ck), "-o", str(tmp_path / "o.geojson"), "--engine", "ray"])
    assert res.exit_code == 2 and "pip install 'geonet[ray]'" in res.output and "Traceback" not in res.output
