"""RLKD: ranking-loss KD on the peaks of the teacher / student distributions (Peng & Zhang, COLING 2025).

    L_rank = 1 - Spearman(soft_rank(teacher values), soft_rank(student logits))

over, per position, the union of the teacher's top-k ids and the student's top-k ids. The official code takes a
batch-wide torch.unique; here the union is built per row: the student's top-k ids already among the teacher's
top-k are masked out (an (N, k, k) comparison), so each row ranks between k and 2k distinct ids.
Teacher values are tau=1 log-probs (ranks do not depend on the temperature); a student top-k id outside a sparse
teacher's support gets the tail value log(r / (V - K)) (all such ids tie). Unused slots of a sampled target are
no peaks: a row with fewer than k drawn ids ranks only those. The soft rank is a pairwise-sigmoid
rank, rank_i = sum_j sigmoid((x_i - x_j) / rank_temperature), cheap for k <= 32 and differentiable (torchsort
ships no wheels). L_rank lies in [0, 2]: 0 for identical orders, 2 for reversed ones.

Scale against the reference: the objective (losses.kd_rows) is rlkd_weight * L_rank + L_base with rlkd_weight 2,
the paper's L = 2 L_rank + L_KD as DESIGN.md states it; the official code computes L_rank + L_KD / 2, exactly half
of it. Same minimiser and same gradient direction; only the scale differs, which AdamW's update (invariant to a
constant loss scale up to its eps) all but ignores. Kept at the paper's scale so the logged kd/rank values read as
the paper's; to reproduce the reference's loss values, halve the logged KD (or its learning rate under plain SGD).
tests/unit/test_losses_taid_rlkd.py pins the relation.
"""
from __future__ import annotations

import math

import torch

from kdcache.stages.losses.divergences import masked_sum
from kdcache.stages.losses.targets import SparseTarget, Target, compute_dtype, log_missing_ids, tail_logmass, teacher_topk

RANK_TEMPERATURE = 0.1  # pairwise-sigmoid sharpness; differences of ~0.5 nat/logit already rank almost hard
_VAR_EPS = 1e-12        # a row whose values all tie has no ordering: correlation 0 there instead of 0/0


def soft_rank(values: torch.Tensor, valid: torch.Tensor, temperature: float = RANK_TEMPERATURE) -> torch.Tensor:
    """Differentiable ascending rank among the valid entries of each row. values (N, M), valid (N, M) bool
    -> (N, M); invalid entries get rank 0 and do not count in anyone's rank. Ties get equal ranks."""
    diff = (values[:, :, None] - values[:, None, :]) / temperature             # (N, M, M)
    return (torch.sigmoid(diff) * valid[:, None, :]).sum(-1) * valid           # (N, M)


def spearman(rank_a: torch.Tensor, rank_b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two rank vectors over the valid entries of each row. (N, M) x3 -> (N,)."""
    w = valid.to(rank_a.dtype)                                                 # (N, M)
    n = w.sum(-1, keepdim=True).clamp(min=1)                                   # (N, 1)
    a = (rank_a - (rank_a * w).sum(-1, keepdim=True) / n) * w                  # (N, M) centred
    b = (rank_b - (rank_b * w).sum(-1, keepdim=True) / n) * w                  # (N, M)
    denom = (a * a).sum(-1).clamp(min=_VAR_EPS).sqrt() * (b * b).sum(-1).clamp(min=_VAR_EPS).sqrt()  # (N,)
    return (a * b).sum(-1) / denom


def _teacher_values_at(target: Target, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Teacher tau=1 log-probs at arbitrary ids (N, M); ids off a sparse support come back as -inf."""
    if not isinstance(target, SparseTarget):
        logits = target.detach().to(dtype)                                     # (N, V)
        return logits.gather(-1, ids) - torch.logsumexp(logits, dim=-1, keepdim=True)
    logp = target.logprobs.detach().to(dtype)                                  # (N, K)
    match = ids[:, :, None] == target.ids[:, None, :]                          # (N, M, K)
    return torch.where(match, logp[:, None, :], -math.inf).amax(-1)            # (N, M)


def rank_rows(student_logits: torch.Tensor, target: Target, k: int = 5,
              rank_temperature: float = RANK_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position rank loss and top-k overlap. student_logits (N, V), target SparseTarget (N, K) | teacher
    logits (N, V) -> (L_rank (N,) with gradient, overlap (N,) = |topk_T & topk_S| / k, detached)."""
    dtype = compute_dtype(student_logits)
    vocab = student_logits.shape[-1]
    t_ids, t_vals = teacher_topk(target, k)                                    # (N, kt) each
    t_vals = t_vals.to(dtype)
    # a sampled row may hold fewer than k ids: its unused slots (-inf, a repeated id) are no teacher peaks
    t_valid = ~torch.isneginf(t_vals)                                          # (N, kt)
    s_ids = torch.topk(student_logits.detach(), min(k, vocab), dim=-1).indices  # (N, ks)
    shared = ((s_ids[:, :, None] == t_ids[:, None, :]) & t_valid[:, None, :]).any(-1)  # (N, ks) in teacher top-k
    s_vals = _teacher_values_at(target, s_ids, dtype)                          # (N, ks)
    if isinstance(target, SparseTarget):  # student peaks off the support get the tail value
        logp = target.logprobs.detach().to(dtype)                              # (N, K)
        tail_value = tail_logmass(logp) - log_missing_ids(logp, vocab)         # (N,)
        s_vals = torch.where(torch.isinf(s_vals), tail_value[:, None], s_vals)  # (N, ks)
        # finite stand-ins at unused slots (masked out of the ranks), so no -inf - -inf = NaN reaches a sigmoid
        t_vals = torch.where(t_valid, t_vals, tail_value[:, None])            # (N, kt)
    union = torch.cat([t_ids, s_ids], dim=-1)                                  # (N, kt + ks)
    valid = torch.cat([t_valid, ~shared], dim=-1)                              # (N, kt + ks)
    teacher_values = torch.cat([t_vals, s_vals], dim=-1)                       # (N, kt + ks)
    # gather before upcasting: autograd then keeps only the input logits, no (N, V) float32 copy
    student_values = student_logits.gather(-1, union).to(dtype)                # (N, kt + ks)
    rho = spearman(soft_rank(teacher_values, valid, rank_temperature),
                   soft_rank(student_values, valid, rank_temperature), valid)  # (N,)
    overlap = shared.sum(-1).to(dtype) / t_valid.sum(-1).clamp(min=1).to(dtype)  # (N,)
    return 1 - rho, overlap


def rank_loss(student_logits: torch.Tensor, target: Target, mask: torch.Tensor, *, k: int = 5,
              rank_temperature: float = RANK_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """RLKD rank loss alone. student_logits (N, V), target SparseTarget (N, K) | teacher logits (N, V),
    mask (N,) bool -> (loss_sum, n_tokens)."""
    return masked_sum(lambda z, tg: rank_rows(z, tg, k, rank_temperature)[0], student_logits, target, mask)
