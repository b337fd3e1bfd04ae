"""kdcache storage: token stores and signal stores on disk. numpy and bytes only — no torch here.

Public reading API (used by the trainer, `kdcache inspect` and outside tools alike):

    >>> from storage import open_store, read_sequence
    >>> tokens = open_store("runs/default/tokens")
    >>> signals = open_store("runs/default/signals/teacher",
    ...                      expect={"token_store": tokens.manifest.fingerprint()})
    >>> seq = read_sequence(tokens, "validation", 0)     # {"input_ids": (T,), "loss_mask": (T,)}
    >>> sig = read_sequence(signals, "validation", 0)    # {"ids": (T, C) int64, "logprobs": (T, C) float32,
    ...                                                  #  "lognorm": (T,) float32}

Every signal kind (topk, sample, hybrid; see kdcache.storage.codecs) decodes to the same sparse target: teacher
log-probability estimates over the full vocabulary of C ids per position, -inf marking an unused slot. For topk,
exp(logprobs) are the exact support probabilities, the tail mass is 1 - exp(logprobs).sum(-1), and the teacher
logits of the support are logprobs + lognorm[..., None].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcache.storage.codecs import decode_signal, encode_signal
from kdcache.storage.errors import StoreError
from kdcache.storage.manifest import Manifest, ShardRecord
from kdcache.storage.store import Store, files_unchanged, make_layout

__all__ = ["Manifest", "ShardRecord", "Store", "StoreError", "decode_signal", "encode_signal", "make_layout",
           "open_store", "read_sequence", "read_shard"]


def open_store(path: str | Path, expect: dict | None = None) -> Store:
    """Open a complete store for reading; `expect` maps fingerprint/param names to required values."""
    return Store.open(Path(path), expect=expect)


def read_shard(store: Store, name: str) -> dict[str, np.ndarray]:
    """All arrays of one shard; a signal shard decoded by `decode_signal` (ids int64, logprobs/lognorm float32)."""
    arrays = store.read_shard(name)
    if store.manifest.kind == "signals":
        return decode_signal(arrays, store.manifest.params)
    return arrays


def read_sequence(store: Store, split: str, index: int) -> dict[str, np.ndarray]:
    """The arrays of sequence `index` of `split` (for a signal store: its sparse signal per position).

    A sequence is read with its whole shard (the shard's files are verified and decoded together): the last shard
    read is kept, decoded, on the store and reused while its files are unchanged, so reading a shard's sequences
    one by one reads, verifies and decodes it once."""
    shard = store.manifest.find(split, index)
    if shard is None:
        n = sum(s.count for s in store.manifest.splits().get(split, []))
        raise StoreError(f"{store.path} has no sequence {index} in split {split!r} ({n} sequences)")
    cached = store.last_read
    if cached is None or cached[0] != shard.name or not files_unchanged(store.shard_dir(shard.name), cached[1]):
        arrays = read_shard(store, shard.name)
        cached = store.last_read = (shard.name, store.verified_signature(shard.name), arrays)
    # copies: the caller may write to what it gets, the kept shard must stay as read
    return {name: a[index - shard.start].copy() for name, a in cached[2].items()}
