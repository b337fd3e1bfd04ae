"""The trainer's stream: batches gathered from shards equal the same sequences read one by one."""
import numpy as np
import pytest

from kdcache.stages.data import CachedKDDataset, epoch_order, signal_key, stack_sequences
from kdcache.storage import Manifest, Store, encode_signal, make_layout, open_store, read_sequence

V, T = 50, 6


def _stores(tmp_path):
    """A token store of 11 train sequences in shards of 4, and two `sample` signal stores (a committee) whose
    shards hold different widths M, so batches that span shards must be padded."""
    layout = make_layout({"train": 11}, 4)
    rng = np.random.default_rng(0)
    tokens = Store.create(tmp_path / "tokens", Manifest(kind="tokens", backend="zarr",
                                                        fingerprints={"tokenizer": "tok"},
                                                        params={"seq_len": T, "vocab_size": V}, layout=layout))
    for rec in layout:
        tokens.write_shard(rec.name, {"input_ids": rng.integers(0, V, (rec.count, T)).astype(np.uint16),
                                      "loss_mask": rng.integers(0, 2, (rec.count, T)).astype(np.uint8)})
    tokens.refresh_manifest()
    tokens.close()
    expect = {"tokenizer": "tok", "token_store": tokens.manifest.fingerprint()}
    for source in ("teacher", "helper"):
        store = Store.create(tmp_path / source, Manifest(
            kind="signals", backend="zarr", fingerprints=expect, layout=layout,
            params={"signal": "sample", "k": None, "samples": 9, "value_encoding": "float16", "vocab_size": V,
                    "seq_len": T}))
        for i, rec in enumerate(layout):
            m = 2 + (i + len(source)) % 3                                       # widths differ shard to shard
            ids = np.argsort(rng.random((rec.count, T, V)), -1)[..., :m]        # (n, T, M) distinct ids
            counts = np.zeros((rec.count, T, m), np.int64)
            counts[..., 0] = 9 - (m - 1)
            counts[..., 1:] = 1
            store.write_shard(rec.name, encode_signal("sample", {"ids": ids, "counts": counts}, V))
        store.refresh_manifest()
        store.close()
    return open_store(tmp_path / "tokens"), {s: open_store(tmp_path / s) for s in ("teacher", "helper")}


def _one_by_one(tokens, signals, order):
    """The batch of sequences `order` (train indices) read through the public API, one sequence at a time."""
    sequences = []
    for index in order:
        seq = read_sequence(tokens, "train", index)
        out = {"input_ids": seq["input_ids"].astype(np.int64), "loss_mask": seq["loss_mask"].astype(bool)}
        for source, store in signals.items():
            sig = read_sequence(store, "train", index)
            for field, name in (("sig_ids", "ids"), ("sig_logprobs", "logprobs"), ("sig_lognorm", "lognorm")):
                out[signal_key(field, source)] = sig[name]
        sequences.append(out)
    return stack_sequences(sequences)


@pytest.mark.parametrize("start", [0, 6])
def test_batches_spanning_shards_equal_the_sequences_read_one_by_one(tmp_path, start):
    tokens, signals = _stores(tmp_path)
    records = tokens.manifest.splits()["train"]
    stream = []  # the train indices in stream order over two epochs
    for epoch in range(2):
        for shard, perm in epoch_order(len(records), [r.count for r in records], 5, epoch):
            stream += [records[shard].start + int(j) for j in perm]
    dataset = CachedKDDataset(tokens, signals, "train", 3, seed=5, start=start, epochs=2)
    position = start
    for got_position, batch in dataset:
        want = _one_by_one(tokens, signals, stream[position:position + 3])
        position = min(position + 3, len(stream))
        assert got_position == position and sorted(batch) == sorted(want)
        for name in want:
            assert batch[name].dtype == want[name].dtype, name
            np.testing.assert_array_equal(batch[name], want[name], err_msg=name)
    assert position == len(stream)


def test_stacking_pads_every_committee_member_to_its_widest():
    a = {"sig_ids@x": np.array([[5, 6]]), "sig_logprobs@x": np.array([[-0.1, -2.0]], np.float32)}
    b = {"sig_ids@x": np.array([[1, 2, 3]]), "sig_logprobs@x": np.full((1, 3), -1.1, np.float32)}
    batch = stack_sequences([a, b])
    np.testing.assert_array_equal(batch["sig_ids@x"][0], [[5, 6, 5]])
    assert np.isneginf(batch["sig_logprobs@x"][0, 0, 2])
