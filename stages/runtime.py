"""Device and precision choices shared by the stages (no `.cuda()` literals anywhere else)."""
from __future__ import annotations

import contextlib

import torch

from pipeline.errors import KdcacheError


def pick_device(spec: str = "auto") -> torch.device:
    """auto -> cuda when available, else cpu. An explicit cuda request without a GPU is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"device {spec!r} requested but no CUDA device is available: use device=auto or cpu")
    return device


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast on cuda (auto or bf16); plain fp32 otherwise (CPU bf16 matmuls are slow and inexact)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
