"""The student's side of a sparse loss, fused: support logits, full-vocab normaliser, tail normaliser.

Every bucket-tail loss and the ground-truth CE need only three things from the (N, V) student logits:
z_S (the logits at K support ids), logsumexp over the vocab and logsumexp over the ids off the support.
Written with plain autograd this builds a chain of (N, V) intermediates (upcast, /tau, scatter copy, two logsumexp
backwards, gather backward, a sum of (N, V) gradients) that dominated the loss's cost. `support_logsumexp` makes
one exp pass forward and one backward:

  forward   e = exp(x - max); lse = max + log sum(e); zero e on S; lse_tail = max + log sum(e)
            (the tail is summed directly, never as a difference total - support, which cancels when the support
            holds nearly all the mass)
  backward  d/dx_v = softmax(x)_v * (g_lse + g_tail * exp(lse - lse_tail) * [v not in S]) + sum_{k: ids_k = v} g_s_k
            = one exp pass times a per-row factor, then the K support entries are rewritten

with x = z / tau. It saves only the input logits (no copy) and (N,)-sized results, so nothing vocab-sized is kept
for backward even without checkpointing. Not twice differentiable.
"""
from __future__ import annotations

import math

import torch

# exp(lse - lse_tail) = 1 / (tail share of the softmax) is capped so that a tail below e^-80 of the mass (invisible
# in float32) gives a finite factor; those ids' softmax values are below e^-80, so the capped term is negligible.
_MAX_LOG_TAIL_FACTOR = 80.0


class _SupportLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, temperature, dtype, with_tail):
        x = scaled_logits(logits, temperature, dtype)                          # (N, V)
        z_s = x.gather(-1, ids)                                                # (N, K)
        peak = x.amax(dim=-1, keepdim=True)                                    # (N, 1)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        e = (x - peak).exp_()                                                  # (N, V) the one exp pass
        lse = e.sum(-1).log_() + peak.squeeze(-1)                              # (N,)
        if with_tail:
            lse_tail = e.scatter_(-1, ids, 0.0).sum(-1).log_() + peak.squeeze(-1)  # (N,) -inf if S covers V
        else:
            lse_tail = torch.full_like(lse, -math.inf)                         # (N,) unused
        del e
        ctx.save_for_backward(logits, ids, lse, lse_tail)
        ctx.temperature, ctx.dtype, ctx.with_tail = temperature, dtype, with_tail
        ctx.set_materialize_grads(False)
        return z_s, lse, lse_tail

    @staticmethod
    def backward(ctx, g_s, g_lse, g_tail):
        logits, ids, lse, lse_tail = ctx.saved_tensors
        x = scaled_logits(logits, ctx.temperature, ctx.dtype)                  # (N, V)
        row = torch.zeros_like(lse) if g_lse is None else g_lse.clone()        # (N,) factor on softmax(x)
        use_tail = ctx.with_tail and g_tail is not None
        if use_tail:
            tail_factor = (lse - lse_tail).clamp(max=_MAX_LOG_TAIL_FACTOR).exp()   # (N,) 1 / tail share
            row = row + g_tail * tail_factor
        grad = (x - lse[:, None]).exp_()                                       # (N, V) softmax(x), the one pass
        p_s = grad.gather(-1, ids)                                             # (N, K)
        grad.mul_(row[:, None])
        if use_tail:  # support ids are not in the tail: their softmax term carries g_lse only
            grad.scatter_(-1, ids, p_s * (torch.zeros_like(lse) if g_lse is None else g_lse)[:, None])
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
