"""The sharded store: atomic commit, resume, idempotent rewrite, checksums, fingerprints, the reading API."""
import json

import numpy as np
import pytest

from kdcache.storage import Manifest, Store, StoreError, make_layout, open_store, read_sequence
from kdcache.storage.codecs import decode_signal, encode_signal, signal_params
from kdcache.storage.manifest import read_manifest


def _manifest(**params):
    layout = make_layout({"train": 10, "validation": 3}, shard_sequences=4)
    return Manifest(kind="tokens", backend="zarr", fingerprints={"tokenizer": "tok-a"},
                    params={"seq_len": 5, "vocab_size": 100, **params}, layout=layout)


def _arrays(rec, seed=0):
    rng = np.random.default_rng([seed, rec.start, len(rec.split)])
    return {"input_ids": rng.integers(0, 100, (rec.count, 5)).astype(np.uint16),
            "loss_mask": np.ones((rec.count, 5), np.uint8)}


def _fill(store, skip=()):
    for rec in store.manifest.layout:
        if rec.name not in skip:
            store.write_shard(rec.name, _arrays(rec))
    return store.refresh_manifest()


def test_layout_cuts_splits_into_shards():
    layout = make_layout({"train": 10, "validation": 3}, 4)
    assert [(r.name, r.start, r.count) for r in layout] == [
        ("train-00000", 0, 4), ("train-00001", 4, 4), ("train-00002", 8, 2), ("validation-00000", 0, 3)]


def test_write_read_roundtrip_and_sequence_api(tmp_path):
    store = Store.create(tmp_path / "s", _manifest())
    manifest = _fill(store)
    assert manifest.complete
    opened = open_store(tmp_path / "s")
    rec = manifest.layout[1]
    want = _arrays(rec)
    got = read_sequence(opened, "train", 5)  # sequence 5 lives in shard 1 at offset 1
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"][1])
    assert got["input_ids"].dtype == np.uint16
    with pytest.raises(StoreError, match="no sequence 3 in split 'validation'"):
        read_sequence(opened, "validation", 3)


def test_incomplete_store_is_refused_then_resumed(tmp_path):
    store = Store.create(tmp_path / "s", _manifest())
    _fill(store, skip={"train-00002"})
    with pytest.raises(StoreError, match="incomplete \\(1 of 4 shards missing\\)"):
        open_store(tmp_path / "s")
    # a rerun with the same inputs reopens the store and sees what is already committed
    again = Store.create(tmp_path / "s", _manifest())
    assert set(again.committed()) == {"train-00000", "train-00001", "validation-00000"}
    again.write_shard("train-00002", _arrays(again.manifest.layout[2]))
    assert again.refresh_manifest().complete


def test_killed_writer_leaves_no_readable_partial_shard(tmp_path):
    store = Store.create(tmp_path / "s", _manifest())
    # what a writer killed mid-shard leaves: a temporary folder, never a shard under its final name
    partial = tmp_path / "s" / "shards" / ".tmp-train-00000-deadbeef"
    partial.mkdir()
    (partial / "junk").write_bytes(b"half a shard")
    assert store.committed() == {}
    store.refresh_manifest()
    assert not partial.exists()


def test_idempotent_rewrite_and_conflicting_rewrite(tmp_path):
    store = Store.create(tmp_path / "s", _manifest())
    rec = store.manifest.layout[0]
    first = store.write_shard(rec.name, _arrays(rec))
    second = store.write_shard(rec.name, _arrays(rec))
    assert first.checksum == second.checksum
    with pytest.raises(StoreError, match="already exists with different content"):
        store.write_shard(rec.name, _arrays(rec, seed=1))


def test_existing_store_with_other_inputs_is_refused_or_overwritten(tmp_path):
    _fill(Store.create(tmp_path / "s", _manifest()))
    other = _manifest(seq_len=6)
    with pytest.raises(StoreError, match="different params.*seq_len: 5 vs 6"):
        Store.create(tmp_path / "s", other)
    fresh = Store.create(tmp_path / "s", other, overwrite=True)
    assert fresh.committed() == {} and read_manifest(tmp_path / "s").params["seq_len"] == 6


def test_corrupted_shard_is_detected_and_named(tmp_path):
    store = Store.create(tmp_path / "s", _manifest())
    _fill(store)
    opened = open_store(tmp_path / "s")
    victim = next(p for p in (tmp_path / "s" / "shards" / "train-00001").rglob("*")
                  if p.is_file() and p.name != "_commit.json" and p.name != "zarr.json")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="train-00001 is corrupted"):
        opened.read_shard("train-00001")
    opened.read_shard("train-00000")  # the others still read


def test_fingerprint_mismatch_names_both_values(tmp_path):
    _fill(Store.create(tmp_path / "s", _manifest()))
    with pytest.raises(StoreError, match="has tokenizer 'tok-a' but 'tok-b' is expected"):
        open_store(tmp_path / "s", expect={"tokenizer": "tok-b"})
    open_store(tmp_path / "s", expect={"tokenizer": "tok-a", "seq_len": 5})


def test_manifest_roundtrip_and_tampered_shard_name(tmp_path):
    store = Store.create(tmp_path / "s", _manifest())
    m = _fill(store)
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(StoreError, match="invalid shard name"):
        store.shard_dir("../../etc")


def encode_topk(ids, logprobs, lognorm, vocab_size, value_encoding="float16"):
    return encode_signal("topk", {"ids": ids, "logprobs": logprobs, "lognorm": lognorm}, vocab_size, value_encoding)


def decode_topk(arrays, vocab_size, value_encoding="float16"):
    return decode_signal(arrays, signal_params("topk", vocab_size, value_encoding))


def test_topk_codec_uses_uint16_or_packed_ids_and_fp16_values():
    ids = np.array([[[3, 70000 % 65536]]])
    out = encode_topk(ids, np.array([[[-0.1, -2.0]]], np.float32), np.array([[1.5]], np.float32), vocab_size=65536)
    assert out["ids"].dtype == np.uint16 and out["logprobs"].dtype == np.float16
    big = encode_topk(np.array([[[70000]]]), np.zeros((1, 1, 1), np.float32), np.zeros((1, 1), np.float32), 100000)
    assert big["ids"].dtype == np.uint8 and big["ids"].shape == (1, 1, 3)  # 17 bits, bit-packed
    assert decode_topk(big, vocab_size=100000)["ids"][0, 0, 0] == 70000


# ---- the Zarr backend's direct reader ----------------------------------------------------------------------

def _zarr_arrays():
    """What `_zarr.write` meets: several inner chunks with a partial last one, an all-zero inner chunk (zarr leaves
    it unwritten), empty and trailing-zero arrays, every dtype the stores use."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 60_000, (70, 6, 3)).astype(np.uint16)
    ids[32:64] = 0
    return {"ids": ids, "logprobs": rng.standard_normal((70, 6, 3)).astype(np.float16),
            "lognorm": rng.standard_normal((70, 6)).astype(np.float32), "mask": rng.integers(0, 2, (70, 6)) > 0,
            "long": rng.integers(-2**40, 2**40, (70,)), "empty": np.zeros((0, 6), np.uint8),
            "trailing": np.zeros((70, 6, 0), np.uint16), "zeros": np.zeros((70, 2), np.float32)}


def test_zarr_reads_what_it_writes_without_zarr_python(tmp_path, monkeypatch):
    from kdcache.storage import _zarr

    def refuse(*a, **k):
        raise AssertionError("the direct reader handed a layout that _zarr.write makes to zarr-python")

    monkeypatch.setattr(_zarr, "_decode_with_zarr", refuse)
    want = _zarr_arrays()
    _zarr.write(tmp_path / "g.zarr", want)
    got = _zarr.read(tmp_path / "g.zarr")
    assert sorted(got) == sorted(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape and got[name].flags.writeable, name
        np.testing.assert_array_equal(got[name], a)
    assert _zarr.read(tmp_path / "g.zarr", ["lognorm"]).keys() == {"lognorm"}
    with pytest.raises(KeyError, match="array 'nope' is not in the shard"):
        _zarr.read(tmp_path / "g.zarr", ["nope"])


def test_zarr_layouts_it_does_not_write_are_read_by_zarr_python(tmp_path):
    import zarr
    from zarr.codecs import GzipCodec

    from kdcache.storage import _zarr

    want = _zarr_arrays()
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    for name, a in want.items():  # unsharded chunks, gzip: what an older writer or another tool may leave
        group.create_array(name, shape=a.shape, dtype=a.dtype, chunks=tuple(max(1, d) for d in a.shape),
                           compressors=[GzipCodec()])[...] = a
    got = _zarr.read(tmp_path / "g.zarr")
    for name, a in want.items():
        np.testing.assert_array_equal(got[name], a)


def test_zarr_direct_reader_refuses_a_damaged_shard_index_even_unverified(tmp_path):
    import google_crc32c

    from kdcache.storage import _zarr

    _zarr.write(tmp_path / "g.zarr", {"x": np.arange(4000, dtype=np.float32).reshape(40, 100)})
    shard = tmp_path / "g.zarr" / "x" / "c" / "0" / "0"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    with pytest.raises(ValueError, match="shard index is damaged"):
        _zarr.read(tmp_path / "g.zarr")
    # an index that is intact (its crc32c matches) but points past the chunks
    index = np.frombuffer(data[-36:-4], "<u8").copy()                           # 2 inner chunks x (offset, nbytes)
    index[2] = len(data)
    body = index.tobytes()
    shard.write_bytes(data[:-36] + body + google_crc32c.value(body).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="inner chunk 1 lies outside the shard file"):
        _zarr.read(tmp_path / "g.zarr")


def test_manifest_finds_shards_by_name_and_sequence():
    layout = make_layout({"train": 10, "validation": 3}, 4)
    manifest = Manifest(kind="tokens", backend="zarr", layout=layout, shards=layout[:2] + layout[3:])
    assert manifest.shard("train-00001") == layout[1] and manifest.shard("train-00002") is None
    assert [manifest.find("train", i).name for i in (0, 3, 4, 7)] == ["train-00000"] * 2 + ["train-00001"] * 2
    assert manifest.find("train", 8) is None and manifest.find("train", -1) is None  # 8: not committed
    assert manifest.find("validation", 2) == layout[3] and manifest.find("test", 0) is None


def test_shard_checksum_walks_files_in_path_order(tmp_path):
    """Commit records hold checksums over the files in sorted-Path order; the reader's listing must keep that order
    (a string sort differs: 'ids/x' < 'ids-x' as Paths, not as strings), or every existing store reads as corrupted."""
    import hashlib
    from pathlib import Path

    from kdcache.storage.store import COMMIT_NAME, shard_checksum

    for rel in ["ids-x/a", "ids/c/0", "ids/zarr.json", "ids_x/a", "a.b", "a/b", "Z", COMMIT_NAME]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode() * 3)
    digest = hashlib.sha256()
    for p in sorted(p for p in Path(tmp_path).rglob("*") if p.is_file() and p.name != COMMIT_NAME):
        data = p.read_bytes()
        digest.update(p.relative_to(tmp_path).as_posix().encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    assert shard_checksum(tmp_path)[0] == "sha256:" + digest.hexdigest()


@pytest.mark.parametrize("where, command", [
    ("run/tokens", "run `kdcache prepare`, the stage that writes it)"),
    ("run/signals/teacher", "run `kdcache precompute`, the stage that writes it)"),
    ("run/signals/comp", "run `kdcache precompute --source comp` (or precompute.members), the stage that writes it)"),
    ("some/folder", "run the command that wrote it (`kdcache prepare` for a token store, `kdcache precompute` for "
                    "a signal store, `kdcache convert` for a converted copy))"),
])
def test_a_missing_store_names_the_stage_that_writes_it(tmp_path, where, command):
    with pytest.raises(StoreError) as info:
        open_store(tmp_path / where)
    assert str(info.value) == f"no store at {tmp_path / where}: manifest.json is missing ({command}"


def test_an_incomplete_or_damaged_store_names_the_stage_that_writes_it(tmp_path):
    store = Store.create(tmp_path / "run" / "tokens", _manifest())
    _fill(store, skip={"train-00002"})
    with pytest.raises(StoreError, match=r"incomplete .*: to finish it, rerun `kdcache prepare`, the stage that"):
        open_store(tmp_path / "run" / "tokens")
    (tmp_path / "run" / "tokens" / "shards" / "train-00000" / "_commit.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"_commit.json is corrupted .*: delete its shard folder and rerun "
                                         r"`kdcache prepare`, the stage that writes it$"):
        store.committed()
