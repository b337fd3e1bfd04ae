"""Store overhead independent of the shard count (issue 17): a precompute task, a commit, Store.open and the
refresh at the end of a run look at a fixed number of files whatever the store's size; format 1 is refused."""
import json
import sys

import numpy as np
import pytest

from benchmarks.scale import build
from kdcache.stages import precompute
from kdcache.storage import Manifest, Store, StoreError, make_layout, open_store
from kdcache.storage.manifest import FORMAT_VERSION, Layout

_WATCH = {"root": None, "events": []}


def _hook(event, args):
    root = _WATCH["root"]
    if root is not None and event in ("open", "os.scandir", "os.listdir") and args and args[0] is not None \
            and str(args[0]).startswith(root):
        _WATCH["events"].append((event, str(args[0])[len(root):]))


sys.addaudithook(_hook)  # audit hooks cannot be removed: it records only while a test watches a folder


class _watch:
    """Every file opened and folder listed under `root` inside the block (Python's audit events: builtins.open,
    os.open, os.scandir, os.listdir, whoever calls them, zarr and pyarrow included)."""

    def __init__(self, root):
        self.root = str(root)

    def __enter__(self):
        _WATCH["root"], _WATCH["events"] = self.root, []
        return self

    def __exit__(self, *exc):
        self.events = list(_WATCH["events"])
        _WATCH["root"] = None

    def files(self, name=""):
        return [path for event, path in self.events if event == "open" and name in path]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(token dir, signal dir, names not yet written) for a small and a 10x larger store."""
    return {n: build(tmp_path_factory.mktemp(f"s{n}"), n) for n in (100, 1000)}


def test_a_precompute_task_looks_at_the_same_files_whatever_the_shard_count(stores):
    seen = {}
    for n, (tokens, signals, unwritten) in stores.items():
        precompute._STORES.clear()
        precompute.precompute_shard(str(tokens), str(signals), "train-00000", "unused", 1)  # the worker's first task
        with _watch(tokens.parent) as done:
            out = precompute.precompute_shard(str(tokens), str(signals), "train-00042", "unused", 1)
        assert out["skipped"] and out["tokens"] == 4
        store = precompute._worker_store(str(signals))
        with _watch(tokens.parent) as write:
            store.write_shard(unwritten[0], _signal())
        seen[n] = (done.events, [e for e in write.events if ".tmp-" not in e[1]])
        assert not done.files("manifest.json") and not write.files("manifest.json")  # no manifest parsed per task
        assert done.files() == ["/signals/shards/train-00042/_commit.json"]  # the shard's own commit record
        assert not [e for e in done.events + write.events if e[0] != "open" and "/shards" == e[1][-7:]]  # no listing
    small, large = seen[100], seen[1000]
    assert len(small[0]) == len(large[0]) and len(small[1]) == len(large[1])


def _signal():
    from benchmarks.scale import _signal_arrays

    return _signal_arrays()


def test_store_open_reads_the_manifest_and_one_commit_record(stores):
    tokens, _, _ = stores[1000]
    with _watch(tokens) as opened:
        store = open_store(tokens)
    assert len(store.manifest.shards) == 1000
    assert sorted(opened.files()) == ["/manifest.json", "/shards/train-00000/_commit.json"]
    assert not [e for e in opened.events if e[0] != "open"]  # nothing listed


def test_refresh_reads_only_the_commit_records_of_new_shards(stores):
    _, signals, unwritten = stores[1000]
    store = Store(signals, Store.open(signals, require_complete=False).manifest)
    store.refresh_manifest()  # gathers what build() committed
    for name in unwritten[1:3]:
        store.write_shard(name, _signal())
    with _watch(signals) as refresh:
        store.refresh_manifest()
    commits = sorted(p for p in refresh.files("_commit.json"))
    assert commits == [f"/shards/{name}/_commit.json" for name in sorted(unwritten[1:3])]
    assert [e for e in refresh.events if e[0] == "os.scandir" and e[1].endswith("shards")] == [
        ("os.scandir", "/shards")]  # the shards folder, listed once (the store's own folder is small)
    assert all(name in store.manifest.shards.names() for name in unwritten[1:3])
    with _watch(signals) as recheck:  # what a resuming writer does: every record read again
        store.refresh_manifest(recheck=True)
    assert len(recheck.files("_commit.json")) == len(store.manifest.shards)


def test_the_layout_is_stored_as_split_sizes_and_identity_does_not_walk_it(tmp_path, monkeypatch):
    layout = make_layout({"train": 10, "validation": 3}, 4)
    assert [(r.name, r.split, r.start, r.count) for r in layout] == [
        ("train-00000", "train", 0, 4), ("train-00001", "train", 4, 4), ("train-00002", "train", 8, 2),
        ("validation-00000", "validation", 0, 3)]
    store = Store.create(tmp_path / "s", Manifest(kind="tokens", backend="zarr", params={"seq_len": 2},
                                                  layout=layout))
    store.close()
    raw = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert raw["layout"] == {"splits": [["train", 10], ["validation", 3]], "shard_sequences": 4}
    assert raw["format_version"] == FORMAT_VERSION == 2
    big = Manifest(kind="tokens", backend="zarr", layout=make_layout({"train": 10 ** 9}, 1))
    with monkeypatch.context() as patch:
        patch.setattr(Layout, "__iter__", lambda self: pytest.fail("identity walked the layout"))
        assert big.identity() == big.identity() and len(big.layout) == 10 ** 9
        assert big.layout.get("train-123456789").start == 123456789 and big.layout.get("train-1000000000") is None
    # a hand-made layout that is not make_layout's cut keeps its records
    assert not Layout.of(layout[1:]).derived and Layout.of(tuple(layout)).derived


def test_a_store_of_the_old_format_is_refused_in_one_line(tmp_path):
    store = Store.create(tmp_path / "tokens", Manifest(kind="tokens", backend="zarr", params={"seq_len": 2},
                                                       layout=make_layout({"train": 2}, 1)))
    store.close()
    path = tmp_path / "tokens" / "manifest.json"
    raw = json.loads(path.read_text())
    raw.update(format_version=1, layout=[{"name": "train-00000", "split": "train", "start": 0, "count": 1}])
    path.write_text(json.dumps(raw))
    with pytest.raises(StoreError) as e:
        open_store(tmp_path / "tokens")
    assert str(e.value) == (f"store {tmp_path / 'tokens'} has format version 1, this kdcache reads version 2: delete "
                            "it and rerun `kdcache prepare`, the stage that writes it (or pass --overwrite)")
    again = Store.create(tmp_path / "tokens", Manifest(kind="tokens", backend="zarr", params={"seq_len": 2},
                                                       layout=make_layout({"train": 2}, 1)), overwrite=True)
    assert again.manifest.format_version == 2 and not again.manifest.shards
    again.close()
