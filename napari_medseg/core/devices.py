"""Compute devices: the one list of choices, and how ``auto`` picks one."""

from __future__ import annotations

import torch

from .defaults import DEVICE_HELP, DEVICES  # noqa: F401 - the one list, re-exported
from .errors import MedsegError


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def check_device_name(name: str) -> str:
    if name not in DEVICES and not str(name).startswith("cuda:"):
        raise MedsegError(f"unknown device '{name}' (use {', '.join(DEVICES)})")
    return name


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; asking for a missing GPU is an error."""
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedsegError("--device cuda was asked for, but no CUDA GPU is available (use --device auto or cpu)")
    if name == "mps" and not _mps_available():
        raise MedsegError("the Apple MPS device is not available here (use auto or cpu)")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX). There, bf16
    convolutions ran 1.7x faster than float32 (brain-t1 on a 1 mm head, AMD EPYC: 0.57 s
    against 0.98 s); elsewhere bf16 is emulated and slower. ``NAPARI_MEDSEG_CPU_BF16=0``
    turns the automatic use off."""
    import os

    if os.environ.get("NAPARI_MEDSEG_CPU_BF16", "1") == "0":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    for probe in probes:
        try:
            if probe is not None and probe():
                return True
        except (RuntimeError, AttributeError):
            continue
    return False


def autocast(device: torch.device, amp: bool | None, training: bool = False):
    """Mixed precision: on CUDA by default (bf16 where supported, else fp16); elsewhere only if asked.

    ``training``: bf16 or nothing, since fp16 gradients underflow without a gradient scaler.
    """
    if device.type == "cuda" and amp is not False:
        if torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cuda", dtype=torch.float16, enabled=not training)
    if device.type == "cpu" and amp:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def uses_amp(device: torch.device, amp: bool | None) -> bool:
    return bool(device.type == "cuda" and amp is not False) or bool(amp)
