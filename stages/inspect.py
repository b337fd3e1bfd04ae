"""`kdcache inspect`: what a store holds, read through the public storage API."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcache.storage import open_store, read_shard
from kdcache.storage.codecs import sample_draws
from kdcache.storage.store import SHARDS_DIR


def bytes_on_disk(path: Path) -> int:
    """Total size of the files under the store's shards folder, as they are on disk now."""
    return sum(p.stat().st_size for p in (Path(path) / SHARDS_DIR).rglob("*") if p.is_file())


def mass_covered(logprobs: np.ndarray, params: dict) -> np.ndarray | None:
    """Teacher mass on the exact top-k of each position, logprobs (..., C) -> (...): topk, and the exact part of
    hybrid. None for sample: a sampled estimate sums to 1 by construction."""
    if params.get("signal", "topk") == "sample":
        return None
    return np.exp(logprobs[..., :params["k"]].astype(np.float64)).sum(-1)


def describe(path: Path, max_shards: int = 8) -> dict:
    """Summary of a store. Signal statistics come from up to `max_shards` shards (spread over the store).

    Teacher mass covered is the exact top-k mass sum exp(logprobs) per position (topk, and the exact part of
    hybrid); a sample estimate sums to 1 by construction, so there it is not applicable (None). Entropy is that of
    the decoded estimate, -sum p log p over its entries (for topk the support part only: a lower bound).
    """
    store = open_store(path)
    m = store.manifest
    positions = sum(r.count for r in m.shards) * m.params["seq_len"]
    on_disk = bytes_on_disk(path)
    info = {"path": str(path), "kind": m.kind, "backend": m.backend, "complete": m.complete,
            "shards": len(m.shards), "sequences": sum(r.count for r in m.shards), "positions": positions,
            "seq_len": m.params["seq_len"], "vocab_size": m.params["vocab_size"], "bytes": on_disk,
            "bytes_per_token": on_disk / max(1, positions), "fingerprint": m.fingerprint(),
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
    picks = np.unique(np.linspace(0, len(m.shards) - 1, min(max_shards, len(m.shards))).astype(int))
    covered, entropy, entries = [], [], []
    for i in picks:
        sig = read_shard(store, m.shards[i].name)
        logprobs = sig["logprobs"].reshape(-1, sig["logprobs"].shape[-1]).astype(np.float64)  # (P, C)
        present = ~np.isneginf(logprobs)
        p = np.exp(logprobs)                                                                  # 0 where no entry
        entropy.append(-(p * np.where(present, logprobs, 0.0)).sum(-1))
        entries.append(present.sum(-1))
        if kind != "sample":
            covered.append(mass_covered(logprobs, m.params))
    entropy_all = np.concatenate(entropy)
    if covered:
        covered_all = np.concatenate(covered)
        mass = {"mass_covered_mean": float(covered_all.mean()),
                "mass_covered_p10": float(np.percentile(covered_all, 10))}
    else:
        mass = {"mass_covered_mean": None, "mass_covered_p10": None,
                "mass_covered": "not applicable: a sampled estimate sums to 1 by construction"}
    info.update(**mass, entropy_mean=float(entropy_all.mean()),
                entries_per_position_mean=float(np.concatenate(entries).mean()), sampled_positions=int(entropy_all.size))
    return info
