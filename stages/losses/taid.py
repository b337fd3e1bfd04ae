"""TAID: temporally adaptive interpolated distillation (Shing et al., ICLR 2025; SakanaAI/TAID).

    p_t  = softmax((1 - t) * stopgrad(z) + t * z_teacher)     (logit space, float32 or wider)
    loss = -sum_v p_t[v] log q[v]                              (the reference's CE value; grad == KL(p_t || q)'s)

t itself is owned by `kdcache.stages.schedules.TAIDSchedule`, not by the loss. With temperature tau, z -> z / tau, the
teacher is tempered as in `targets.py`, and the loss is multiplied by tau**2 (tau = 1 is the paper's setting).

Teacher logits off a sparse support follow the tail mode, so TAID agrees with the KL family:
  bucket   tail id j gets log r + log q_j - log(1 - Q_S)  (q detached): the tail mass r shaped like the student,
           as DESIGN.md proposes. p_t's tail then stays proportional to q, and at t = 1 the gradient equals the
           bucket forward-KL gradient.
  uniform  tail id j gets log(r / (V - K)).
  renorm   teacher renormalised over S and nothing off it; the interpolation and the CE run over S with the
           student renormalised over S (at t = 1 the gradient equals renorm forward KL's).
With K = V there is no tail and all modes equal the dense path.
"""
from __future__ import annotations

import math

import torch

from kdcache.stages.losses.divergences import UNUSED_LOGPROB, masked_sum
from kdcache.stages.losses.targets import SparseTarget, Target, compute_dtype, log_missing_ids, teacher_support, unused_slots


def _teacher_full_logprobs(logq: torch.Tensor, target: SparseTarget, tail: str, temperature: float) -> torch.Tensor:
    """Teacher log-probs over the full vocab (N, V) from a sparse target, tail per `tail` (module docstring).
    logq (N, V) the student's log-softmax at the same temperature."""
    vocab = logq.shape[-1]
    logp_s, log_r = teacher_support(target, vocab, temperature, logq.dtype)    # (N, K), (N,) | None
    if log_r is None:  # K == V: the support covers every id, every slot is overwritten
        return _write_support(torch.zeros_like(logq), target.ids, logp_s)     # (N, V)
    if tail == "bucket":
        q = logq.detach()                                                      # (N, V)
        log_tail_q = torch.logsumexp(q.scatter(-1, target.ids, -math.inf), dim=-1)  # (N,) log(1 - Q_S)
        full = q + (log_r - log_tail_q)[:, None]                               # (N, V) student-shaped tail
    else:  # uniform
        full = (log_r - log_missing_ids(logp_s, vocab))[:, None].expand_as(logq)  # (N, V)
    return _write_support(full, target.ids, logp_s)                            # (N, V)


def _write_support(full: torch.Tensor, ids: torch.Tensor, logp_s: torch.Tensor) -> torch.Tensor:
    """full (N, V) with the support's log-probs written at ids (N, K). amax, not scatter: an unused slot (-inf)
    repeats a used id, and a plain scatter with duplicate ids keeps an arbitrary one of the values."""
    return full.scatter_reduce(-1, ids, logp_s, "amax", include_self=False)


def taid_rows(student_logits: torch.Tensor, target: Target, t: float, *, tail: str = "bucket",
              temperature: float = 1.0) -> torch.Tensor:
    """Per-position TAID loss. student_logits (N, V), target SparseTarget (N, K) | teacher logits (N, V),
    t in [0, 1] -> (N,)."""
    z = student_logits.to(compute_dtype(student_logits))                       # (N, V)
    if temperature != 1.0:
        z = z / temperature
    if isinstance(target, SparseTarget) and tail == "renorm":
        logp_s, _ = teacher_support(target, z.shape[-1], temperature, z.dtype)  # (N, K)
        unused = unused_slots(logp_s)                                          # (N, K)
        logq = torch.log_softmax(z.gather(-1, target.ids).masked_fill(unused, -math.inf), dim=-1)  # (N, K) over S
        teacher = torch.log_softmax(logp_s, dim=-1)                            # (N, K)
        if bool(unused.any()):  # p_t = q = 0 there; finite, so (1 - t) * logq + t * teacher is never 0 * -inf
            logq, teacher = logq.masked_fill(unused, UNUSED_LOGPROB), teacher.masked_fill(unused, UNUSED_LOGPROB)
    else:
        logq = torch.log_softmax(z, dim=-1)                                    # (N, V)
        if isinstance(target, SparseTarget):
            teacher = _teacher_full_logprobs(logq, target, tail, temperature)  # (N, V)
        else:
            teacher = torch.log_softmax(target.detach().to(z.dtype) / temperature, dim=-1)  # (N, V)
    # log q instead of z inside the mix: the same softmax (shift invariance), and already computed
    p_t = torch.softmax((1 - t) * logq.detach() + t * teacher, dim=-1)         # (N, C) no gradient
    return -(p_t * logq).sum(-1) * temperature ** 2                            # (N,)


def taid(student_logits: torch.Tensor, target: Target, mask: torch.Tensor, *, t: float, tail: str = "bucket",
         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """TAID loss. student_logits (N, V), target SparseTarget (N, K) | teacher logits (N, V), mask (N,) bool,
    t the interpolation weight -> (loss_sum, n_tokens)."""
    return masked_sum(lambda z, tg: taid_rows(z, tg, t, tail=tail, temperature=temperature),
                      student_logits, target, mask)
