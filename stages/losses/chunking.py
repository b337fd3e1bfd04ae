"""One chunking helper: evaluate a loss chunk by chunk along positions, with activation checkpointing.

A loss over (N, V) logits builds several (N, V) float32 intermediates (upcast logits, log-softmax, teacher
distribution, ...). autograd would keep them all until backward; for N = B*T large that dominates memory.
`chunked_sum` runs the loss on row chunks under torch.utils.checkpoint (non-reentrant): only each chunk's inputs
(views into the caller's tensors) are saved, and a chunk's intermediates are rebuilt during backward one chunk at a
time. Peak loss memory is then O(chunk_size * V), independent of N.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from kdcache.stages.losses.targets import SparseTarget


def _rows(arg, sl: slice):
    """Row-slice tensors and sparse targets; pass everything else (None, numbers) through."""
    return arg[sl] if isinstance(arg, (torch.Tensor, SparseTarget)) else arg


def chunked_sum(fn: Callable[..., torch.Tensor], n_rows: int, chunk_size: int, *args,
                checkpoint_chunks: bool = True, **kwargs) -> torch.Tensor:
    """sum over chunks c of fn(*[a[c] for a in args], **kwargs).

    fn must be additive over rows (it returns sums, e.g. a scalar or a vector of per-part sums, never means).
    args: tensors / SparseTargets with n_rows leading rows (sliced) or anything else (passed as is).
    Chunks are checkpointed when a gradient will be needed and checkpoint_chunks is set; a caller whose fn keeps
    nothing vocab-sized for backward (the fused sparse paths) can turn it off and skip the recomputation.
    Under no_grad (evaluation) chunks always run plainly.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    use_checkpoint = (checkpoint_chunks and torch.is_grad_enabled()
                      and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))
    total = None
    for start in range(0, max(n_rows, 1), chunk_size):  # max(.., 1): an empty batch still yields fn's zero sums
        sl = slice(start, min(start + chunk_size, n_rows))
        part = [_rows(a, sl) for a in args]
        out = checkpoint(fn, *part, use_reentrant=False, **kwargs) if use_checkpoint else fn(*part, **kwargs)
        total = out if total is None else total + out
    return total
