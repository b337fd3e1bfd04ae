"""Teacher targets: the sparse teacher signal, and the teacher distribution it implies at a temperature.

A teacher target is either a `SparseTarget` (top-K support read from the cache) or a dense tensor of teacher
logits (N, V) (the reference path, also used by online KD).

Tail at temperature (the choice every loss shares)
--------------------------------------------------
The cache stores, per position, the support log-probs l_i at temperature 1 (normalised over the full vocab) and
the log-normaliser. Off the support only the tail mass r = 1 - sum_S exp(l_i) is known. To re-temper we assume
the V - K missing ids share r *uniformly at temperature 1*, i.e. each has the tau=1 log-prob log(r / (V - K)).
Tempering is then ordinary: every logit is divided by tau and the result renormalised, which gives

    log p_i(tau)  = l_i / tau - Z(tau)                       (i in S)
    log r(tau)    = log(V - K) + log(r / (V - K)) / tau - Z(tau)
    Z(tau)        = logsumexp([l_S / tau, log(V - K) + log(r / (V - K)) / tau])

The stored log-normaliser cancels (softmax is shift invariant), so it is not needed. At tau = 1 the stored
values are used as they are, so tau = 1 reduces exactly (bit for bit) to the untempered loss. With K = V there is
no tail and this is exactly log_softmax(teacher_logits / tau), the dense reference.

r is floored at TAIL_FLOOR when V > K: a float32 top-K sum can round to >= 1 and a zero tail would make reverse
divergences and the RLKD tail value log(r / (V - K)) infinite, although the cache cannot resolve masses that small.

Sampled kinds (sample, hybrid; see stages/signals.py)
-----------------------------------------------------
Their decoded support carries an unbiased *estimate* of the teacher distribution that already sums to 1
(count/N, or exact top-k + r*count/N), so r is floored at TAIL_FLOOR and the tail is empty in effect. Then
`bucket` is exact: its forward-KL gradient is q - p_hat, whose expectation over the draws is the full-KD gradient
q - p. `uniform` is the same up to the floored tail. `renorm` renormalises the *student* over the drawn ids and
is biased for them (as for top-k). Rows differ in how many ids were drawn: unused slots hold logprob -inf and
repeat the row's first id (`unused_slots`); every loss gives them exactly zero weight, value and gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TAIL_FLOOR = 1e-10  # smallest tail mass r when V > K; below float32's resolution of 1 - sum(p_S), so value-neutral


@dataclass
class SparseTarget:
    """Teacher signal on a support, per position (flattened positions N)."""
    ids: torch.Tensor        # (N, K) int64, support ids (top-k: sorted by teacher prob, descending)
    logprobs: torch.Tensor   # (N, K) float32, teacher log-probs at temperature 1, normalised over the FULL vocab
                             # (estimates for sampled kinds); -inf = unused slot, whose id repeats the row's first id
    lognorm: torch.Tensor    # (N,) float32, teacher logsumexp over the full vocab at temperature 1

    def __getitem__(self, rows) -> "SparseTarget":
        """Row slicing / indexing / boolean masking, e.g. target[a:b] or target[mask]."""
        return SparseTarget(ids=self.ids[rows], logprobs=self.logprobs[rows], lognorm=self.lognorm[rows])

    def to(self, device) -> "SparseTarget":
        return SparseTarget(ids=self.ids.to(device), logprobs=self.logprobs.to(device),
                            lognorm=self.lognorm.to(device))

    def __len__(self) -> int:
        return self.ids.shape[0]


Target = SparseTarget | torch.Tensor


def compute_dtype(student_logits: torch.Tensor) -> torch.dtype:
    """Losses run in float32 at least (bf16/fp16 logits are upcast); float64 stays float64 (gradient tests)."""
    return torch.promote_types(student_logits.dtype, torch.float32)


def unused_slots(logprobs: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: slots that hold no support entry (padding of sampled kinds)."""
    return torch.isneginf(logprobs)


def log_missing_ids(logprobs: torch.Tensor, vocab_size: int) -> float | torch.Tensor:
    """log of the number of vocab ids off the support: a float when every slot is used (V - K), else per row
    (N,) from the used slots only, so unused slots change nothing."""
    unused = unused_slots(logprobs)
    if not bool(unused.any()):
        return math.log(max(vocab_size - logprobs.shape[-1], 1))
    n_missing = (vocab_size - (~unused).sum(-1)).clamp(min=1)                  # (N,)
    return n_missing.double().log().to(logprobs.dtype)


def tail_logmass(logprobs: torch.Tensor) -> torch.Tensor:
    """logprobs (N, K) support log-probs at tau=1 -> log r (N,), r = 1 - sum exp(logprobs) floored at TAIL_FLOOR.
    -expm1(logsumexp) is accurate both when the support holds little mass and when it holds nearly all of it."""
    r = -torch.expm1(torch.logsumexp(logprobs, dim=-1))                        # (N,)
    return r.clamp(min=TAIL_FLOOR).log()                                       # (N,)


def teacher_support(target: SparseTarget, vocab_size: int, temperature: float = 1.0,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher distribution at `temperature` on the support plus its tail (see module docstring).

    target: SparseTarget with ids (N, K). Returns (logp_S (N, K), -inf at unused slots, log_r (N,) or None when
    K == V, i.e. no tail).
    Detached: the teacher never receives gradient.
    """
    logp = target.logprobs.detach().to(dtype)                                  # (N, K)
    if vocab_size - logp.shape[-1] <= 0 and not bool(unused_slots(logp).any()):
        # the support is the whole vocab: tempering is an ordinary log-softmax
        return (logp if temperature == 1.0 else torch.log_softmax(logp / temperature, dim=-1)), None
    log_r = tail_logmass(logp)                                                 # (N,)
    if temperature == 1.0:
        return logp, log_r
    log_missing = log_missing_ids(logp, vocab_size)                            # float | (N,)
    per_id = log_r - log_missing                                               # (N,) tau=1 log-prob of one missing id
    tail = log_missing + per_id / temperature                                  # (N,) unnormalised tempered tail mass
    scaled = logp / temperature                                                # (N, K)
    z = torch.logsumexp(torch.cat([scaled, tail[:, None]], dim=-1), dim=-1)    # (N,)
    return scaled - z[:, None], tail - z


def teacher_topk(target: Target, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most probable ids (N, k) and their tau=1 log-probs (N, k), descending.
    Sorted explicitly (not ids[:, :k]) so a support in any order works."""
    if isinstance(target, SparseTarget):
        k = min(k, target.ids.shape[-1])
        values, pos = torch.topk(target.logprobs.detach(), k, dim=-1)          # (N, k)
        return target.ids.gather(-1, pos), values
    logits = target.detach()                                                   # (N, V)
    values, ids = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)         # (N, k)
    # log-probs without materialising an (N, V) log-softmax
    return ids, values - torch.logsumexp(logits, dim=-1, keepdim=True)
