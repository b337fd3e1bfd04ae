"""One conformance suite for every storage backend: the same behaviour behind `Store`, whichever files hold it."""
import os

import numpy as np
import pytest

from kdcache.storage import Manifest, Store, StoreError, encode_signal, make_layout, open_store
from kdcache.storage.manifest import ShardRecord
from kdcache.storage.store import BACKENDS

pytestmark = pytest.mark.parametrize("backend", sorted(BACKENDS))


def _manifest(backend, **params):
    layout = make_layout({"train": 6, "validation": 2}, shard_sequences=3)
    return Manifest(kind="tokens", backend=backend, fingerprints={"tokenizer": "tok-a"},
                    params={"seq_len": 5, "vocab_size": 100, **params}, layout=layout)


def _arrays(rec, seed=0):
    rng = np.random.default_rng([seed, rec.start, len(rec.split)])
    return {"input_ids": rng.integers(0, 100, (rec.count, 5)).astype(np.uint16),
            "loss_mask": rng.integers(0, 2, (rec.count, 5)).astype(np.uint8)}


def _fill(store, skip=()):
    for rec in store.manifest.layout:
        if rec.name not in skip:
            store.write_shard(rec.name, _arrays(rec))
    return store.refresh_manifest()


def _files(path):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((path / "shards").rglob("*")) if p.is_file()}


def _data_file(store, name):
    """The largest data file of a shard (what a bit flip most likely hits)."""
    files = [p for p in store.shard_dir(name).rglob("*") if p.is_file() and p.name not in ("_commit.json", "zarr.json")]
    return max(files, key=lambda p: p.stat().st_size)


def test_write_read_and_list(tmp_path, backend):
    store = Store.create(tmp_path / "s", _manifest(backend))
    manifest = _fill(store)
    assert manifest.complete and manifest.backend == backend
    assert sorted(store.committed()) == [r.name for r in manifest.layout]
    opened = open_store(tmp_path / "s")
    for rec in manifest.layout:
        got, want = opened.read_shard(rec.name), _arrays(rec)
        assert sorted(got) == sorted(want)
        for name in want:
            assert got[name].dtype == want[name].dtype
            np.testing.assert_array_equal(got[name], want[name])
    assert opened.read_shard("train-00001", ["loss_mask"]).keys() == {"loss_mask"}
    suffix = BACKENDS[backend].SUFFIX
    assert (tmp_path / "s" / "shards" / "train-00000" / f"data{suffix}").exists()


def test_resume_skips_committed_shards(tmp_path, backend):
    store = Store.create(tmp_path / "s", _manifest(backend))
    _fill(store, skip={"train-00001"})
    before = _files(tmp_path / "s")
    again = Store.create(tmp_path / "s", _manifest(backend))
    assert set(again.committed()) == {"train-00000", "validation-00000"}
    assert set(again.committed(["train-00000", "train-00001"])) == {"train-00000"}  # only the shards asked about
    again.write_shard("train-00001", _arrays(again.manifest.layout[1]))
    assert again.refresh_manifest().complete
    after = _files(tmp_path / "s")
    assert all(after[p] == v for p, v in before.items())  # committed shards untouched


def test_idempotent_rewrite_is_a_no_op_and_different_content_is_refused(tmp_path, backend):
    store = Store.create(tmp_path / "s", _manifest(backend))
    rec = store.manifest.layout[0]
    first = store.write_shard(rec.name, _arrays(rec))
    before = _files(tmp_path / "s")
    second = store.write_shard(rec.name, _arrays(rec))
    assert first == second and _files(tmp_path / "s") == before
    with pytest.raises(StoreError, match="train-00000 already exists with different content"):
        store.write_shard(rec.name, _arrays(rec, seed=1))
    assert _files(tmp_path / "s") == before


def test_expectations_are_refused_naming_both_values(tmp_path, backend):
    _fill(Store.create(tmp_path / "s", _manifest(backend)))
    with pytest.raises(StoreError, match="has tokenizer 'tok-a' but 'tok-b' is expected") as e:
        open_store(tmp_path / "s", expect={"tokenizer": "tok-b"})
    assert "\n" not in str(e.value)
    with pytest.raises(StoreError, match="has seq_len 5 but 6 is expected"):
        open_store(tmp_path / "s", expect={"seq_len": 6})
    with pytest.raises(StoreError, match="different params.*seq_len: 5 vs 6"):
        Store.create(tmp_path / "s", _manifest(backend, seq_len=6))


def _codec_arrays(n):
    """Every stored array the codecs produce: each kind x value encoding x id width, for n sequences."""
    rng = np.random.default_rng(n)
    t, k = 4, 3
    logprobs = -np.sort(rng.exponential(2.0, (n, t, k)), -1).astype(np.float32)
    ids = np.broadcast_to(np.arange(k), (n, t, k)) * 7 + 1
    counts = np.zeros((n, t, 2), np.int64)
    counts[..., 0] = 5
    top = {"ids": ids, "logprobs": logprobs, "lognorm": rng.standard_normal((n, t))}
    out = {}
    for vocab in (1000, 100_000):
        for encoding in ("float16", "float32", "int8"):
            for kind, sig in [("topk", top), ("sample", {"ids": ids[..., :2], "counts": counts}),
                              ("hybrid", {**top, "tail_ids": ids[..., :2] + 500, "tail_counts": counts})]:
                for name, a in encode_signal(kind, sig, vocab, encoding).items():
                    out[f"{kind}-{encoding}-{vocab}-{name}"] = a
    out["trailing-zero"] = np.zeros((n, t, 0), np.uint16)
    out["bool"] = rng.integers(0, 2, (n, t)).astype(bool)
    out["int64"] = rng.integers(-2**40, 2**40, (n,))
    return out


def test_every_codec_dtype_and_shape_round_trips(tmp_path, backend):
    layout = (ShardRecord("train-00000", "train", 0, 3), ShardRecord("train-00001", "train", 3, 0),
              ShardRecord("train-00002", "train", 3, 11))  # 11: more sequences than a zarr inner chunk, not a multiple
    store = Store.create(tmp_path / "s", Manifest(kind="test", backend=backend, layout=layout))
    written = {rec.name: _codec_arrays(rec.count) for rec in layout}
    written["train-00002"] = {k: v for k, v in written["train-00002"].items() if k.startswith(("topk-int8", "bool"))}
    assert any(a.dtype == np.uint8 and "ids" in name for name, a in written["train-00000"].items())  # bit-packed
    for name, arrays in written.items():
        store.write_shard(name, arrays)
    store.refresh_manifest()
    for name, want in written.items():
        got = store.read_shard(name)
        assert sorted(got) == sorted(want)
        for key, a in want.items():
            assert got[key].dtype == a.dtype and got[key].shape == a.shape, key
            np.testing.assert_array_equal(got[key], a)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corruption_is_detected_and_named(tmp_path, backend, damage):
    store = Store.create(tmp_path / "s", _manifest(backend))
    _fill(store)
    opened = open_store(tmp_path / "s")
    victim = _data_file(opened, "train-00001")
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x01]) + data[len(data) // 2 + 1:])
    elif damage == "truncate":
        victim.write_bytes(data[:len(data) // 2])
    else:
        os.remove(victim)
    rel = victim.relative_to(opened.shard_dir("train-00001")).as_posix()
    state = "is missing" if damage == "delete" else "differs"
    with pytest.raises(StoreError, match=f"shard .*train-00001 is corrupted \\(file {rel} {state}, checksum"):
        opened.read_shard("train-00001")
    opened.read_shard("train-00000")  # the others still read


def _flip_keeping_size_and_mtime(path):
    """A silent in-place change: same size, mtime put back (only ctime and the bytes tell)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_shard_is_hashed_once_per_open_store_while_unchanged(tmp_path, backend, monkeypatch):
    import kdcache.storage.store

    _fill(Store.create(tmp_path / "s", _manifest(backend)))
    hashed = []
    real = kdcache.storage.store._checksum
    monkeypatch.setattr(kdcache.storage.store, "_checksum", lambda files: hashed.append(1) or real(files))
    first = open_store(tmp_path / "s")
    for _ in range(3):
        first.read_shard("train-00000")
    assert len(hashed) == 1
    open_store(tmp_path / "s").read_shard("train-00000")  # another open store verifies for itself
    assert len(hashed) == 2


def test_a_shard_corrupted_after_a_verified_read_is_still_caught(tmp_path, backend):
    _fill(Store.create(tmp_path / "s", _manifest(backend)))
    opened = open_store(tmp_path / "s")
    opened.read_shard("train-00001")  # verified and remembered
    victim = _data_file(opened, "train-00001")
    _flip_keeping_size_and_mtime(victim)
    rel = victim.relative_to(opened.shard_dir("train-00001")).as_posix()
    with pytest.raises(StoreError, match=f"train-00001 is corrupted \\(file {rel} differs"):
        opened.read_shard("train-00001")  # the same store: the file changed since it was verified
    with pytest.raises(StoreError, match="train-00001 is corrupted"):
        open_store(tmp_path / "s").read_shard("train-00001")  # a later open


def test_read_sequence_decodes_a_shard_once_and_hands_out_copies(tmp_path, backend, monkeypatch):
    from kdcache.storage import read_sequence

    _fill(Store.create(tmp_path / "s", _manifest(backend)))
    opened = open_store(tmp_path / "s")
    decoded = []
    real = opened.backend.decode
    monkeypatch.setattr(opened.backend, "decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    rec = opened.manifest.shard("train-00001")
    want = _arrays(rec)
    for i in range(rec.count):
        got = read_sequence(opened, "train", rec.start + i)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"][i])
        got["input_ids"][:] = 0  # the caller's copy: the kept shard is unchanged
    assert len(decoded) == 1
    np.testing.assert_array_equal(read_sequence(opened, "train", rec.start)["input_ids"], want["input_ids"][0])
    _flip_keeping_size_and_mtime(_data_file(opened, "train-00001"))  # the kept shard is not served once changed
    with pytest.raises(StoreError, match="train-00001 is corrupted"):
        read_sequence(opened, "train", rec.start)
