"""CUDA: the GPU path gives the CPU path's detections, and trains. Skipped without a CUDA device (CI has none);
``bench/gpu.sh`` runs these on a GPU machine."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.cuda
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@cuda
@pytest.mark.parametrize("amp", ["32", "bf16"])
def test_cuda_detections_match_cpu(tmp_path, amp, monkeypatch):
    from test_detect import assert_same_detections_bf16, make_ckpt

    from geonet.detect import Detector

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # "32" means fp32 convolutions here
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ck = make_ckpt(tmp_path / "m.pt", bands=3, dtype="uint8", chip=256, spread=True)
    x = torch.randint(0, 255, (4, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cpu = Detector(ck, device="cpu", precision="32")(x)
    gpu = Detector(ck, device="cuda", precision=amp)(x)
    assert all(len(a["boxes"]) > 50 for a in cpu)  # the comparison below is not vacuous
    for a, b in zip(cpu, gpu):
        b = {k: v.cpu() for k, v in b.items()}
        if amp == "32":  # other kernels: scores differ by ~1e-6, so boxes tied at the 300-box cap may swap
            assert_same_detections_bf16(a, b, matched=0.98, score=1e-4, iou=0.99)
        else:
            assert_same_detections_bf16(a, b)


@cuda
def test_cuda_training_steps(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_train import _cfg, _scenes

    from geonet.training import train

    rasters, labels = _scenes(tmp_path, n=10, size=128, min_side=10, max_side=24)
    res = train(_cfg(tmp_path, rasters, labels, device="cuda", amp="bf16"), progress=False)
    assert res.device == "cuda" and res.precision == "bf16" and np.isfinite(res.last_metrics.get("AP", 0.0))


@pytest.mark.slow
def test_gpu_bench_dry_run():
    """bench/gpu.sh's code path, at toy sizes on the CPU."""
    import gpu_bench

    gpu_bench.main(["--dry-run", "--workers", "0"])
