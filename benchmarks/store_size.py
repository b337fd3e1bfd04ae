"""Bytes per token of a real top-k cache under every value encoding and backend setting, and decode speed.

    make bench-store                      # or: python -m benchmarks.store_size --store RUN/signals/teacher

The input is a signal store written with precompute.value_encoding=float32 (the exact teacher log-probs), e.g.

    kdcache prepare --run-dir runs/bench-k16
    kdcache precompute --run-dir runs/bench-k16 -s precompute.signal=topk -s precompute.k=16 \
        -s precompute.value_encoding=float32

Each shard is decoded, re-encoded with each value encoding (what precompute would have written) and written with
each backend setting into a temporary folder; bytes per token are the sizes of the files written. Results:
runs/bench-store/results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from kdcache.storage import _arrow, _zarr, open_store, read_shard
from kdcache.storage.codecs import decode_signal, encode_signal, signal_params

# name -> (backend module, write options)
SETTINGS = {
    "zarr (default: 32-sequence chunks, zstd 3, byte shuffle for floats)": (_zarr, {}),
    "zarr, no shuffle": (_zarr, {"shuffle": None}),
    "zarr, byte shuffle for all arrays": (_zarr, {"shuffle": "shuffle"}),
    "zarr, bit shuffle for all arrays": (_zarr, {"shuffle": "bitshuffle"}),
    "zarr, 8-sequence chunks": (_zarr, {"chunk_sequences": 8}),
    "zarr, 1-sequence chunks": (_zarr, {"chunk_sequences": 1}),
    "zarr, zstd 9": (_zarr, {"zstd_level": 9}),
    "arrow (IPC, zstd 3)": (_arrow, {}),
}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def measure_sizes(store_path: Path, encodings: list[str]) -> list[dict]:
    store = open_store(store_path)
    params = store.manifest.params
    vocab = params["vocab_size"]
    positions = sum(r.count for r in store.manifest.shards) * params["seq_len"]
    shards = [read_shard(store, r.name) for r in store.manifest.shards]  # decoded, float32 values
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for encoding in encodings:
            encoded = [encode_signal("topk", s, vocab, encoding) for s in shards]
            raw = sum(a.nbytes for e in encoded for a in e.values())
            for setting, (backend, options) in SETTINGS.items():
                total, per_array = 0, {}
                for i, arrays in enumerate(encoded):
                    out = Path(tmp) / f"{i}{backend.SUFFIX}"
                    backend.write(out, arrays, **options)
                    total += _size(out)
                    if backend is _zarr:
                        for name in arrays:
                            per_array[name] = per_array.get(name, 0) + _size(out / name)
                    shutil.rmtree(out) if out.is_dir() else out.unlink()
                rows.append({"value_encoding": encoding, "setting": setting, "bytes_per_token": total / positions,
                             "raw_bytes_per_token": raw / positions,
                             "per_array_bytes_per_token": {k: v / positions for k, v in per_array.items()}})
                print(f"{encoding:8s} {setting:44s} {total / positions:7.2f} B/token (raw {raw / positions:.1f})",
                      flush=True)
    return rows


def read_decode_speed(store_path: Path, encoding: str, repeats: int = 3) -> dict:
    """Tokens/s of reading + decoding the real shards from disk, per backend (files in the page cache)."""
    store = open_store(store_path)
    params = store.manifest.params
    positions = sum(r.count for r in store.manifest.shards) * params["seq_len"]
    shards = [encode_signal("topk", read_shard(store, r.name), params["vocab_size"], encoding)
              for r in store.manifest.shards]
    decode_params = {**params, "value_encoding": encoding}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, backend in (("zarr", _zarr), ("arrow", _arrow)):
            paths = []
            for i, arrays in enumerate(shards):
                paths.append(Path(tmp) / f"{name}{i}{backend.SUFFIX}")
                backend.write(paths[-1], arrays)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for p in paths:
                    decode_signal(backend.read(p), decode_params)
                times.append(time.perf_counter() - start)
            out[name] = positions / float(np.median(times))
    return out


def decode_throughput(kind: str = "topk", k: int = 16, value_encoding: str = "float16", vocab_size: int = 49152,
                      positions: int = 262_144, samples: int = 50, repeats: int = 5, seed: int = 0) -> dict:
    """Tokens decoded per second (median of `repeats`) on synthetic signals of `positions` positions, in the
    calling thread."""
    rng = np.random.default_rng(seed)
    n, t = positions // 256, 256
    logits = rng.standard_normal((n, t, k)).astype(np.float32) * 2
    logprobs = -np.sort(-logits, -1) - 3.0
    # distinct ids per position, all below vocab_size // 2 (the hybrid tail uses the upper half)
    ids = rng.integers(0, vocab_size // (2 * k), (n, t, 1)) * k + np.arange(k)                        # (n, t, k)
    signal = {"ids": ids, "logprobs": logprobs, "lognorm": rng.standard_normal((n, t)).astype(np.float32)}
    m = min(12, k)
    counts = np.zeros((n, t, m), np.int64)
    counts[..., 0] = samples - (m - 1)
    counts[..., 1:] = 1
    if kind == "sample":
        signal = {"ids": ids[..., :m], "counts": counts}
    elif kind == "hybrid":
        signal.update(tail_ids=ids[..., :m] + vocab_size // 2, tail_counts=counts)
    arrays = encode_signal(kind, signal, vocab_size, value_encoding)
    params = signal_params(kind, vocab_size, value_encoding, k=k, samples=samples)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode_signal(arrays, params)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"kind": kind, "k": k, "value_encoding": value_encoding, "vocab_size": vocab_size,
            "positions": n * t, "seconds": seconds, "tokens_per_s": n * t / seconds}


def markdown(results: dict) -> str:
    lines = ["# Signal store size and decode speed\n", f"Store: `{results['store']}` (top-{results['k']}, "
             f"V = {results['vocab_size']}, {results['positions']} positions). Machine: {results['machine']}. "
             f"Command: `{results['command']}`.\n",
             "| value encoding | backend setting | bytes/token on disk | raw bytes/token |", "|---|---|---|---|"]
    for r in results["sizes"]:
        lines.append(f"| {r['value_encoding']} | {r['setting']} | {r['bytes_per_token']:.2f} | "
                     f"{r['raw_bytes_per_token']:.1f} |")
    lines += ["", "Bytes/token per array (zarr default):", "", "| value encoding | array | bytes/token |", "|---|---|---|"]
    for r in results["sizes"]:
        if r["setting"].startswith("zarr (default"):
            for name, b in r["per_array_bytes_per_token"].items():
                lines.append(f"| {r['value_encoding']} | `{name}` | {b:.2f} |")
    lines += ["", "Decode throughput, one core (median of 5; synthetic signals of 262,144 positions, "
              "`benchmarks.store_size.decode_throughput`):", "", "| kind | value encoding | V | tokens/s |", "|---|---|---|---|"]
    for r in results["decode"]:
        lines.append(f"| {r['kind']} | {r['value_encoding']} | {r['vocab_size']} | {r['tokens_per_s'] / 1e6:.1f} M |")
    lines += ["", "Read from disk + decode of the real shards (page cache warm), one core:", "",
              "| value encoding | backend | tokens/s |", "|---|---|---|"]
    for encoding, speeds in results["read_decode"].items():
        for backend, speed in speeds.items():
            lines.append(f"| {encoding} | {backend} | {speed / 1e6:.2f} M |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/bench-k16/signals/teacher")
    parser.add_argument("--out", default="runs/bench-store")
    args = parser.parse_args(argv)
    store = open_store(args.store)
    params = store.manifest.params
    if params.get("signal") != "topk" or params.get("value_encoding", params.get("value_dtype")) != "float32":
        raise SystemExit(f"{args.store} must be a topk store written with precompute.value_encoding=float32")
    encodings = ["float32", "float16", "int8"]
    results = {"store": args.store, "k": params["k"], "vocab_size": params["vocab_size"],
               "positions": sum(r.count for r in store.manifest.shards) * params["seq_len"],
               "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.python_version()}",
               "command": "python -m benchmarks.store_size --store " + args.store,
               "sizes": measure_sizes(Path(args.store), encodings),
               "decode": [decode_throughput(kind, k=params["k"], value_encoding=enc, vocab_size=vocab)
                          for kind, enc, vocab in [("topk", "float16", params["vocab_size"]),
                                                   ("topk", "int8", params["vocab_size"]),
                                                   ("topk", "float16", 100_000),
                                                   ("sample", "float16", params["vocab_size"]),
                                                   ("hybrid", "float16", params["vocab_size"])]],
               "read_decode": {enc: read_decode_speed(Path(args.store), enc) for enc in ("float16", "int8")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
