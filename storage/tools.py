"""Store tools: `verify` (every problem of a store, one line each) and `convert` (to the other backend)."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from kdcache.storage.codecs import (KINDS, MAX_SAMPLES, ROWS, VALUE_ENCODINGS, decode_signal, id_bits, id_dtype,
                            ids_packed, stored_arrays)
from kdcache.storage.errors import StoreError
from kdcache.storage.lock import LOCK_NAME
from kdcache.storage.manifest import MANIFEST_NAME, Manifest, code_version, read_manifest
from kdcache.storage.store import (BACKENDS, COMMIT_NAME, SHARDS_DIR, Store, content_hash, file_checksums,
                           shard_checksum)

SIGNAL_FINGERPRINTS = ("teacher", "tokenizer", "token_store")
TOKEN_FINGERPRINTS = ("dataset", "tokenizer")
RECORDED_CONFIG = "config.yaml"  # the writing stage's config, recorded beside the store's data (not part of it)


# ---- verify ----------------------------------------------------------------------------------------------------

def manifest_problems(m: Manifest, raw: dict) -> list[str]:
    """What is inconsistent inside a manifest (names `manifest.json` and the field)."""
    where = MANIFEST_NAME
    out = []
    if m.kind not in ("tokens", "signals"):
        out.append(f"{where}: kind {m.kind!r} is not tokens or signals")
    if m.backend not in BACKENDS:
        out.append(f"{where}: backend {m.backend!r} is not one of {', '.join(sorted(BACKENDS))}")
    # a derived layout (split sizes + shard_sequences) has no duplicate, gap or overlap by construction: only a
    # listed one is checked record by record
    if not m.layout.derived:
        names = [r.name for r in m.layout]
        if len(set(names)) != len(names):
            out.append(f"{where}: the layout lists a shard twice")
    for s in m.shards:
        want = m.layout.get(s.name)
        if want is None:
            out.append(f"{where}: committed shard {s.name} is not in the layout")
        elif (s.split, s.start, s.count) != (want.split, want.start, want.count):
            out.append(f"{where}: shard {s.name} covers {s.split}[{s.start}:{s.start + s.count}] but the layout says "
                       f"{want.split}[{want.start}:{want.start + want.count}]")
    for split in [] if m.layout.derived else sorted({r.split for r in m.layout}):
        ranges = sorted((r.start, r.count) for r in m.layout if r.split == split)
        position = 0
        for start, count in ranges:
            if start != position:
                out.append(f"{where}: split {split} has a gap or overlap at sequence {position} (next shard starts "
                           f"at {start})")
                break
            position = start + count
    if raw.get("complete") is not None and raw["complete"] != m.complete:
        out.append(f"{where}: says complete={raw['complete']} but lists {len(m.shards)} of {len(m.layout)} shards")
    p = m.params
    for key in ("seq_len", "vocab_size"):
        if not isinstance(p.get(key), int) or p[key] < 1:
            out.append(f"{where}: params.{key} is {p.get(key)!r}, not a positive integer")
    wanted_fps = SIGNAL_FINGERPRINTS if m.kind == "signals" else TOKEN_FINGERPRINTS if m.kind == "tokens" else ()
    for key in wanted_fps:
        if not m.fingerprints.get(key):
            out.append(f"{where}: fingerprints.{key} is missing")
    if m.kind == "signals":
        kind = p.get("signal")
        encoding = p.get("value_encoding", p.get("value_dtype"))
        if kind not in KINDS:
            out.append(f"{where}: params.signal {kind!r} is not one of {', '.join(KINDS)}")
        if kind in ("topk", "hybrid"):
            if encoding not in VALUE_ENCODINGS:
                out.append(f"{where}: params.value_encoding {encoding!r} is not one of {', '.join(VALUE_ENCODINGS)}")
            k = p.get("k")
            if not isinstance(k, int) or k < 1 or (isinstance(p.get("vocab_size"), int) and k > p["vocab_size"]):
                out.append(f"{where}: params.k is {k!r}, not in 1..vocab_size")
        if kind in ("sample", "hybrid"):
            n = p.get("samples")
            if not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
                out.append(f"{where}: params.samples is {n!r}, not in 1..{MAX_SAMPLES}")
    return out


def _expected_arrays(m: Manifest) -> dict[str, tuple[str, int | None]] | None:
    """name -> (dtype, trailing size / None for (n, T) / -1 for any) or None when the kind is unknown."""
    if m.kind == "tokens":
        return {"input_ids": (id_dtype(m.params["vocab_size"]).name, None), "loss_mask": ("uint8", None)}
    if m.kind == "signals":
        return stored_arrays(m.params)
    return None


def array_problems(m: Manifest, count: int, arrays: dict[str, np.ndarray], where: str) -> list[str]:
    """Shapes and dtypes a shard of `count` sequences must have under manifest `m`, and a decode check."""
    try:
        expected = _expected_arrays(m)
    except (KeyError, TypeError, ValueError) as e:
        return [f"{where}: cannot tell which arrays to expect from the manifest params ({e})"]
    if expected is None:
        return []
    out = []
    optional = {"lognorm"} if m.params.get("signal") in ("sample", "hybrid") else set()
    for name in sorted(set(arrays) - set(expected) - optional):
        out.append(f"{where}: unexpected array {name!r}")
    widths = {}
    for name, (dtype, width) in expected.items():
        if name not in arrays:
            out.append(f"{where}: array {name!r} is missing")
            continue
        a = arrays[name]
        lead = (count, m.params["seq_len"])
        if width is None:
            want_shape = lead
        elif width == ROWS:  # one row of drawn entries per sequence; its length L is the shard's
            want_shape = (count, a.shape[-1] if a.ndim == 2 else "L")
            widths[name] = a.shape[-1] if a.ndim == 2 else None
        else:
            want_shape = lead + (width,)
        if tuple(a.shape) != want_shape or a.dtype != np.dtype(dtype):
            out.append(f"{where}: array {name!r} is {a.dtype}{list(a.shape)} but the manifest implies "
                       f"{dtype}{list(want_shape)}")
    for ids, counts in (("ids", "counts"), ("tail_ids", "tail_counts")):
        if counts in widths and ids in widths and not ids_match(widths[ids], widths[counts], m.params["vocab_size"]):
            out.append(f"{where}: {ids!r} and {counts!r} have {widths[ids]} and {widths[counts]} slots")
    if out or m.kind != "signals":
        return out
    for counts in ("counts", "tail_counts"):
        if counts in arrays and arrays[counts].size:
            sums = arrays[counts].astype(np.int64).sum(-1)                                   # (count,)
            want = m.params["samples"] * m.params["seq_len"]
            if (sums != want).any():
                out.append(f"{where}: {counts!r} sum to {int(sums.min())}..{int(sums.max())} draws in some sequence, "
                           f"not params.samples x seq_len = {want}")
    if out:
        return out
    try:
        ids = decode_signal(arrays, m.params)["ids"]
        if ids.size and (ids.min() < 0 or ids.max() >= m.params["vocab_size"]):
            out.append(f"{where}: ids outside [0, {m.params['vocab_size']})")
    except Exception as e:  # noqa: BLE001 - any decode failure is a problem to report, not to crash on
        out.append(f"{where}: does not decode ({type(e).__name__}: {e})")
    return out


def ids_match(id_width: int | None, count_width: int | None, vocab_size: int) -> bool:
    """Stored id rows hold as many ids as the count rows have slots (bit-packed: ceil(L * bits / 8) bytes)."""
    if id_width is None or count_width is None:
        return True
    if ids_packed(vocab_size):
        return id_width == -(-count_width * id_bits(vocab_size) // 8)
    return id_width == count_width


def _shard_problems(store: Store, rec, committed_record) -> list[str]:
    shard_dir = store.shard_dir(rec.name)
    where = f"{shard_dir}"
    if not shard_dir.exists():
        state = "the manifest lists it as committed" if committed_record else f"never written: rerun {store.writer()}"
        return [f"{where}: shard missing ({state})"]
    commit = shard_dir / COMMIT_NAME
    if not commit.exists():
        return [f"{commit}: missing, the shard is not committed (delete {shard_dir} and rerun {store.writer()})"]
    try:
        info = json.loads(commit.read_text())
        recorded_sum, recorded_files = info["checksum"], info.get("files")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return [f"{commit}: not a valid commit record ({e})"]
    out = []
    if committed_record is None:
        out.append(f"{where}: committed on disk but not listed in {MANIFEST_NAME} (to refresh it, rerun {store.writer()})")
    elif committed_record.checksum != recorded_sum:
        out.append(f"{store.path / MANIFEST_NAME}: shard {rec.name} checksum {committed_record.checksum[:19]} differs "
                   f"from its commit record {recorded_sum[:19]}")
    damage = []
    if recorded_files is not None:
        actual = file_checksums(shard_dir)
        for name in sorted(set(recorded_files) | set(actual)):
            if name not in actual:
                damage.append(f"{shard_dir / name}: file missing")
            elif name not in recorded_files:
                damage.append(f"{shard_dir / name}: unexpected file (not in the commit record)")
            elif actual[name] != recorded_files[name]:
                damage.append(f"{shard_dir / name}: checksum mismatch, the file is corrupted")
    if not damage and shard_checksum(shard_dir)[0] != recorded_sum:
        damage.append(f"{where}: checksum mismatch, the shard is corrupted")
    out += damage
    if damage:
        return out
    try:
        arrays = store.backend.read(store._data_path(shard_dir))
    except Exception as e:  # noqa: BLE001
        return out + [f"{where}: unreadable ({type(e).__name__}: {e})"]
    if info.get("content") and content_hash(arrays) != info["content"]:
        out.append(f"{where}: the arrays read back differ from what was written (content hash)")
    return out + array_problems(store.manifest, rec.count, arrays, where)


def verify_store(path: str | Path, track=None) -> tuple[list[str], int]:
    """All problems of a store (one line each, naming the file and the problem) and how many shards were checked.
    `track(iterable, total, desc, unit)`, e.g. kdcache.stages.progress.track, shows progress over the shards (storage
    itself shows none)."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
        raw = json.loads((path / MANIFEST_NAME).read_text())
    except StoreError as e:
        return [str(e)], 0
    except (TypeError, ValueError) as e:
        return [f"{path / MANIFEST_NAME}: not a valid manifest ({e})"], 0
    problems = manifest_problems(manifest, raw)
    if manifest.backend not in BACKENDS:
        return problems, 0
    store = Store(path, manifest)
    checked = 0
    shards = manifest.layout if track is None else track(manifest.layout, len(manifest.layout), "verify", "shard")
    for rec in shards:
        try:
            # one shard at a time: the layout and the committed list build a record only when asked (constant memory
            # beyond the manifest's columns)
            problems += _shard_problems(store, rec, manifest.shard(rec.name))
        except StoreError as e:
            problems.append(f"{path / MANIFEST_NAME}: {e}")
        checked += 1
    shards_dir = path / SHARDS_DIR
    if not shards_dir.is_dir():
        problems.append(f"{shards_dir}: missing")
    else:  # streamed: the folder's entries are looked up in the layout one by one (no set of 10^5 names)
        strays = []
        with os.scandir(shards_dir) as entries:
            for entry in entries:
                if entry.name.startswith(".tmp-"):
                    strays.append(f"{shards_dir / entry.name}: leftover of a killed writer (the next run of the stage "
                                  "removes it)")
                elif manifest.layout.get(entry.name) is None:
                    strays.append(f"{shards_dir / entry.name}: not a shard of this store's layout")
        problems += sorted(strays)
    for entry in sorted(path.iterdir()):
        # the lock file stays after its writer; config.yaml is the config the writing stage recorded beside it
        if entry.name not in (MANIFEST_NAME, SHARDS_DIR, LOCK_NAME, RECORDED_CONFIG):
            problems.append(f"{entry}: unexpected file in the store")
    return problems, checked


# ---- convert ---------------------------------------------------------------------------------------------------

def convert_store(src: str | Path, dst: str | Path, backend: str, overwrite: bool = False, track=None) -> Store:
    """Rewrite a complete store shard by shard into `backend` at `dst` (same arrays, new files and checksums, same
    fingerprint). Resumable: shards already converted are skipped. `track` as in verify_store."""
    src, dst = Path(src), Path(dst)
    if backend not in BACKENDS:
        raise StoreError(f"unknown storage backend {backend!r}: use one of {', '.join(sorted(BACKENDS))}")
    if src.resolve() == dst.resolve():
        raise StoreError(f"convert needs a new destination, not the source {src}")
    source = Store.open(src)
    manifest = replace(source.manifest, backend=backend, shards=(), code_version=code_version())
    target = Store.create(dst, manifest, overwrite=overwrite)
    done = target.committed()
    todo = [r for r in source.manifest.shards if r.name not in done]
    try:
        for rec in todo if track is None else track(todo, len(todo), f"convert to {backend}", "shard"):
            written = target.write_shard(rec.name, source.read_shard(rec.name))
            if rec.content and written.content != rec.content:
                raise StoreError(f"shard {rec.name} converted to different arrays ({written.content[:19]} vs "
                                 f"{rec.content[:19]}): report this as a bug")
    finally:
        try:
            target.refresh_manifest()
        finally:
            target.close()
    return target
