"""Streaming reader: token store + signal store in lockstep, shard by shard, with a background prefetch thread.

Order: each epoch visits the shards in a seeded random order and the sequences of each shard in a seeded random
order. A stream position is the number of sequences consumed since the start of training, so a checkpoint
stores one integer and resuming skips whole shards without reading them.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from kdcache.storage import Store, decode_signal
from kdcache.storage.codecs import pad_signal


def epoch_order(n_shards: int, shard_sizes: list[int], seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """[(shard index, permutation of its sequences)] for one epoch."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_shards)
    return [(int(s), rng.permutation(shard_sizes[s])) for s in order]


SIGNAL_FIELDS = ("sig_ids", "sig_logprobs", "sig_lognorm")


def signal_key(field: str, source: str | None) -> str:
    """Batch key of a signal field: "sig_ids" for a single store, "sig_ids@<source>" for a committee member."""
    return field if source is None else f"{field}@{source}"


class CachedKDDataset(IterableDataset):
    """Yields (next_position, batch) forever (epoch after epoch), starting at sequence position `start`.

    batch (numpy): input_ids (B, T) int64, loss_mask (B, T) bool, and with a signal store
    sig_ids (B, T, C) int64, sig_logprobs (B, T, C) float32, sig_lognorm (B, T) float32 (decoded, any kind;
    sampled kinds have a different C per shard: a batch is padded to its widest, see `stack_sequences`).
    `signals` may be a dict {source: Store} (a committee): every member is read in lockstep (same shard, same
    sequence order) and its fields are keyed signal_key(field, source), e.g. "sig_ids@teacher".
    `shards` restricts the stream to a subset of the split's shards. With `world` > 1 ranks, every rank computes
    the same epoch order and streams only its share of it (entries rank, rank + world, ...): the ranks read
    disjoint shards, and with shards of `batch_size` sequences the ranks' batches of a step are together exactly
    the single-process batch of world * batch_size. Positions then count this rank's sequences.
    """

    def __init__(self, tokens: Store, signals: Store | dict[str, Store] | None, split: str, batch_size: int,
                 seed: int = 0, start: int = 0, shuffle: bool = True, shards: list[str] | None = None,
                 epochs: int | None = None, rank: int = 0, world: int = 1):
        super().__init__()
        self.tokens, self.signals = tokens, signals
        if isinstance(signals, dict):
            if not signals:
                raise ValueError("a committee needs at least one signal store")
            expect = {"token_store": tokens.manifest.fingerprint(),
                      "tokenizer": tokens.manifest.fingerprints["tokenizer"]}
            for store in signals.values():  # aligned with these tokens, or positions would silently mismatch
                store.check(expect)
        records = tokens.manifest.splits().get(split, [])
        if shards is not None:
            records = [r for r in records if r.name in set(shards)]
        if not records:
            raise ValueError(f"token store {tokens.path} has no shards in split {split!r}")
        if len(records) < world:
            raise ValueError(f"token store {tokens.path} has {len(records)} {split} shards, fewer than the "
                             f"{world} ranks: prepare with a smaller prepare.shard_sequences")
        self.records = records
        self.n_sequences = sum(r.count for r in records)
        self.batch_size, self.seed, self.start, self.shuffle, self.epochs = batch_size, seed, start, shuffle, epochs
        self.rank, self.world = rank, world

    def _shard(self, name: str) -> dict[str, np.ndarray]:
        arrays = self.tokens.read_shard(name)
        out = {"input_ids": arrays["input_ids"].astype(np.int64), "loss_mask": arrays["loss_mask"].astype(bool)}
        stores = self.signals if isinstance(self.signals, dict) else {None: self.signals}
        for source, store in stores.items():
            if store is not None:
                sig = decode_signal(store.read_shard(name), store.manifest.params)
                for field, array in zip(SIGNAL_FIELDS, (sig["ids"], sig["logprobs"], sig["lognorm"])):
                    out[signal_key(field, source)] = array
        return out

    def _epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """This rank's [(shard index, permutation of its sequences)] of one epoch."""
        sizes = [r.count for r in self.records]
        if self.shuffle:
            order = epoch_order(len(self.records), sizes, self.seed, epoch)
        else:
            order = [(i, np.arange(n)) for i, n in enumerate(sizes)]
        return order[self.rank::self.world]

    def _runs(self) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        """(position before the run, a shard's arrays, the run's sequence order in it) from self.start on: what
        is left of each shard of each epoch, in stream order."""
        epoch, before = 0, 0  # before: this rank's sequences in the epochs before `epoch`
        while self.epochs is None or epoch < self.epochs:
            order = self._epoch(epoch)
            length = sum(len(perm) for _, perm in order)
            offset = self.start - before
            if offset < length:
                seen = 0
                for shard_index, perm in order:
                    skip = max(0, offset - seen)
                    if skip < len(perm):  # a shard wholly consumed before the resume point is not read
                        yield before + seen + skip, self._shard(self.records[shard_index].name), perm[skip:]
                    seen += len(perm)
            epoch, before = epoch + 1, before + length

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        # a batch is gathered from its shard(s) with one fancy index per array and part, not sequence by sequence
        parts, have, position = [], 0, self.start
        for first, arrays, order in self._runs():
            at = 0
            while at < len(order):
                take = min(self.batch_size - have, len(order) - at)
                rows = order[at:at + take]
                parts.append({k: v[rows] for k, v in arrays.items()})
                have, at = have + take, at + take
                position = first + at
                if have == self.batch_size:
                    yield position, join_batches(parts)
                    parts, have = [], 0
        if parts:  # only reached with a finite number of epochs
            yield position, join_batches(parts)


def join_batches(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate batches (arrays with a leading sequence axis) into one. Signal widths C can differ between
    shards (sampled kinds): narrower ones are padded the way the decoder marks unused slots (`pad_signal`: id = the
    position's first id, logprob = -inf)."""
    if len(parts) == 1:
        return parts[0]
    parts = [dict(p) for p in parts]
    for ids_key in [k for k in parts[0] if k.split("@")[0] == "sig_ids"]:  # every source of a committee
        logprobs_key = ids_key.replace("sig_ids", "sig_logprobs", 1)
        width = max(p[ids_key].shape[-1] for p in parts)
        for p in parts:
            padded = pad_signal({"ids": p[ids_key], "logprobs": p[logprobs_key]}, width)
            p[ids_key], p[logprobs_key] = padded["ids"], padded["logprobs"]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def stack_sequences(sequences: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack single sequences into a batch (padded as `join_batches` pads)."""
    return join_batches([{name: a[None].copy() for name, a in s.items()} for s in sequences])


def to_device(batch: dict[str, np.ndarray], device: torch.device, pin: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v)
        if pin:
            t = t.pin_memory()
        out[k] = t.to(device, non_blocking=pin)
    return out


class Prefetcher:
    """Reads ahead `depth` batches in a background thread (decode + pinning overlap the model's compute)."""

    _END = object()

    def __init__(self, iterable, device: torch.device, depth: int = 4):
        self.device, self.pin = device, device.type == "cuda"
        self.iterator = iter(iterable)
        self.depth = depth
        if depth > 0:
            self.queue: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._fill, daemon=True)
            self.thread.start()

    def _fill(self):
        try:
            for position, batch in self.iterator:
                tensors = {k: torch.from_numpy(v).pin_memory() if self.pin else torch.from_numpy(v)
                           for k, v in batch.items()}
                while not self.stop.is_set():
                    try:
                        self.queue.put((position, tensors), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # hand reader errors to the consumer thread
            self.queue.put(e)
            return
        self.queue.put(self._END)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, dict[str, torch.Tensor]]:
        if self.depth == 0:
            position, batch = next(self.iterator)
            return position, to_device(batch, self.device, self.pin)
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        position, tensors = item
        return position, {k: v.to(self.device, non_blocking=self.pin) for k, v in tensors.items()}

    def close(self):
        if self.depth > 0:
            self.stop.set()
