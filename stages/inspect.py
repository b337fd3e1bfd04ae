"""`kdcache inspect`: what a store holds, read through the public storage API."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from storage import open_store, read_shard


def describe(path: Path, max_shards: int = 8) -> dict:
    """Summary of a store. Signal statistics come from up to `max_shards` shards (spread over the store)."""
    store = open_store(path)
    m = store.manifest
    positions = sum(r.count for r in m.shards) * m.params["seq_len"]
    info = {"path": str(path), "kind": m.kind, "backend": m.backend, "complete": m.complete,
            "shards": len(m.shards), "sequences": sum(r.count for r in m.shards), "positions": positions,
            "seq_len": m.params["seq_len"], "vocab_size": m.params["vocab_size"], "bytes": store.nbytes(),
            "bytes_per_token": store.nbytes() / max(1, positions), "fingerprint": m.fingerprint(),
            **{f"{k}_fingerprint": v for k, v in m.fingerprints.items()}}
    if m.kind == "tokens":
        info.update(format=m.params["format"], splits=m.params["splits"])
        return info
    info.update(signal=m.params["signal"], k=m.params["k"], value_encoding=m.params.get("value_encoding", m.params.get("value_dtype")),
                teacher=m.params["teacher"])
    picks = np.unique(np.linspace(0, len(m.shards) - 1, min(max_shards, len(m.shards))).astype(int))
    covered, entropy = [], []
    for i in picks:
        logprobs = read_shard(store, m.shards[i].name)["logprobs"].reshape(-1, m.params["k"])  # (n, K)
        p = np.exp(logprobs)
        covered.append(p.sum(-1))
        # entropy of the support part only: a lower bound of the teacher's entropy
        entropy.append(-(p * logprobs).sum(-1))
    covered_all, entropy_all = np.concatenate(covered), np.concatenate(entropy)
    info.update(mass_covered_mean=float(covered_all.mean()), mass_covered_p10=float(np.percentile(covered_all, 10)),
                support_entropy_mean=float(entropy_all.mean()), sampled_positions=int(covered_all.size))
    return info
