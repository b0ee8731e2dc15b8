"""Where and in which precision the model runs: one rule for training and detection.

``device``: ``"auto"`` (CUDA when present, else the CPU), ``"cpu"`` or ``"cuda"``.
``amp`` (precision): ``"auto"``, ``"32"`` (fp32), ``"bf16"`` or ``"16"`` (fp16) autocast. ``auto`` is bf16
on a CUDA device that supports it (fp16 otherwise), bf16 on a CPU with native bf16 instructions
(AVX512-BF16 or AMX: about 1.9x faster than fp32 on the 2-core AVX512-BF16 machines here) and fp32 on
other CPUs, where bf16 is emulated and slower.
"""

from __future__ import annotations

import torch

from geonet.errors import InputError

__all__ = ["AMP_CHOICES", "DEVICE_CHOICES", "resolve_device", "resolve_precision", "autocast_dtype",
           "lightning_precision", "cpu_has_native_bf16"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")
AMP_CHOICES = ("auto", "32", "bf16", "16")


def resolve_device(device: str) -> torch.device:
    """The ``torch.device`` for ``--device``.

    Raises:
        InputError: an unknown name, or ``cuda`` on a machine without a CUDA device.
    """
    if device not in DEVICE_CHOICES:
        raise InputError(f"--device {device!r}: choose auto, cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available.", fix="use --device auto or cpu.")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def resolve_precision(amp: str, device: torch.device) -> str:
    """``--amp`` resolved for ``device``: ``"32"``, ``"bf16"`` or ``"16"`` (module docstring).

    Raises:
        InputError: an unknown value.
    """
    if amp not in AMP_CHOICES:
        raise InputError(f"--amp {amp!r}: choose auto, 32, bf16 or 16.")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "16"
    return "bf16" if cpu_has_native_bf16() else "32"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU runs bf16 matrix products natively (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    return False


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of a resolved precision (``None``: no autocast, fp32)."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)


def lightning_precision(precision: str) -> str:
    """Lightning's ``Trainer(precision=...)`` name of a resolved precision."""
    return {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}[precision]
