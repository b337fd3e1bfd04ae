"""Device and precision choices shared by the stages (no `.cuda()` literals anywhere else)."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from kdcache.pipeline.errors import KdcacheError


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


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Under torchrun (WORLD_SIZE > 1) join the process group from the environment: nccl on cuda (one GPU per
    rank, LOCAL_RANK), gloo on cpu. -> (rank, world size, this rank's device). A single process is (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place sum over the ranks (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor
