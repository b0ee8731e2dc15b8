"""``--weights torchgeo:ENUM.MEMBER``: TorchGeo's multispectral ResNet weights as the backbone, through TorchGeo's
weights enum and the torch hub cache. The test writes a state dict in TorchGeo's layout (timm ResNet keys, the
weights' band count) into a temporary torch hub cache; nothing is downloaded."""

import json
import os

import pytest
import torch
import torchvision
from click.testing import CliRunner

from geonet.cli.main import cli
from geonet.errors import InputError
from geonet.model import ModelConfig, build_model
from synth import make_scene

tgm = pytest.importorskip("torchgeo.models", reason="TorchGeo is not installed (pip install 'geonet[torchgeo]')")

NAME = "ResNet18_Weights.LANDSAT_OLI_SR_MOCO"  # 7 Landsat 8/9 surface-reflectance bands, values / 255


@pytest.fixture()
def cached(tmp_path, monkeypatch):
    """TorchGeo-layout weights for NAME placed in a temporary torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    member = getattr(tgm.ResNet18_Weights, NAME.split(".")[1])
    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = torch.nn.Conv2d(7, 64, 7, 2, 3, bias=False)
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}  # timm with num_classes=0
    path = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(member.url)
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    return sd


def cfg7(**kw):
    return ModelConfig(**{"backbone": "resnet18", "num_classes": 1, "in_channels": 7, "mean": [0.0] * 7,
                          "std": [255.0] * 7, **kw})


def test_backbone_gets_the_weights_from_the_hub_cache(cached):
    model = build_model(cfg7(), weights=f"torchgeo:{NAME}")
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, cached["conv1.weight"]) and body.conv1.in_channels == 7
    assert torch.equal(body.layer4[1].conv2.weight, cached["layer4.1.conv2.weight"])
    # pretrained: frozen batch norm and 3 trainable stages, the first conv their own (not adapted from RGB)
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad


def test_training_takes_the_weights_bands_and_normalisation(cached, tmp_path):
    raster, labels, _ = make_scene(tmp_path, "ls", width=160, height=160, n=10, bands=7, dtype="uint8", seed=3)
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--imagery", str(raster), "--labels", str(labels), "-o", str(run),
                                   "--backbone", "resnet18", "--weights", f"torchgeo:{NAME}", "--size", "64",
                                   "--steps", "2", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    mc = json.loads((run / "model_config.json").read_text())
    assert mc["in_channels"] == 7 and mc["mean"] == [0.0] * 7 and mc["std"] == [255.0] * 7
    assert mc["normalize"] == "dataset"  # the weights' own normalisation, not the per-image default
    # 3-band imagery with 7-band weights: one line naming both lists
    rgb, rgb_labels, _ = make_scene(tmp_path, "rgb", width=160, height=160, n=10, bands=3, seed=4)
    res = CliRunner().invoke(cli, ["train", "--imagery", str(rgb), "--labels", str(rgb_labels), "-o",
                                   str(tmp_path / "r2"), "--backbone", "resnet18", "--weights", f"torchgeo:{NAME}",
                                   "--size", "64", "--steps", "2", "--no-progress"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "expects 7 bands ['SR_B1', 'SR_B2'" in res.output and "gives 3 band(s)" in res.output
    assert "Fix: pass --bands with 7 band numbers" in res.output


def test_wrong_backbone_unknown_member_and_offline_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(InputError, match="are for resnet18, not --backbone resnet50"):
        build_model(cfg7(backbone="resnet50"), weights=f"torchgeo:{NAME}")
    with pytest.raises(InputError, match="ResNet18_Weights has no SENTINEL9; it has \\['LANDSAT_TM_TOA_MOCO'"):
        build_model(cfg7(), weights="torchgeo:ResNet18_Weights.SENTINEL9")
    with pytest.raises(InputError, match="give torchgeo:ENUM.MEMBER"):
        build_model(cfg7(), weights="torchgeo:Nope")
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(InputError) as exc:
        build_model(cfg7(), weights=f"torchgeo:{NAME}")
    msg = str(exc.value)
    assert "resnet18_landsat_oli_sr_moco-660e82ed.pth is not in the torch hub cache" in msg
    assert str(tmp_path / "empty" / "hub" / "checkpoints") in msg and "\n" not in msg
