"""The student's side of a sparse loss, fused: support logits, full-vocab normaliser, tail normaliser.

Every bucket-tail loss and the ground-truth CE need only three things from the (N, V) student logits:
z_S (the logits at K support ids), logsumexp over the vocab and logsumexp over the ids off the support.
Written with plain autograd this builds a chain of (N, V) intermediates (upcast, /tau, scatter copy, two logsumexp
backwards, gather backward, a sum of (N, V) gradients) that dominated the loss's cost. `support_logsumexp` computes
the three with the same forward ops but a hand-written backward that makes one (N, V) gradient in place:

    d/dx_v = g_lse * softmax(x)_v + g_tail * [v not in S] exp(x_v - lse_tail) + sum_{k: ids_k = v} g_s_k

with x = z / tau. It saves only the input logits (no copy) and (N,)-sized results, so nothing vocab-sized is kept
for backward even without checkpointing. Not twice differentiable.
"""
from __future__ import annotations

import math

import torch


class _SupportLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, temperature, dtype, with_tail):
        x = scaled_logits(logits, temperature, dtype)                          # (N, V)
        z_s = x.gather(-1, ids)                                                # (N, K)
        lse = torch.logsumexp(x, dim=-1)                                       # (N,)
        if with_tail:
            lse_tail = torch.logsumexp(x.scatter(-1, ids, -math.inf), dim=-1)  # (N,)
        else:
            lse_tail = torch.full_like(lse, -math.inf)                         # (N,) unused
        ctx.save_for_backward(logits, ids, lse, lse_tail)
        ctx.temperature, ctx.dtype, ctx.with_tail = temperature, dtype, with_tail
        ctx.set_materialize_grads(False)
        return z_s, lse, lse_tail

    @staticmethod
    def backward(ctx, g_s, g_lse, g_tail):
        logits, ids, lse, lse_tail = ctx.saved_tensors
        x = scaled_logits(logits, ctx.temperature, ctx.dtype)                  # (N, V)
        grad = torch.zeros_like(x) if g_lse is None else (x - lse[:, None]).exp_().mul_(g_lse[:, None])
        if ctx.with_tail and g_tail is not None:
            tail = (x - lse_tail[:, None]).exp_().mul_(g_tail[:, None])        # (N, V)
            grad.add_(tail.scatter_(-1, ids, 0.0))                               # support ids are not in the tail
        if g_s is not None:
            grad.scatter_add_(-1, ids, g_s)
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(logits.dtype), None, None, None, None


def scaled_logits(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    x = logits.to(dtype)
    return x if temperature == 1.0 else x / temperature


def support_logsumexp(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                      dtype: torch.dtype = torch.float32, with_tail: bool = True,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V) any float dtype, ids (N, K) int64 -> with x = logits / temperature in `dtype`:
    x at ids (N, K), logsumexp(x) (N,), logsumexp of x over the ids not in `ids` (N,) (-inf if not with_tail,
    or when ids cover the vocab). Differentiable in logits (fused backward, see module docstring)."""
    return _SupportLogSumExp.apply(logits, ids, temperature, dtype, with_tail)
