"""kdcache verify / convert / inspect on synthetic signal stores of every kind, on both backends."""
import json

import numpy as np
import pytest

from kdcache.pipeline.cli import main
from kdcache.storage import Manifest, Store, StoreError, encode_signal, make_layout, open_store, read_shard
from kdcache.storage.tools import convert_store, verify_store

SEQ_LEN, VOCAB, K, N = 6, 500, 4, 12


def _signal(kind, count, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((count, SEQ_LEN, VOCAB)) * 2
    lognorm = np.log(np.exp(logits).sum(-1))
    order = np.argsort(-logits, -1)
    ids = order[..., :K]
    sig = {"ids": ids, "logprobs": np.take_along_axis(logits, ids, -1) - lognorm[..., None], "lognorm": lognorm}
    draws = np.zeros((count, SEQ_LEN, 5), np.int64)
    draws[..., 0], draws[..., 1], draws[..., 2] = N - 4, 3, 1  # three unique ids, two unused slots
    if kind == "sample":
        return {"ids": order[..., :5], "counts": draws}
    if kind == "hybrid":
        return {**sig, "tail_ids": order[..., K:K + 5], "tail_counts": draws}
    return sig


def _store(path, kind="topk", backend="zarr", encoding="float16"):
    layout = make_layout({"train": 5, "validation": 2}, shard_sequences=2)
    manifest = Manifest(kind="signals", backend=backend,
                        fingerprints={"teacher": "t-1", "tokenizer": "tok-1", "token_store": "ts-1"},
                        params={"signal": kind, "k": K if kind != "sample" else None,
                                "samples": N if kind != "topk" else None, "value_encoding": encoding,
                                "temperature": 1.0, "seed": 0, "vocab_size": VOCAB, "seq_len": SEQ_LEN},
                        layout=layout)
    store = Store.create(path, manifest)
    for i, rec in enumerate(layout):
        store.write_shard(rec.name, encode_signal(kind, _signal(kind, rec.count, i), VOCAB, encoding))
    store.refresh_manifest()
    return store


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_verify_passes_a_clean_store(tmp_path, backend, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DELAY", "0")  # progress lines however quick the check
    _store(tmp_path / "s", "hybrid", backend)
    assert verify_store(tmp_path / "s") == ([], 4)
    assert main(["verify", str(tmp_path / "s")]) == 0
    out = capsys.readouterr()
    assert "4 shards checked, ok" in out.out
    # progress through the stages' helper: whole lines in a log (capsys's stderr is not a terminal)
    assert "verify: 4/4 shard (100%)" in out.err and "\r" not in out.err


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_verify_reports_every_problem_in_one_run(tmp_path, backend, capsys):
    store = _store(tmp_path / "s", "topk", backend)
    shards = tmp_path / "s" / "shards"

    def biggest(name):
        return max((p for p in (shards / name).rglob("*") if p.is_file() and p.name not in ("_commit.json", "zarr.json")),
                   key=lambda p: p.stat().st_size)

    flipped, truncated = biggest("train-00000"), biggest("train-00001")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:10])
    for p in sorted((shards / "train-00002").rglob("*"), reverse=True):  # delete a whole shard
        p.unlink() if p.is_file() else p.rmdir()
    (shards / "train-00002").rmdir()
    (shards / ".tmp-validation-00000-deadbeef").mkdir()
    manifest_path = tmp_path / "s" / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["params"]["k"] = K + 1                                     # edited: arrays no longer match
    raw["shards"]["checksum"][3] = "sha256:" + "0" * 64            # edited: disagrees with the commit record
    manifest_path.write_text(json.dumps(raw))

    code = main(["verify", str(tmp_path / "s"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False and report["shards_checked"] == 4
    problems = report["problems"]
    text = "\n".join(problems)
    assert f"{flipped}: checksum mismatch, the file is corrupted" in text
    assert f"{truncated}: checksum mismatch, the file is corrupted" in text
    assert f"{shards / 'train-00002'}: shard missing (the manifest lists it as committed)" in text
    assert "shard validation-00000 checksum sha256:000000000000 differs from its commit record" in text
    assert ".tmp-validation-00000-deadbeef: leftover of a killed writer" in text
    assert f"array 'ids' is uint16[2, {SEQ_LEN}, {K}] but the manifest implies uint16[2, {SEQ_LEN}, {K + 1}]" in text
    assert all("\n" not in p for p in problems)
    assert main(["verify", str(tmp_path / "s")]) == 1  # the text form exits 1 as well
    assert len(capsys.readouterr().out.strip().splitlines()) == len(problems)
    del store


def test_verify_checks_draw_counts_and_a_missing_manifest(tmp_path):
    store = _store(tmp_path / "s", "sample")
    raw = json.loads((tmp_path / "s" / "manifest.json").read_text())
    raw["params"]["samples"] = N + 1
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(raw))
    problems, _ = verify_store(store.path)
    assert len(problems) == 4 and all(f"sum to {N * SEQ_LEN}..{N * SEQ_LEN} draws" in p for p in problems)
    problems, checked = verify_store(tmp_path / "nothing")
    assert checked == 0 and len(problems) == 1 and "manifest.json is missing" in problems[0]


@pytest.mark.parametrize("kind,encoding", [("topk", "float16"), ("sample", "float16"), ("hybrid", "int8")])
def test_convert_round_trip_keeps_decoded_arrays_and_fingerprint(tmp_path, kind, encoding, capsys):
    src = _store(tmp_path / "zarr", kind, "zarr", encoding)
    assert main(["convert", str(src.path), str(tmp_path / "arrow"), "--backend", "arrow"]) == 0
    arrow = open_store(tmp_path / "arrow", expect={"token_store": "ts-1"})
    back = convert_store(tmp_path / "arrow", tmp_path / "zarr2", "zarr")
    assert arrow.manifest.backend == "arrow" and back.manifest.backend == "zarr"
    assert arrow.manifest.fingerprint() == src.manifest.fingerprint() == back.manifest.fingerprint()
    assert {s.checksum for s in arrow.manifest.shards}.isdisjoint({s.checksum for s in src.manifest.shards})
    assert [s.checksum for s in back.manifest.shards] == [s.checksum for s in src.manifest.shards]
    for rec in src.manifest.shards:
        want, got = read_shard(src, rec.name), read_shard(arrow, rec.name)
        for name in ("ids", "logprobs", "lognorm"):
            assert got[name].dtype == want[name].dtype
            np.testing.assert_array_equal(got[name], want[name])
    assert verify_store(tmp_path / "arrow")[0] == []


def test_convert_resumes_and_refuses_bad_targets(tmp_path):
    src = _store(tmp_path / "zarr", "topk")
    dst = convert_store(src.path, tmp_path / "arrow", "arrow")
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "arrow" / "shards").rglob("*") if p.is_file()}
    victim = tmp_path / "arrow" / "shards" / "train-00001"
    for p in victim.iterdir():
        p.unlink()
    victim.rmdir()
    again = convert_store(src.path, tmp_path / "arrow", "arrow")
    assert again.manifest.complete and again.manifest.fingerprint() == dst.manifest.fingerprint()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items() if victim not in p.parents)
    with pytest.raises(StoreError, match="new destination"):
        convert_store(src.path, src.path, "arrow")
    with pytest.raises(StoreError, match="already holds a store with different backend"):
        convert_store(src.path, tmp_path / "arrow", "zarr")


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize("kind", ["topk", "sample", "hybrid"])
def test_inspect_every_kind_and_backend(tmp_path, backend, kind, capsys):
    store = _store(tmp_path / "s", kind, backend, "int8" if kind == "hybrid" else "float16")
    assert main(["inspect", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # the data files, as their commit records measured them (inspect walks no file; commit records not counted)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "s" / "shards").rglob("*")
                  if p.is_file() and p.name != "_commit.json")
    assert info["backend"] == backend and info["signal"] == kind and info["positions"] == 7 * SEQ_LEN
    assert info["bytes_per_token"] == pytest.approx(on_disk / (7 * SEQ_LEN))
    decoded = [read_shard(store, r.name) for r in store.manifest.shards]
    p = np.concatenate([np.exp(d["logprobs"].astype(np.float64)).reshape(-1, d["logprobs"].shape[-1]) for d in decoded])
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(-1)
    assert info["support_entropy_mean"] == pytest.approx(entropy.mean(), rel=1e-5)  # of what the cache holds
    assert "entropy_mean" not in info and info["entropy"].startswith("support_entropy_mean: ")
    if kind == "sample":
        assert info["samples"] == N and info["k"] is None and info["mass_covered_mean"] is None
        assert "not applicable" in info["mass_covered"]
    else:
        assert info["k"] == K and info["mass_covered_mean"] == pytest.approx(p[:, :K].sum(-1).mean(), rel=1e-5)
        assert 0 < info["mass_covered_p10"] <= info["mass_covered_mean"] < 1
    if kind == "hybrid":
        assert info["samples"] == N and info["entries_per_position_mean"] == K + 3


def _teacher_entropy(count, seed):
    """The full teacher entropy per position of `_signal(kind, count, seed)` (the same seeded logits), (count*T,)."""
    logits = np.random.default_rng(seed).standard_normal((count, SEQ_LEN, VOCAB)) * 2
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1).ravel()


@pytest.mark.parametrize("kind", ["topk", "hybrid", "sample"])
def test_inspect_bounds_the_teachers_entropy_where_the_kind_allows(tmp_path, kind):
    from kdcache.stages.inspect import describe, entropy_bounds

    store = _store(tmp_path / "s", kind, encoding="float32")
    info = describe(tmp_path / "s")
    true = np.concatenate([_teacher_entropy(r.count, i) for i, r in enumerate(store.manifest.layout)])  # (P,)
    if kind == "sample":  # N draws bound nothing: the plug-in estimate only, said to be biased low
        assert info["teacher_entropy_lower_mean"] is None and info["teacher_entropy_upper_mean"] is None
        assert "plug-in estimate" in info["entropy"] and "biased low" in info["entropy"]
        return
    assert info["teacher_entropy_lower_mean"] <= true.mean() <= info["teacher_entropy_upper_mean"]
    assert info["support_entropy_mean"] < info["teacher_entropy_lower_mean"]  # the support alone is far below
    decoded = np.concatenate([read_shard(store, r.name)["logprobs"][..., :K].reshape(-1, K)  # the exact top-k
                              for r in store.manifest.layout]).astype(np.float64)
    lower, upper = entropy_bounds(decoded, K, VOCAB)
    assert np.all(lower <= true + 1e-6) and np.all(true <= upper + 1e-6)  # per position, not only on average


def test_entropy_bounds_are_tight_at_their_extremes():
    from kdcache.stages.inspect import entropy_bounds

    # top-2 of V = 6 at 0.3 each; the tail 0.4 either uniform over 4 ids (0.1 each) or 0.3 + 0.1 (as peaked as
    # the top-k allows): the bounds are the entropies of those two teachers
    logprobs = np.log(np.array([[0.3, 0.3]]))
    lower, upper = entropy_bounds(logprobs, 2, 6)
    h = lambda ps: -sum(q * np.log(q) for q in ps)
    assert upper[0] == pytest.approx(h([0.3, 0.3, 0.1, 0.1, 0.1, 0.1]))
    assert lower[0] == pytest.approx(h([0.3, 0.3]) - 0.4 * np.log(0.3))  # 0.4 of mass at p_k's log-prob
    assert lower[0] <= h([0.3, 0.3, 0.3, 0.1]) <= upper[0]


@pytest.mark.parametrize("kind, refreshed", [("tokens", True), ("topk", True), ("topk", False)])
def test_inspect_shows_the_progress_of_an_incomplete_store(tmp_path, kind, refreshed, capsys):
    """refreshed: a killed and rerun writer's manifest lists its shards; not: a running (or killed) writer's
    manifest lists none yet, its shards are committed on disk only."""
    if kind == "tokens":
        layout = make_layout({"train": 5, "validation": 2}, shard_sequences=2)
        manifest = Manifest(kind="tokens", backend="zarr", fingerprints={"tokenizer": "tok-1"},
                            params={"seq_len": SEQ_LEN, "vocab_size": VOCAB, "format": "text", "splits": {}},
                            layout=layout)
        store = Store.create(tmp_path / "s", manifest)
        arrays = lambda n: {"input_ids": np.zeros((n, SEQ_LEN), np.uint16), "loss_mask": np.ones((n, SEQ_LEN), np.uint8)}
    else:
        store = _store(tmp_path / "full", kind)  # the layout and shard contents of a whole store
        layout, manifest = store.manifest.layout, store.manifest
        store = Store.create(tmp_path / "s", manifest.__class__(**{**manifest.__dict__, "shards": ()}))
        arrays = None
    for i, rec in enumerate(layout[:2]):  # a run killed (or still going) after 2 of 4 shards
        data = arrays(rec.count) if arrays else encode_signal(kind, _signal(kind, rec.count, i), VOCAB, "float16")
        store.write_shard(rec.name, data)
    if refreshed:
        store.refresh_manifest()
    store.close()
    assert main(["inspect", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] is False and (info["shards"], info["shards_expected"]) == (2, 4)
    assert (info["positions"], info["positions_expected"]) == (4 * SEQ_LEN, 7 * SEQ_LEN)
    assert info["progress"] == f"2 of 4 shards committed ({4 * SEQ_LEN} of {7 * SEQ_LEN} tokens so far)"
    if kind == "topk":
        assert info["sampled_positions"] == 4 * SEQ_LEN and 0 < info["mass_covered_mean"] < 1
    assert main(["inspect", str(tmp_path / "s")]) == 0  # the text form too
    assert "progress: 2 of 4 shards committed" in capsys.readouterr().out
