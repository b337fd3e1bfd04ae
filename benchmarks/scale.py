"""Store overhead against the shard count (issue 17): synthetic token + signal stores of 10^3, 10^4 and 10^5 shards,
built through kdcache's storage API (no teacher), and what every run pays per shard or per open:

- task (done):   stages.precompute.precompute_shard on a shard already committed (what a resumed run's task costs;
                 the worker has parsed the manifests once, as a dask worker does after its first task)
- task (write):  a precompute task that must write: the same lookups, then Store.write_shard of a tiny shard (one
                 sequence of 4 tokens, so the array work is negligible; the time is the commit protocol's)
- open:          Store.open of the token store (parse the manifest, check one commit record)
- refresh:       Store.refresh_manifest of the signal store with every shard already listed (the end of a run),
                 and with recheck=True (what a writer resuming a store does once: reads every commit record)
- verify:        kdcache verify of the signal store (reads every shard: linear by nature, streamed)
- inspect:       kdcache inspect of the signal store (statistics from 8 shards, size from the manifest)

and the growth exponent of each (log-log slope of time against shards, first to last size): 0 is flat, 1 linear.

How the stores are built: the first shard of each store is written with Store.write_shard; every other shard is
the same arrays (a tiny shard, all alike), so its folder is made by hard-linking the first shard's data file and
writing its own commit record (the record write_shard would write: same checksum and store identity, its own
name). That is what write_shard leaves on disk, without encoding and fsyncing 10^5 shards one by one; then
refresh_manifest gathers them (the cold refresh, reading every commit record once, is reported too).

    python -m benchmarks.scale [--sizes 1000 10000 100000] [--out runs/bench-scale] [--work DIR]
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kdcache.stages import precompute
from kdcache.stages.inspect import describe
from kdcache.storage import Manifest, Store, encode_signal, make_layout
from kdcache.storage.store import COMMIT_NAME, SHARDS_DIR
from kdcache.storage.tools import verify_store

SEQ_LEN, VOCAB, K = 4, 100, 2
UNWRITTEN = 20  # signal shards left for the write-task measurement


def _token_arrays() -> dict:
    return {"input_ids": np.arange(SEQ_LEN, dtype=np.uint16)[None], "loss_mask": np.ones((1, SEQ_LEN), bool)}


def _signal_arrays() -> dict:
    ids = np.tile(np.arange(K), (1, SEQ_LEN, 1))                                     # (1, T, K)
    logprobs = np.full((1, SEQ_LEN, K), -1.0)
    return encode_signal("topk", {"ids": ids, "logprobs": logprobs, "lognorm": np.zeros((1, SEQ_LEN))}, VOCAB,
                         "float16")


def _replicate(store: Store, names, arrays: dict) -> None:
    """Write the first shard through the API, then give every other name the same files (hard links) and its own
    commit record."""
    first = names[0]
    store.write_shard(first, arrays)
    template = store.shard_dir(first)
    commit = json.loads((template / COMMIT_NAME).read_text())
    files = [p.relative_to(template) for p in template.rglob("*") if p.is_file() and p.name != COMMIT_NAME]
    sources = {rel: template / rel for rel in files}
    for name in names[1:]:
        folder = store.shard_dir(name)
        for rel in files:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(sources[rel], folder / rel)
            except OSError as e:  # a file system's limit of links per file (ext4: 65,000): a copy links on
                if e.errno != errno.EMLINK:
                    raise
                shutil.copyfile(sources[rel], folder / rel)
                sources[rel] = folder / rel
        (folder / COMMIT_NAME).write_text(json.dumps({**commit, "name": name}, indent=1, sort_keys=True))


def build(root: Path, shards: int) -> tuple[Path, Path, list[str]]:
    """A token store and a signal store of `shards` one-sequence shards; the signal store lacks its last
    UNWRITTEN shards. Returns (token dir, signal dir, the unwritten names)."""
    layout = make_layout({"train": shards}, 1)
    tokens = Store.create(root / "tokens", Manifest(
        kind="tokens", backend="arrow", fingerprints={"dataset": "d-1", "tokenizer": "tok-1"},
        params={"seq_len": SEQ_LEN, "vocab_size": VOCAB, "format": "text", "splits": {}}, layout=layout))
    names = [r.name for r in layout]
    _replicate(tokens, names, _token_arrays())
    tokens.refresh_manifest()
    tokens.close()
    signals = Store.create(root / "signals", Manifest(
        kind="signals", backend="arrow",
        fingerprints={"teacher": "t-1", "tokenizer": "tok-1", "token_store": tokens.manifest.fingerprint()},
        params={"signal": "topk", "k": K, "samples": None, "seed": None, "value_encoding": "float16",
                "temperature": 1.0, "vocab_size": VOCAB, "seq_len": SEQ_LEN, "teacher": "none", "source": "teacher"},
        layout=layout))
    _replicate(signals, names[:-UNWRITTEN], _signal_arrays())
    signals.close()
    return root / "tokens", root / "signals", names[-UNWRITTEN:]


def _median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(root: Path, shards: int, skip_verify: bool) -> dict:
    start = time.perf_counter()
    token_dir, signal_dir, unwritten = build(root, shards)
    built = time.perf_counter() - start
    signals = Store(signal_dir, Store.open(signal_dir, require_complete=False).manifest)
    signals.refresh_manifest()                             # gathers the built shards (none is listed yet)
    refresh = _median_s(signals.refresh_manifest, 3)       # every shard listed: one listing, nothing read
    cold_refresh = _median_s(lambda: signals.refresh_manifest(recheck=True), 1)  # a writer resuming: reads all
    open_s = _median_s(lambda: Store.open(token_dir), 3)
    precompute._STORES.clear()
    first = time.perf_counter()
    precompute.precompute_shard(str(token_dir), str(signal_dir), "train-00000", "unused", 1)  # parses both manifests
    first_task = time.perf_counter() - first
    step = max(1, (shards - UNWRITTEN) // 50)
    done = [f"train-{i:05d}" for i in range(0, shards - UNWRITTEN, step)][:50]
    times = []
    for name in done:
        t = time.perf_counter()
        out = precompute.precompute_shard(str(token_dir), str(signal_dir), name, "unused", 1)
        times.append(time.perf_counter() - t)
        assert out["skipped"], out
    task_done = statistics.median(times)
    arrays, times = _signal_arrays(), []
    for name in unwritten:  # a task that must write: precompute_shard's lookups, then the commit of a tiny shard
        t = time.perf_counter()
        store, tokens = precompute._worker_store(str(signal_dir)), precompute._worker_store(str(token_dir))
        assert tokens.manifest.layout.get(name) is not None and not store.committed([name])
        tokens.read_shard(name, ["input_ids"])
        store.write_shard(name, arrays)
        times.append(time.perf_counter() - t)
    task_write = statistics.median(times)
    signals.refresh_manifest()
    verify_s = None
    if not skip_verify:
        t = time.perf_counter()
        problems, checked = verify_store(signal_dir)
        verify_s = time.perf_counter() - t
        assert not problems and checked == shards, problems[:3]
    inspect_s = _median_s(lambda: describe(signal_dir), 1)
    return {"shards": shards, "build_s": built, "manifest_bytes": (signal_dir / "manifest.json").stat().st_size,
            "task_done_s": task_done, "task_first_s": first_task, "task_write_s": task_write, "open_s": open_s,
            "refresh_s": refresh, "refresh_cold_s": cold_refresh, "verify_s": verify_s, "inspect_s": inspect_s}


COLUMNS = [("manifest_bytes", "manifest.json (signal store)", "bytes"),
           ("task_done_s", "precompute task, shard done", "ms"), ("task_write_s", "precompute task, tiny shard written", "ms"),
           ("task_first_s", "a worker's first task (parses both manifests)", "ms"),
           ("open_s", "Store.open (token store)", "ms"), ("refresh_s", "refresh_manifest (all listed)", "ms"),
           ("refresh_cold_s", "refresh_manifest(recheck=True): a writer resuming, once per run (reads every commit "
                              "record)", "ms"),
           ("verify_s", "verify (signal store)", "s"), ("inspect_s", "inspect (signal store)", "ms")]


def slope(rows: list[dict], key: str) -> float | None:
    points = [(r["shards"], r[key]) for r in rows if r.get(key)]
    if len(points) < 2:
        return None
    (n0, t0), (n1, t1) = points[0], points[-1]
    return math.log(t1 / t0) / math.log(n1 / n0)


def table(rows: list[dict]) -> str:
    def cell(v, unit):
        if v is None:
            return "-"
        return f"{v / 1e6:.2f} MB" if unit == "bytes" else f"{v * 1e3:.2f} ms" if unit == "ms" else f"{v:.1f} s"

    lines = ["| shards | " + " | ".join(f"{r['shards']:,}" for r in rows) + " | growth exponent |",
             "|---|" + "---|" * len(rows) + "---|"]
    for key, label, unit in COLUMNS:
        s = slope(rows, key)
        lines.append(f"| {label} | " + " | ".join(cell(r[key], unit) for r in rows)
                     + f" | {'-' if s is None else f'{s:.2f}'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--work", type=Path, default=None, help="where to build the stores (default: a temporary "
                        "folder, deleted after each size)")
    parser.add_argument("--skip-verify", action="store_true", help="verify reads every shard (minutes at 10^5)")
    args = parser.parse_args(argv)
    rows = []
    for n in args.sizes:
        root = Path(tempfile.mkdtemp(prefix=f"kdcache-scale-{n}-", dir=args.work))
        try:
            rows.append(measure(root, n, args.skip_verify))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"bench-scale: {n} shards done ({rows[-1]['build_s']:.0f} s to build)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "growth_exponent": {key: slope(rows, key) for key, _, _ in COLUMNS},
              "cpu_count": os.cpu_count(), "command": "python -m benchmarks.scale " + " ".join(
                  ["--sizes", *map(str, args.sizes)] + (["--skip-verify"] if args.skip_verify else []))}
    (args.out / "scale.json").write_text(json.dumps(result, indent=1))
    md = table(rows)
    (args.out / "scale.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
