"""KL-family distillation losses and the ground-truth CE, on sparse or dense teacher targets.

Every divergence is computed on *aligned cells*: a teacher log-distribution and a student log-distribution over
the same C cells per position.
  dense target            cells = the V vocab ids
  sparse, tail="renorm"   cells = the K support ids; teacher and student both renormalised over the support
  sparse, tail="bucket"   cells = the K support ids + one ghost cell holding the tail mass (r for the teacher,
                          1 - Q_S for the student). Equivalent to the full-vocab divergence when the teacher's
                          tail is shaped like the student's.
  sparse, tail="uniform"  cells = the V vocab ids; the teacher's tail mass is spread evenly over the V - K ids
                          off the support (needs the full student log-softmax)
With K = V (any order) there is no tail and every mode equals the dense reference. Unused slots of a sparse target
(logprob -inf, the padding of sampled kinds) become cells with p = q = 0 (or are skipped by the uniform scatter),
so a target with unused slots gives exactly the values and gradients of the same target without them. The teacher at temperature tau
is defined in `targets.py`; the student is softmax(z / tau); KD losses are multiplied by tau**2 so gradient
magnitudes do not shrink with tau (Hinton et al.). Every public loss is
    f(student_logits (N, V), target, mask (N,), *, tail=..., temperature=..., ...) -> (loss_sum, n_tokens)
with masked positions dropped before computing, so they contribute exactly 0 to value and gradient.
The `*_rows` variants return per-position losses (N,) for unmasked inputs; `compute_objective` builds on them.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

from kdcache.stages.losses.support import scaled_logits, support_logsumexp
from kdcache.stages.losses.targets import (SparseTarget, Target, compute_dtype, log_missing_ids, teacher_support,
                                   unused_slots)

from kdcache.pipeline.config import DIVERGENCE_NAMES, TAIL_MODES  # the names live with the config (torch-free)


# ----------------------------------------------------------------------------------------------- alignment

def aligned_logprobs(student_logits: torch.Tensor, target: Target, *, tail: str = "bucket",
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-distributions over the same cells (see module docstring).

    student_logits (N, V); target SparseTarget (N, K) or dense teacher logits (N, V).
    Returns (logp (N, C), logq (N, C)); logp is detached, logq carries the student's gradient.
    """
    if tail not in TAIL_MODES:
        raise ValueError(f"unknown tail mode {tail!r}; valid: {', '.join(TAIL_MODES)}")
    dtype = compute_dtype(student_logits)
    if not isinstance(target, SparseTarget):
        logp = torch.log_softmax(target.detach().to(dtype) / temperature, dim=-1)  # (N, V)
        return logp, torch.log_softmax(scaled_logits(student_logits, temperature, dtype), dim=-1)
    vocab = student_logits.shape[-1]
    logp_s, log_r = teacher_support(target, vocab, temperature, dtype)         # (N, K), (N,) | None
    unused = unused_slots(logp_s)                                              # (N, K)
    if tail == "renorm":
        # both sides renormalised over S: gather first, nothing vocab-sized is needed
        z_s = scaled_logits(student_logits.gather(-1, target.ids), temperature, dtype)  # (N, K)
        logq = torch.log_softmax(z_s.masked_fill(unused, -math.inf), dim=-1)  # unused ids are not normalised over
        return _blank(torch.log_softmax(logp_s, dim=-1), logq, unused)
    if log_r is None:  # K == V: no tail, bucket and uniform are both the plain full-vocab divergence
        z_s, lse, _ = support_logsumexp(student_logits, target.ids, temperature, dtype, with_tail=False)
        return logp_s, z_s - lse[:, None]
    if tail == "bucket":
        # log(1 - Q_S) = logsumexp over the ids off the support - lse: exact, no cancellation when Q_S -> 1
        z_s, lse, lse_tail = support_logsumexp(student_logits, target.ids, temperature, dtype)  # (N, K), (N,) x2
        cells_unused = torch.cat([unused, unused.new_zeros(len(unused), 1)], dim=-1)  # (N, K + 1)
        return _blank(torch.cat([logp_s, log_r[:, None]], dim=-1),             # (N, K + 1)
                      torch.cat([z_s, lse_tail[:, None]], dim=-1) - lse[:, None], cells_unused)
    # uniform: every missing id gets r / (V - K); the student needs its full log-softmax
    per_id = log_r - log_missing_ids(logp_s, vocab)                            # (N,)
    # amax: an unused slot (-inf) repeats a used id and must not overwrite its value, whatever the write order
    logp = per_id[:, None].expand(-1, vocab).scatter_reduce(-1, target.ids, logp_s, "amax", include_self=False)
    return logp, torch.log_softmax(scaled_logits(student_logits, temperature, dtype), dim=-1)


# Unused slots (sampled kinds) become cells with p = q = 0 written as this finite log value, not -inf: every
# divergence then adds exactly 0 there, and no backward ever sees -inf - -inf (logaddexp's gradient at two -inf is
# NaN, and 0 * NaN stays NaN). exp(-1e4) is 0 in every float dtype.
UNUSED_LOGPROB = -1e4


def _blank(logp: torch.Tensor, logq: torch.Tensor, unused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells (N, C) with p = q = 0 and no gradient at `unused` (N, C); a no-op when nothing is unused."""
    if not bool(unused.any()):
        return logp, logq
    return logp.masked_fill(unused, UNUSED_LOGPROB), logq.masked_fill(unused, UNUSED_LOGPROB)


# ------------------------------------------------------------------------------- divergences on aligned cells

def _kl_cells(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_c p_c (log p_c - log q_c) per row (N,), with 0 log 0 = 0 (cells where p = 0 contribute nothing)."""
    p = logp.exp()                                                             # (N, C)
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))             # (N, C) no -inf - -inf = nan
    return (p * diff).sum(-1)


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w p + (1 - w) q), computed in log space."""
    parts = []
    if weight_p > 0:
        parts.append(logp + math.log(weight_p))
    if weight_p < 1:
        parts.append(logq + math.log1p(-weight_p))
    return parts[0] if len(parts) == 1 else torch.logaddexp(parts[0], parts[1])


def kl_cells(logp, logq):
    """Forward KL(p || q): mode-covering, the classic KD objective."""
    return _kl_cells(logp, logq)


def rkl_cells(logp, logq):
    """Reverse KL(q || p): mode-seeking."""
    return _kl_cells(logq, logp)


def jsd_cells(logp, logq, beta: float = 0.5):
    """Generalised JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (GKD)."""
    logm = _log_mix(logp, logq, beta)
    return beta * _kl_cells(logp, logm) + (1 - beta) * _kl_cells(logq, logm)


def tvd_cells(logp, logq):
    """Total variation distance 0.5 sum |p - q|."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def skl_cells(logp, logq, alpha: float = 0.1):
    """Skew KL (DistiLLM): KL(p || alpha p + (1 - alpha) q)."""
    return _kl_cells(logp, _log_mix(logp, logq, alpha))


def srkl_cells(logp, logq, alpha: float = 0.1):
    """Skew reverse KL (DistiLLM): KL(q || alpha q + (1 - alpha) p)."""
    return _kl_cells(logq, _log_mix(logq, logp, alpha))


# -------------------------------------------------------------------------------------- per-position losses

def divergence_rows(name: str, student_logits: torch.Tensor, target: Target, *, tail: str = "bucket",
                    temperature: float = 1.0, jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> torch.Tensor:
    """Per-position divergence `name` (one of DIVERGENCES) times tau**2. student_logits (N, V) -> (N,)."""
    logp, logq = aligned_logprobs(student_logits, target, tail=tail, temperature=temperature)
    if name == "jsd":
        rows = jsd_cells(logp, logq, jsd_beta)
    elif name in ("skl", "srkl"):
        rows = DIVERGENCES[name](logp, logq, skew_alpha)
    else:
        rows = DIVERGENCES[name](logp, logq)
    return rows * temperature ** 2                                             # (N,)


def ce_rows(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Ground-truth cross-entropy per position at temperature 1. student_logits (N, V), labels (N,) -> (N,)."""
    # logsumexp - z_y through the fused op: no (N, V) log-softmax kept for backward
    z_y, lse, _ = support_logsumexp(student_logits, labels[:, None], 1.0, compute_dtype(student_logits),
                                    with_tail=False)                           # (N, 1), (N,)
    return lse - z_y.squeeze(-1)


# one cell function per name the config accepts (pipeline.config.DIVERGENCE_NAMES)
DIVERGENCES: dict[str, Callable] = {name: globals()[f"{name}_cells"] for name in DIVERGENCE_NAMES}


# ------------------------------------------------------------------------------------- public (sum, count)

def masked_sum(rows_fn: Callable, student_logits: torch.Tensor, target, mask: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rows_fn(student_logits, target) -> (N,) to the positions in mask only; returns (sum, count).
    Dropping masked rows (rather than zeroing their loss) keeps garbage in padded rows from leaking NaN
    gradients."""
    mask = mask.bool()
    n_tokens = mask.sum()
    if not bool(mask.all()):
        student_logits, target = student_logits[mask], target[mask]
    return rows_fn(student_logits, target).sum(), n_tokens


def divergence(name: str, student_logits: torch.Tensor, target: Target, mask: torch.Tensor, *, tail: str = "bucket",
               temperature: float = 1.0, jsd_beta: float = 0.5, skew_alpha: float = 0.1,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-family divergence `name` over the masked positions: kl = KL(p || q), rkl = KL(q || p), jsd = generalised
    JSD(jsd_beta), tvd = total variation, skl = KL(p || a p + (1 - a) q), srkl = KL(q || a q + (1 - a) p) with
    a = skew_alpha. student_logits (N, V), target SparseTarget (N, K) | teacher logits (N, V), mask (N,) bool
    -> (loss_sum, n_tokens)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(DIVERGENCES)}")
    return masked_sum(lambda z, t: divergence_rows(name, z, t, tail=tail, temperature=temperature,
                                                   jsd_beta=jsd_beta, skew_alpha=skew_alpha),
                      student_logits, target, mask)


# the public shorthands of the losses package: kl(z, target, mask, tail=...) is divergence("kl", z, target, mask, ...)
kl, rkl, jsd, tvd, skl, srkl = (partial(divergence, name) for name in ("kl", "rkl", "jsd", "tvd", "skl", "srkl"))


def ce(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth cross-entropy. student_logits (N, V), labels (N,) int64, mask (N,) -> (loss_sum, n_tokens)."""
    return masked_sum(ce_rows, student_logits, labels, mask)
