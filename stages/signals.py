"""Sparse teacher signals: extract them from logits (precompute) and turn stored arrays back into targets (train)."""
from __future__ import annotations

import numpy as np
import torch


def topk_signal(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (..., V) -> support ids (..., k) int64 sorted by probability, their log-probs (..., k) float32,
    and the log-normaliser logsumexp(logits) (...,) float32, so exact support probabilities and the tail mass
    1 - sum(exp(logprobs)) are recoverable."""
    logits = logits.float()
    lognorm = torch.logsumexp(logits, dim=-1)              # (...,)
    values, ids = torch.topk(logits, k, dim=-1)             # (..., k), sorted descending
    return ids, values - lognorm.unsqueeze(-1), lognorm


def to_numpy_signal(ids: torch.Tensor, logprobs: torch.Tensor, lognorm: torch.Tensor) -> dict[str, np.ndarray]:
    return {"ids": ids.cpu().numpy(), "logprobs": logprobs.cpu().numpy(), "lognorm": lognorm.cpu().numpy()}


def sparse_target(ids: torch.Tensor, logprobs: torch.Tensor, lognorm: torch.Tensor):
    """Batched signal tensors (B, T, K)/(B, T) -> a SparseTarget over flattened positions (B*T, K)."""
    from stages.losses.targets import SparseTarget

    k = ids.shape[-1]
    return SparseTarget(ids=ids.reshape(-1, k).long(), logprobs=logprobs.reshape(-1, k).float(),
                        lognorm=lognorm.reshape(-1).float())
