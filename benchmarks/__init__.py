"""Benchmarks (`make bench*`, `make experiment-*`): each module is a script; what several of them share is here."""
from __future__ import annotations

import torch

from kdcache.stages import train


def student_logits(student, input_ids: torch.Tensor, positions: torch.Tensor, return_hidden: bool = False):
    """All (N, V) logits where the loss is taken at once (benchmarks, small batches); with return_hidden:
    (logits (N, V), last hidden states (N, H)). Training goes through student_hidden + output_head instead."""
    hidden = train.student_hidden(student, input_ids, positions)            # (N, H)
    logits = student.get_output_embeddings()(hidden).float()        # (N, V)
    return (logits, hidden) if return_hidden else logits
