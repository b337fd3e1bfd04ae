"""Distillation losses: pure functions over tensors returning (loss_sum, n_tokens); the stage normalises once.

Public API
  ObjectiveSpec, compute_objective       the objective the trainer / evaluator call (chunked, with metrics)
  SparseTarget                           the cached teacher signal (a dense (N, V) logit tensor also works)
  divergence(name, ...)                  the KL family by name (unchunked); kl, rkl, jsd, tvd, skl, srkl are
                                         its shorthands divergence("kl", ...) etc.
  ce, taid, rank_loss                    the other individual losses (unchunked)
  chunked_sum                            the one chunking helper
  LOSS_NAMES, TAIL_MODES
Tail modes, the teacher at a temperature and the TAID tail are documented in divergences.py, targets.py, taid.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

# the objective names are declared once beside the config (torch-free), which validates train.loss at load
from kdcache.pipeline.config import LOSS_NAMES
from kdcache.stages.losses.chunking import chunked_sum
from kdcache.stages.losses.divergences import (TAIL_MODES, ce, ce_rows, divergence, divergence_rows, jsd, kl, rkl,
                                               skl, srkl, tvd)
from kdcache.stages.losses.rlkd import rank_loss, rank_rows
from kdcache.stages.losses.taid import taid, taid_rows
from kdcache.stages.losses.targets import SparseTarget, Target, compute_dtype, teacher_topk

__all__ = ["LOSS_NAMES", "TAIL_MODES", "ObjectiveSpec", "SparseTarget", "chunked_sum", "compute_objective",
           "divergence", "ce", "kl", "rkl", "jsd", "tvd", "skl", "srkl", "taid", "rank_loss", "agreement_counts"]


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str = "kl"            # one of LOSS_NAMES; "rlkd+<base>" = rank loss + base divergence, "rlkd" = rank alone
    tail: str = "bucket"        # one of TAIL_MODES: how a sparse teacher's missing mass is treated
    temperature: float = 1.0    # > 0; KD terms are tau**2-scaled, the ground-truth CE is not tempered
    ce_weight: float = 0.0      # loss = (1 - ce_weight) * KD + ce_weight * CE(labels)
    jsd_beta: float = 0.5       # generalised JSD mixing weight, in (0, 1)
    skew_alpha: float = 0.1     # skew KL / skew RKL mixing weight, in [0, 1)
    rlkd_k: int = 5             # top-k peaks ranked per position
    rlkd_weight: float = 2.0    # KD = rlkd_weight * L_rank + L_base
    rlkd_dynamic: bool = False  # weight L_base by |topk_T & topk_S| / k per position
    chunk_size: int = 1024      # positions per chunk

    def __post_init__(self):
        if self.name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.name!r}; valid: {', '.join(LOSS_NAMES)}")
        if self.tail not in TAIL_MODES:
            raise ValueError(f"unknown tail mode {self.tail!r}; valid: {', '.join(TAIL_MODES)}")
        checks = [(self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
                  (0 <= self.ce_weight <= 1, f"ce_weight must be in [0, 1], got {self.ce_weight}"),
                  (0 < self.jsd_beta < 1, f"jsd_beta must be in (0, 1), got {self.jsd_beta}"),
                  (0 <= self.skew_alpha < 1, f"skew_alpha must be in [0, 1), got {self.skew_alpha}"),
                  (self.rlkd_k >= 1, f"rlkd_k must be >= 1, got {self.rlkd_k}"),
                  (self.rlkd_weight >= 0, f"rlkd_weight must be >= 0, got {self.rlkd_weight}"),
                  (self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def base(self) -> str | None:
        """The distribution-matching part: "ce", a divergence name, "taid", or None for rank-only "rlkd"."""
        if self.name == "rlkd":
            return None
        return self.name.removeprefix("rlkd+")

    @property
    def uses_rank(self) -> bool:
        return self.name.startswith("rlkd")


# columns of the per-chunk sums vector
_LOSS, _KD, _CE, _RANK, _TOP1, _TOP5, _TIED = range(7)


def kd_rows(student_logits: torch.Tensor, target: Target, spec: ObjectiveSpec, taid_t: float | None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The distillation part of objective `spec` per position, and its rank part (zeros without RLKD).
    student_logits (N, V), target SparseTarget (N, K) | teacher logits (N, V) -> (kd (N,), rank (N,)).
    Not for spec.name == "ce". The committee loss calls it once per member."""
    base = spec.base
    if base is None:
        base_part = torch.zeros(student_logits.shape[0], dtype=compute_dtype(student_logits),
                                device=student_logits.device)                  # (N,)
    elif base == "taid":
        base_part = taid_rows(student_logits, target, taid_t, tail=spec.tail, temperature=spec.temperature)
    else:
        base_part = divergence_rows(base, student_logits, target, tail=spec.tail, temperature=spec.temperature,
                                    jsd_beta=spec.jsd_beta, skew_alpha=spec.skew_alpha)  # (N,)
    if not spec.uses_rank:
        return base_part, torch.zeros_like(base_part)
    rank_part, overlap = rank_rows(student_logits, target, spec.rlkd_k)        # (N,), (N,)
    if spec.rlkd_dynamic:
        base_part = overlap * base_part
    return spec.rlkd_weight * rank_part + base_part, rank_part


def _objective_sums(student_out: torch.Tensor, target: Target | None, labels: torch.Tensor, mask: torch.Tensor,
                    *, spec: ObjectiveSpec, taid_t: float | None, lm_head: Callable | None = None) -> torch.Tensor:
    """One chunk's [loss, kd, ce, rank, top1 agree, top5 order agree, teacher top-1 tied] sums (7,). student_out is
    the chunk's logits, or its hidden states when lm_head projects them here. Masked rows are dropped first
    (exactly zero contribution)."""
    student_logits = student_out if lm_head is None else lm_head(student_out)  # (n, V)
    if target is not None:
        agree = torch.stack([c.double() for c in agreement_counts(student_logits, target, mask)])  # (3,)
    else:
        agree = torch.zeros(3, device=student_logits.device)                    # (3,)
    if not bool(mask.all()):
        student_logits, labels = student_logits[mask], labels[mask]
        target = target[mask] if target is not None else None
    if spec.name == "ce" or spec.ce_weight > 0:
        ce_part = ce_rows(student_logits, labels)                              # (n,)
    else:
        with torch.no_grad():  # logged only: no backward pass over the vocab for it
            ce_part = ce_rows(student_logits, labels)                          # (n,)
    zeros = torch.zeros_like(ce_part)                                          # (n,)
    agree = agree.to(ce_part.dtype)
    if spec.name == "ce":
        return torch.cat([torch.stack([ce_part.sum(), zeros.sum(), ce_part.sum(), zeros.sum()]), agree])
    kd_part, rank_part = kd_rows(student_logits, target, spec, taid_t)         # (n,), (n,)
    loss = kd_part if spec.ce_weight == 0 else (1 - spec.ce_weight) * kd_part + spec.ce_weight * ce_part
    return torch.cat([torch.stack([loss.sum(), kd_part.sum(), ce_part.sum(), rank_part.sum()]), agree])


def keeps_vocab_sized_activations(spec: ObjectiveSpec, target: Target | None, mask: torch.Tensor) -> bool:
    """Whether the objective's autograd graph would keep (rows, V) tensors for backward, so chunks need
    checkpointing. The CE, the sparse bucket / renorm divergences and the rank loss go through gathers and the
    fused support_logsumexp, which keep only the input logits and (rows, K)-sized values; a dense teacher, the
    uniform tail and TAID need full-vocab log-softmaxes, and a partial mask copies the kept rows."""
    if not bool(mask.all()):
        return True
    if spec.name == "ce" or spec.base is None:
        return False
    return not isinstance(target, SparseTarget) or spec.tail == "uniform" or spec.base == "taid"


@torch.no_grad()
def agreement_counts(student_logits: torch.Tensor, target: Target, mask: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tie-aware agreement sums over masked positions: (top-1 agreement, top-5 order agreement, teacher top-1
    tied). student_logits (N, V), target SparseTarget (N, K) | logits (N, V), mask (N,) -> 3 scalars.

    The teacher's ranking is read from its values, and equal values are a tie, whatever order they are stored in
    (a sampled cache stores equal counts by id, so "the first stored" would favour small ids). Each position
    counts the chance that a uniformly random tie-break of the teacher agrees with the student: top-1 credits
    1/m when the student's argmax is one of the m ids sharing the teacher's top value; top-5 order credits
    prod_i 1/(n_i - r_i) when the student's top-5 ids carry the teacher's 5 largest values in order, with n_i
    the size of rank i's tie group and r_i the ranks of that group before i (1 without ties, as before).
    Ties are counted among the ids the target holds: a top-k whose k values are all equal may tie with ids
    outside it, so there 1/m is an upper bound. The student's own order is torch.topk's (float logits
    practically never tie). The third sum counts positions whose teacher top-1 is a tie (m > 1).
    With K < 5 the order check uses the top-K."""
    logits = student_logits.detach()                                           # (N, V)
    values = target.logprobs.detach() if isinstance(target, SparseTarget) else target.detach()  # (N, K) | (N, V)
    n = min(5, values.shape[-1])
    ranked = torch.topk(values, n, dim=-1).values                              # (N, n) teacher's n largest values
    s_ids = torch.topk(logits, n, dim=-1).indices                              # (N, n) student's top-n ids
    if isinstance(target, SparseTarget):  # the teacher's value of each of the student's ids; -inf off the support
        hit = target.ids[:, None, :] == s_ids[:, :, None]                      # (N, n, K)
        s_values = torch.where(hit, values[:, None, :], -torch.inf).amax(-1)   # (N, n)
    else:
        s_values = values.gather(-1, s_ids)                                    # (N, n)
    # size of each rank's tie group (a column at a time: a dense target would make (N, n, V) at once)
    group = torch.stack([(values == ranked[:, i:i + 1]).sum(-1) for i in range(n)], dim=-1)  # (N, n)
    same = ranked[:, None, :] == ranked[:, :, None]                            # (N, n, n) [.., i, j]: rank j ties i
    before = torch.tril(same, diagonal=-1).sum(-1)                             # (N, n) tied ranks before rank i
    chance = 1.0 / (group - before).clamp(min=1).double()                      # (N, n)
    in_order = (s_values == ranked) & torch.isfinite(ranked)                   # (N, n)
    top1 = in_order[:, 0] * chance[:, 0]                                       # (N,)
    top5 = in_order.all(-1) * chance.prod(-1)                                  # (N,)
    tied = group[:, 0] > 1                                                     # (N,)
    return (top1 * mask).sum(), (top5 * mask).sum(), (tied & mask).sum()


def compute_objective(student_out: torch.Tensor, target: Target | None, labels: torch.Tensor,
                      mask: torch.Tensor, spec: ObjectiveSpec, taid_t: float | None = None,
                      lm_head: Callable | None = None) -> dict[str, torch.Tensor]:
    """The training / evaluation objective, chunked along positions.

    student_out: the student's logits (N, V) float, or with lm_head its hidden states (N, H) and lm_head the
    output layer (n, H) -> (n, V) float: the logits then exist one chunk at a time (checkpointed, so backward
    rebuilds them chunk by chunk too) and the loss's peak memory is O(chunk_size * V), independent of N.
    target SparseTarget (N, K) | teacher logits (N, V) (may be None for name "ce"); labels (N,) int64 true next
    token; mask (N,) bool positions that count; taid_t the TAID interpolation weight (required for "taid").
    Returns scalars: "loss_sum" (with grad), "n_tokens", and detached "kd_sum" (the distillation part, absent
    for "ce"; TAID's J), "ce_sum", "rank_sum" (rlkd only), "top1_agree", "top5_order_agree" (tie-aware, see
    agreement_counts) and "top1_tied" (positions whose teacher top-1 is a tie) when a target is given. The
    caller divides loss_sum by the global token count once.
    """
    if spec.base == "taid" and taid_t is None:
        raise ValueError("loss 'taid' needs taid_t (from kdcache.stages.schedules.TAIDSchedule)")
    if target is None and spec.name != "ce":
        raise ValueError(f"loss {spec.name!r} needs a teacher target")
    mask = mask.bool()
    checkpoint_chunks = lm_head is not None or keeps_vocab_sized_activations(spec, target, mask)
    sums = chunked_sum(partial(_objective_sums, spec=spec, taid_t=taid_t, lm_head=lm_head), student_out.shape[0],
                       spec.chunk_size, student_out, target, labels, mask,
                       checkpoint_chunks=checkpoint_chunks)                      # (7,)
    out = {"loss_sum": sums[_LOSS], "n_tokens": mask.sum()}
    parts = sums.detach()
    if spec.name != "ce":
        out["kd_sum"] = parts[_KD]
    out["ce_sum"] = parts[_CE]
    if spec.uses_rank:
        out["rank_sum"] = parts[_RANK]
    if target is not None:
        out["top1_agree"], out["top5_order_agree"], out["top1_tied"] = parts[_TOP1], parts[_TOP5], parts[_TIED]
    return out
