"""Sparse teacher signals: extract them from logits (precompute) and turn decoded arrays back into targets (train).

Signal kinds (what `precompute.signal` selects; the codec in storage/codecs.py stores them):
  topk    exact top-k ids, their log-probs and the log-normaliser
  sample  N draws with replacement from the teacher distribution (RS-KD), as unique ids + counts: an unbiased
          estimate of the teacher distribution, so the KD gradient q - count/N is unbiased
  hybrid  exact top-k + N draws from the residual distribution (top-k zeroed, renormalised): exact peaks and
          an unbiased tail
Draws are iid (RS-KD) or systematic (one uniform per position, N evenly spaced quantiles: same unbiased counts,
far lower variance; `precompute.draws`). Sampling is seeded per shard from (precompute.seed, shard name), so a
rerun, a resume or another worker writes byte-identical shards.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from kdcache.pipeline.config import SAMPLE_DRAWS

CHUNK_BYTES = 4 << 20  # logits per topk_signal chunk: a few MB stay in cache from the logsumexp to the topk pass


def topk_signal(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (..., V) -> support ids (..., k) int64 sorted by probability, their log-probs (..., k) float32,
    and the log-normaliser logsumexp(logits) (...,) float32, so exact support probabilities and the tail mass
    1 - sum(exp(logprobs)) are recoverable.

    Rows are taken a few MB at a time: logsumexp makes a temporary as large as its input, so over a whole
    batch's logits (~400 MB at 8 x 256 x 49,152) both passes stream from memory; chunked, the second pass reads
    cache and the lse + topk take ~half the time (measured, one core). Every row is computed as unchunked."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)                                        # (R, V)
    ids = torch.empty(flat.shape[0], k, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(flat.shape[0], k, dtype=torch.float32, device=logits.device)
    lognorm = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    rows = max(1, CHUNK_BYTES // (4 * vocab))
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows].float()                            # (r, V)
        norm = torch.logsumexp(chunk, dim=-1)                               # (r,)
        values, top = torch.topk(chunk, k, dim=-1)                          # (r, k), sorted descending
        ids[start:start + rows], logprobs[start:start + rows] = top, values - norm.unsqueeze(-1)
        lognorm[start:start + rows] = norm
    return ids.reshape(*lead, k), logprobs.reshape(*lead, k), lognorm.reshape(lead)


def shard_generator(seed: int, shard: str) -> torch.Generator:
    """A CPU generator seeded from (seed, shard name) through sha256, never Python's salted hash(), so every
    process derives the same stream for a shard."""
    digest = hashlib.sha256(f"{seed}\0{shard}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _draws_to_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draws (R, N) int64 -> unique ids (R, M) and counts (R, M) int64 with M the largest number of unique ids of
    any row; unused slots have id 0 and count 0. Ids ascending within a row."""
    rows, n = draws.shape
    if rows == 0:
        return draws.new_zeros(0, 0), draws.new_zeros(0, 0)
    sorted_draws = draws.sort(dim=-1).values                                   # (R, N)
    first = torch.ones_like(sorted_draws, dtype=torch.bool)                    # (R, N) start of a run of equal ids
    first[:, 1:] = sorted_draws[:, 1:] != sorted_draws[:, :-1]
    slot = first.long().cumsum(-1) - 1                                         # (R, N) unique-id index of each draw
    width = int(slot[:, -1].max()) + 1
    ids = torch.zeros(rows, width, dtype=torch.long).scatter_(-1, slot, sorted_draws)  # equal values per slot
    counts = torch.zeros(rows, width, dtype=torch.long).scatter_add_(-1, slot, torch.ones_like(slot))
    return ids, counts


def _sample_ids(logits: torch.Tensor, n_samples: int, generator: torch.Generator, draws: str = "iid",
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """N draws from softmax(logits) per row. logits (..., V) -> unique ids, counts (..., M).

    iid: N independent draws with replacement (RS-KD): count_i ~ Binomial(N, p_i).
    systematic: one uniform U per row, draws at the quantiles (j + U) / N, j = 0..N-1, of the distribution in
    vocabulary order: count_i is floor(N p_i) or ceil(N p_i), still E[count_i] = N p_i (unbiased), so an id with
    p_i >= 1/N is always drawn and its weight is off by < 1/N — the peaks are nearly exact. Measured on the
    default teacher (`make bench-cache`): the KD gradient's angle to full KD at N=24 is 9.4 deg against 14.7 for
    iid draws (iid needs N=50 for 10.3)."""
    lead = logits.shape[:-1]
    probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]).cpu(), dim=-1)  # (R, V)
    if draws == "iid":
        drawn = torch.multinomial(probs, n_samples, replacement=True, generator=generator)  # (R, N)
    elif draws == "systematic":
        cdf = probs.cumsum(-1)                                                  # (R, V)
        cdf /= cdf[:, -1:].clone()  # exactly 1 at the end: no quantile < 1 can fall past the last id
        offset = torch.rand(probs.shape[0], 1, generator=generator)             # (R, 1)
        quantiles = (torch.arange(n_samples) + offset) / n_samples              # (R, N) in [0, 1)
        drawn = torch.searchsorted(cdf, quantiles).clamp_max(probs.shape[-1] - 1)  # (R, N)
    else:
        raise ValueError(f"unknown draws {draws!r}: use {' or '.join(SAMPLE_DRAWS)}")
    ids, counts = _draws_to_counts(drawn)                                       # (R, M) x2
    return ids.reshape(*lead, -1), counts.reshape(*lead, -1)


def sample_signal(logits: torch.Tensor, n_samples: int, generator: torch.Generator, draws: str = "iid",
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled signal (RS-KD): logits (..., V) -> unique drawn ids (..., M) int64 and their counts (..., M) int64
    (summing to n_samples per position; count 0 = unused slot, id 0), M = the most unique ids at any position
    here. `draws`: iid | systematic (see _sample_ids)."""
    return _sample_ids(logits, n_samples, generator, draws)


def hybrid_signal(logits: torch.Tensor, k: int, n_samples: int, generator: torch.Generator, draws: str = "iid",
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-k plus N draws from the residual distribution (teacher probs with the top-k zeroed, renormalised).
    logits (..., V), k < V -> ids (..., k), logprobs (..., k), lognorm (...,) as `topk_signal`, and tail ids
    (..., M), tail counts (..., M) as `sample_signal`. The residual is a softmax over the logits with the top-k
    set to -inf, so it is well defined even when the top-k holds all the float32 mass."""
    ids, logprobs, lognorm = topk_signal(logits, k)
    residual = logits.float().scatter(-1, ids, -torch.inf)                     # (..., V)
    tail_ids, tail_counts = _sample_ids(residual, n_samples, generator, draws)
    return ids, logprobs, lognorm, tail_ids, tail_counts


def pad_last(arrays: list[np.ndarray], fill: float | int) -> np.ndarray:
    """Concatenate (b, T, M_b) arrays along the first axis, padding the last axis to the largest M_b with `fill`
    (the batches of one shard have different numbers of unique sampled ids)."""
    width = max(a.shape[-1] for a in arrays)
    return np.concatenate([np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])], constant_values=fill)
                           for a in arrays])


def to_numpy_signal(ids: torch.Tensor, logprobs: torch.Tensor, lognorm: torch.Tensor) -> dict[str, np.ndarray]:
    return {"ids": ids.cpu().numpy(), "logprobs": logprobs.cpu().numpy(), "lognorm": lognorm.cpu().numpy()}


def extract_signal(kind: str, logits: torch.Tensor, k: int, n_samples: int, generator: torch.Generator | None,
                   draws: str = "iid") -> dict[str, np.ndarray]:
    """Teacher logits (b, T, V) -> the numpy signal of `kind` in the codec's input format (kdcache.storage.encode_signal)."""
    if kind == "topk":
        return to_numpy_signal(*topk_signal(logits, k))
    if kind == "sample":
        ids, counts = sample_signal(logits, n_samples, generator, draws)
        return {"ids": ids.numpy(), "counts": counts.numpy()}
    if kind == "hybrid":  # no lognorm: the estimate sums to 1 without it, and it would cost up to 4 B/token (a float32 per position)
        ids, logprobs, _, tail_ids, tail_counts = hybrid_signal(logits, k, n_samples, generator, draws)
        return {"ids": ids.cpu().numpy(), "logprobs": logprobs.cpu().numpy(), "tail_ids": tail_ids.numpy(),
                "tail_counts": tail_counts.numpy()}
    raise ValueError(f"unknown signal kind {kind!r}: use topk, sample or hybrid")


# codec input arrays padded when batches are concatenated: counts with 0 (unused), ids with 0
_PADDED = {"sample": ("ids", "counts"), "hybrid": ("tail_ids", "tail_counts")}


def concat_signals(kind: str, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join the per-batch signals of one shard; sampled arrays are padded to the shard's largest M."""
    padded = _PADDED.get(kind, ())
    return {name: pad_last([p[name] for p in parts], 0) if name in padded else np.concatenate([p[name] for p in parts])
            for name in parts[0]}


def sparse_target(ids: torch.Tensor, logprobs: torch.Tensor, lognorm: torch.Tensor):
    """Batched decoded signal tensors (B, T, C)/(B, T) -> a SparseTarget over flattened positions (B*T, C).
    Works for every kind: the decoder (kdcache.storage.decode_signal) gives all of them the same form, unused slots
    with logprob -inf and the row's first id."""
    from kdcache.stages.losses.targets import SparseTarget

    k = ids.shape[-1]
    return SparseTarget(ids=ids.reshape(-1, k).long(), logprobs=logprobs.reshape(-1, k).float(),
                        lognorm=lognorm.reshape(-1).float())
