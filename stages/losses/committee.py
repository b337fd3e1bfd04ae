"""The committee loss (DiverseDistill adapted to cached LM signals): one student, M cached sources.

Per position t with weights alpha_t (N, M) over the members (sum 1 per row):
  KD_t      = sum_m alpha_m(t) * D(p_m(t), q(t))       D = any objective of `compute_objective` (KL family,
                                                        TAID, RLKD+base), one `kd_rows` call per member
The target is the mixture sum_m alpha_m p_m; for the CE-type objectives its loss is, by linearity, the weighted sum
of the members' losses, so no union of the members' supports is needed. alpha is detached in the student's term:
the weights are a property of the inputs the student reads, learnt from the ground truth, never a knob the student
could turn to make its own loss small (the weights would then collapse onto the easiest member).

The weights of the learned module are trained by the mixture likelihood of the true next token y_t:
  L_module  = -log sum_m alpha_m(t) p_m(y_t)
with p_m(y) read from the sparse target: its log-prob when y is in the support S_m, else the tail value
log(r_m / (V - K)) (the uniform-tail convention of targets.py); exact with a dense target.

Baselines for alpha: uniform (1/M), fixed (configured, normalised), confidence = softmax over members of minus
each member's entropy (support entropy plus the tail spread uniformly over the V - K missing ids, the same
convention), so the most certain member at a position gets the most weight.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

from kdcache.stages.losses import ObjectiveSpec, agreement_counts, keeps_vocab_sized_activations, kd_rows
from kdcache.stages.losses.chunking import chunked_sum
from kdcache.stages.losses.divergences import ce_rows
from kdcache.stages.losses.targets import SparseTarget, Target, log_missing_ids, tail_logmass, unused_slots

_LOSS, _KD, _CE, _RANK, _TOP1, _TOP5, _TIED = range(7)


def _committee_sums(student_out: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    *targets: Target, spec: ObjectiveSpec, taid_t: float | None,
                    lm_head: Callable | None = None) -> torch.Tensor:
    """One chunk's [loss, kd, ce, rank, top1 agree, top5 order agree, teacher top-1 tied] sums (7,), like
    `_objective_sums`, with the KD part mixed over members and the agreement counted against the first member."""
    student_logits = student_out if lm_head is None else lm_head(student_out)  # (n, V)
    agree = torch.stack([c.double() for c in agreement_counts(student_logits, targets[0], mask)])  # (3,)
    if not bool(mask.all()):
        student_logits, weights, labels = student_logits[mask], weights[mask], labels[mask]
        targets = tuple(t[mask] for t in targets)
    if spec.ce_weight > 0:
        ce_part = ce_rows(student_logits, labels)                              # (n,)
    else:
        with torch.no_grad():  # logged only
            ce_part = ce_rows(student_logits, labels)                          # (n,)
    weights = weights.detach().to(ce_part.dtype)                               # (n, M) no gradient to the weights
    kd_part = torch.zeros_like(ce_part)                                        # (n,)
    rank_part = torch.zeros_like(ce_part)                                      # (n,)
    for m, target in enumerate(targets):
        kd_m, rank_m = kd_rows(student_logits, target, spec, taid_t)          # (n,), (n,)
        kd_part = kd_part + weights[:, m] * kd_m
        rank_part = rank_part + weights[:, m] * rank_m
    loss = kd_part if spec.ce_weight == 0 else (1 - spec.ce_weight) * kd_part + spec.ce_weight * ce_part
    return torch.cat([torch.stack([loss.sum(), kd_part.sum(), ce_part.sum(), rank_part.sum()]),
                      agree.to(ce_part.dtype)])


def committee_objective(student_out: torch.Tensor, targets: list[Target], weights: torch.Tensor,
                        labels: torch.Tensor, mask: torch.Tensor, spec: ObjectiveSpec,
                        taid_t: float | None = None, lm_head: Callable | None = None) -> dict[str, torch.Tensor]:
    """The student's committee objective, chunked along positions.

    student_out: the student's logits (N, V), or with lm_head its hidden states (N, H) and lm_head the output
    layer (n, H) -> (n, V), so the logits exist one chunk at a time as in `compute_objective`; targets: M teacher
    targets, each SparseTarget (N, K_m) | logits (N, V); weights (N, M) rows summing to 1 (detached inside);
    labels (N,); mask (N,) bool. Returns the keys of `compute_objective`: "loss_sum" (with grad), "n_tokens",
    detached "kd_sum" (the mixed distillation value; TAID's J), "ce_sum", "rank_sum" (rlkd), and "top1_agree" /
    "top5_order_agree" / "top1_tied" against the first member (the foundation teacher).
    With one member and weights 1 it equals compute_objective on that member (values and gradients).
    """
    if spec.name == "ce":
        raise ValueError("a committee needs a distillation loss, not 'ce'")
    if spec.base == "taid" and taid_t is None:
        raise ValueError("loss 'taid' needs taid_t (from kdcache.stages.schedules.TAIDSchedule)")
    if not targets or weights.shape != (student_out.shape[0], len(targets)):
        raise ValueError(f"weights must be (N, M) = ({student_out.shape[0]}, {len(targets)}), "
                         f"got {tuple(weights.shape)}")
    mask = mask.bool()
    checkpoint = lm_head is not None or any(keeps_vocab_sized_activations(spec, t, mask) for t in targets)
    sums = chunked_sum(partial(_committee_sums, spec=spec, taid_t=taid_t, lm_head=lm_head), student_out.shape[0],
                       spec.chunk_size, student_out, weights, labels, mask, *targets,
                       checkpoint_chunks=checkpoint)                           # (7,)
    parts = sums.detach()
    out = {"loss_sum": sums[_LOSS], "n_tokens": mask.sum(), "kd_sum": parts[_KD], "ce_sum": parts[_CE],
           "top1_agree": parts[_TOP1], "top5_order_agree": parts[_TOP5], "top1_tied": parts[_TIED]}
    if spec.uses_rank:
        out["rank_sum"] = parts[_RANK]
    return out


# ---------------------------------------------------------------------------------------------- the weights

@torch.no_grad()
def label_logprobs(targets: list[Target], labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p_m(y) of the true next token under every member, tau = 1. targets M x (N, K_m) | (N, V),
    labels (N,) -> (N, M). Off a sparse support: the tail value log(r_m / (V - K_m)), K_m counting the used slots
    of the row only, as the losses do (targets.log_missing_ids), so unused slots change nothing."""
    columns = []
    for target in targets:
        if isinstance(target, SparseTarget):
            logp = target.logprobs.float()                                     # (N, K)
            hit = target.ids == labels[:, None]                                # (N, K)
            on_support = torch.where(hit, logp, torch.full_like(logp, -math.inf)).amax(-1)  # (N,)
            columns.append(torch.where(hit.any(-1), on_support, _tail_per_id(logp, vocab_size)))
        else:
            columns.append(torch.log_softmax(target.float(), -1).gather(-1, labels[:, None]).squeeze(-1))
    return torch.stack(columns, dim=-1)                                        # (N, M)


def _tail_per_id(logp: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log(r / (V - K_used)) per row (N,), -inf where the used slots cover the whole vocabulary (no tail)."""
    has_tail = (~unused_slots(logp)).sum(-1) < vocab_size                     # (N,)
    per_id = tail_logmass(logp) - log_missing_ids(logp, vocab_size)           # (N,)
    return torch.where(has_tail, per_id, torch.full_like(per_id, -math.inf))


def mixture_nll(log_weights: torch.Tensor, label_logp: torch.Tensor) -> torch.Tensor:
    """The module's objective summed over positions: -sum_t log sum_m alpha_m(t) p_m(y_t).
    log_weights (N, M) log alpha (with grad), label_logp (N, M) from `label_logprobs` -> scalar."""
    return -torch.logsumexp(log_weights + label_logp, dim=-1).sum()


@torch.no_grad()
def member_entropies(targets: list[Target], vocab_size: int) -> torch.Tensor:
    """Entropy of each member's distribution per position, tau = 1: the used support cells plus the tail mass
    spread uniformly over the V - K_used missing ids (label_logprobs' convention; exact for a dense target).
    M x (N, K_m) | (N, V) -> (N, M)."""
    columns = []
    for target in targets:
        if isinstance(target, SparseTarget):
            logp = target.logprobs.float()                                     # (N, K)
            # an unused slot (-inf) holds p = 0 and adds 0, not 0 * -inf = nan
            h = -torch.where(unused_slots(logp), 0.0, logp.exp() * logp).sum(-1)  # (N,)
            per_id = _tail_per_id(logp, vocab_size)                            # (N,)
            tail = tail_logmass(logp).exp() * per_id                           # (N,) r log(r / n_missing)
            h = h - torch.where(torch.isfinite(per_id), tail, torch.zeros_like(tail))
        else:
            logp = torch.log_softmax(target.float(), -1)                       # (N, V)
            h = -(logp.exp() * logp).sum(-1)
        columns.append(h)
    return torch.stack(columns, dim=-1)                                        # (N, M)


def uniform_weights(n: int, n_members: int, device=None) -> torch.Tensor:
    return torch.full((n, n_members), 1.0 / n_members, device=device)          # (N, M)


def fixed_weights(n: int, values: list[float], device=None) -> torch.Tensor:
    w = torch.tensor(values, dtype=torch.float32, device=device)
    return (w / w.sum()).expand(n, -1).clone()                                 # (N, M)


def confidence_weights(targets: list[Target], vocab_size: int) -> torch.Tensor:
    """softmax over members of -entropy: (N, M)."""
    return torch.softmax(-member_entropies(targets, vocab_size), dim=-1)
