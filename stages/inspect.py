"""`kdcache inspect`: what a store holds, read through the public storage API."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from kdcache.storage import Store, read_shard
from kdcache.storage.codecs import sample_draws


def mass_covered(logprobs: np.ndarray, params: dict) -> np.ndarray | None:
    """Teacher mass on the exact top-k of each position, logprobs (..., C) -> (...): topk, and the exact part of
    hybrid. None for sample: a sampled estimate sums to 1 by construction."""
    if params.get("signal", "topk") == "sample":
        return None
    return np.exp(logprobs[..., :params["k"]].astype(np.float64)).sum(-1)


ENTROPY_MEANING = {
    "topk": ("support_entropy_mean: -sum p log p over the cached top-k alone (not the teacher's entropy); "
             "teacher_entropy_lower/upper_mean: bounds of the teacher's entropy, exact on the top-k (up to the value "
             "encoding) with the tail mass r spread over the other ids: at least -r log p_k (no tail id is more "
             "probable than the k-th), at most r log((V - k) / r) (a uniform tail). Nats."),
    "hybrid": ("support_entropy_mean: -sum p log p of the cached estimate (exact top-k + r * count / N over the "
               "drawn tail ids; the tail part is a plug-in estimate, biased low); teacher_entropy_lower/upper_mean: "
               "bounds from the exact top-k and the tail mass r, as for topk. Nats."),
    "sample": ("support_entropy_mean: -sum p log p of the estimate count / N, the plug-in estimate of the teacher's "
               "entropy: biased low (N draws miss the tail; for iid draws by about (distinct ids - 1) / (2N) nats). "
               "The draws bound nothing, so there are no teacher bounds. Nats."),
}


def entropy_bounds(logprobs: np.ndarray, k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the teacher's entropy from its exact top-k: logprobs (P, C) float64 whose first k columns are the
    exact top-k log-probs, descending -> (lower (P,), upper (P,)) in nats. With p the top-k probabilities and
    r = 1 - sum p the tail mass over the V - k other ids, each at most p_k:
    H(top-k) - r log p_k <= H <= H(top-k) + r log((V - k) / r), the upper one a uniform tail."""
    p = np.exp(logprobs[:, :k])                                                             # (P, k)
    support = -(p * logprobs[:, :k]).sum(-1)                                                # (P,)
    r = np.clip(1.0 - p.sum(-1), 0.0, 1.0)                                                  # (P,)
    smallest = np.maximum(p.min(-1), 1e-300)                                                # (P,) p_k
    missing = max(vocab_size - k, 1)
    lower = support - r * np.log(smallest)
    upper = support + np.where(r > 0, r * np.log(missing / np.maximum(r, 1e-300)), 0.0)
    return lower, np.maximum(upper, lower)  # values rounded by the encoding can cross by a hair


def describe(path: Path, max_shards: int = 8) -> dict:
    """Summary of a store, complete or not. Signal statistics come from up to `max_shards` committed shards
    (spread over the store).

    A store that a stage is still writing (or that was killed) is described as far as it goes: `complete` false,
    `progress` (shards committed of those expected), and the positions (tokens) committed so far; its statistics
    cover the committed shards.
    Teacher mass covered is the exact top-k mass sum exp(logprobs) per position (topk, and the exact part of
    hybrid); a sample estimate sums to 1 by construction, so there it is not applicable (None). The entropies are
    named for what they are: `support_entropy_mean` is that of what the cache holds, the teacher's own entropy
    is bounded where the kind allows (ENTROPY_MEANING, said in the output's `entropy` field).
    """
    store = Store.open(Path(path), require_complete=False)
    complete = store.manifest.complete  # what readers (train, evaluate) accept
    if not complete:
        # a running or killed writer records its shards in the manifest at the end (or on its rerun); until then
        # its progress is the shards committed on disk, each with its commit record (checksum included)
        # (read only for the shards the manifest does not list yet; the folder is listed once)
        listed = {s.name: s for s in store.manifest.shards}
        on_disk = store._listed()
        present = set(on_disk)
        listed = {name: rec for name, rec in listed.items() if name in present}
        listed.update(store.committed([name for name in on_disk if name not in listed]))
        shards = tuple(sorted(listed.values(), key=lambda r: (r.split, r.start)))
        store = Store(store.path, replace(store.manifest, shards=shards))  # a read-only view: nothing is written
    m = store.manifest
    seq_len = m.params["seq_len"]
    sequences = m.shards.sequences()  # O(splits), not a record per shard
    expected = m.layout.sequences()
    # committed shards' data files as their commit records measured them: no file is walked (at 10^5 shards a walk
    # costs tens of seconds)
    on_disk = m.nbytes()
    info = {"path": str(path), "kind": m.kind, "backend": m.backend, "complete": complete,
            "progress": f"{len(m.shards)} of {len(m.layout)} shards committed"
                        + ("" if complete else f" ({sequences * seq_len} of {expected * seq_len} tokens so far)"),
            "shards": len(m.shards), "shards_expected": len(m.layout), "sequences": sequences,
            "positions": sequences * seq_len, "positions_expected": expected * seq_len,
            "seq_len": seq_len, "vocab_size": m.params["vocab_size"], "bytes": on_disk,
            "bytes_per_token": on_disk / max(1, sequences * seq_len), "fingerprint": m.fingerprint(),
            **{f"{k}_fingerprint": v for k, v in m.fingerprints.items()}}
    if m.kind == "tokens":
        info.update(format=m.params["format"], splits=m.params["splits"])
        return info
    kind = m.params["signal"]
    info.update(signal=kind, k=m.params.get("k") if kind != "sample" else None,
                samples=m.params.get("samples") if kind != "topk" else None,
                draws=sample_draws(m.params) if kind != "topk" else None,
                value_encoding=m.params.get("value_encoding", m.params.get("value_dtype")) if kind != "sample" else None,
                temperature=m.params.get("temperature"), seed=m.params.get("seed"), teacher=m.params.get("teacher"))
    if not m.shards:  # nothing committed yet: nothing to measure
        return info
    shards = m.shards  # in layout order; only the picked ones are built
    picks = np.unique(np.linspace(0, len(shards) - 1, min(max_shards, len(shards))).astype(int))
    covered, entropy, entries, lower, upper = [], [], [], [], []
    for i in picks:
        sig = read_shard(store, shards[i].name)
        logprobs = sig["logprobs"].reshape(-1, sig["logprobs"].shape[-1]).astype(np.float64)  # (P, C)
        present = ~np.isneginf(logprobs)
        p = np.exp(logprobs)                                                                  # 0 where no entry
        entropy.append(-(p * np.where(present, logprobs, 0.0)).sum(-1))
        entries.append(present.sum(-1))
        if kind != "sample":
            covered.append(mass_covered(logprobs, m.params))
            low, high = entropy_bounds(logprobs, m.params["k"], m.params["vocab_size"])
            lower.append(low)
            upper.append(high)
    entropy_all = np.concatenate(entropy)
    if covered:
        covered_all = np.concatenate(covered)
        mass = {"mass_covered_mean": float(covered_all.mean()),
                "mass_covered_p10": float(np.percentile(covered_all, 10))}
    else:
        mass = {"mass_covered_mean": None, "mass_covered_p10": None,
                "mass_covered": "not applicable: a sampled estimate sums to 1 by construction"}
    bounds = (float(np.concatenate(lower).mean()), float(np.concatenate(upper).mean())) if lower else (None, None)
    info.update(**mass, support_entropy_mean=float(entropy_all.mean()),
                teacher_entropy_lower_mean=bounds[0], teacher_entropy_upper_mean=bounds[1],
                entropy=ENTROPY_MEANING[kind],
                entries_per_position_mean=float(np.concatenate(entries).mean()), sampled_positions=int(entropy_all.size))
    return info

