"""A sharded store on disk: a manifest plus one self-contained file set per shard.

Commit protocol (why a killed run loses nothing and duplicates nothing): a shard is written under a temporary
name inside the store, its data files are fsynced and checksummed, a `_commit.json` with the checksum is added,
and the directory is renamed into place. A shard exists under its final name only when it is complete (a directory rename is atomic). The
manifest lists the committed shards with their checksums; it is rebuilt from the shards' commit records, so a
driver killed between a shard's rename and the manifest update loses nothing either.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from storage import _arrow, _zarr
from storage.errors import StoreError
from storage.lock import LOCK_NAME, acquire_writer_lock
from storage.manifest import MANIFEST_NAME, Manifest, ShardRecord, read_manifest, write_manifest

BACKENDS = {"zarr": _zarr, "arrow": _arrow}
COMMIT_NAME = "_commit.json"
SHARDS_DIR = "shards"


def _backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise StoreError(f"unknown storage backend {name!r}: use one of {sorted(BACKENDS)}") from None


def _data_files(shard_dir: Path) -> list[Path]:
    return sorted(p for p in shard_dir.rglob("*") if p.is_file() and p.name != COMMIT_NAME)


def file_checksums(shard_dir: Path) -> dict[str, str]:
    """relative path -> sha256 of each data file of a shard (so `kdcache verify` can name a damaged file)."""
    return {p.relative_to(shard_dir).as_posix(): "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
            for p in _data_files(shard_dir)}


def shard_checksum(shard_dir: Path) -> tuple[str, int]:
    """sha256 over the shard's data files (relative path and bytes, in sorted order) and their total size."""
    digest = hashlib.sha256()
    nbytes = 0
    for path in _data_files(shard_dir):
        data = path.read_bytes()
        digest.update(path.relative_to(shard_dir).as_posix().encode() + b"\0")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        nbytes += len(data)
    return "sha256:" + digest.hexdigest(), nbytes


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays themselves (names, dtypes, shapes, values): the same for every backend, so a store
    converted to another backend keeps its fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode() + b"\0")
        digest.update(a.tobytes())
    return "sha256:" + digest.hexdigest()


def _read_commit(commit: Path) -> dict:
    try:
        return json.loads(commit.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"commit record {commit} is corrupted ({e}): delete its shard folder and rerun "
                         "the stage that writes it") from None


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


class Store:
    """An open store. `manifest` is what was on disk when opened (or last refreshed)."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest
        self.backend = _backend(manifest.backend)
        self.writer_lock = None  # held by a store opened for writing (Store.create) until close()

    def close(self) -> None:
        """Give up the writer lock (a no-op for stores opened for reading)."""
        if self.writer_lock is not None:
            self.writer_lock.release()
            self.writer_lock = None

    # ---- creation and opening -------------------------------------------------------------------------

    @staticmethod
    def create(path: Path, manifest: Manifest, overwrite: bool = False) -> "Store":
        """Create a store, or reopen an existing one written with the same inputs and parameters (resume).

        An existing store with other inputs/parameters is an error, unless `overwrite` deletes it first.
        The returned store holds the store's writer lock (storage/lock.py) until `close()` or process exit.
        """
        path = Path(path)
        if not (path / MANIFEST_NAME).exists() and path.exists() and not _unstarted(path):
            raise StoreError(f"{path} exists and is not a kdcache store: choose an empty or new directory")
        lock = acquire_writer_lock(path)
        try:
            store = Store._create_locked(path, manifest, overwrite)
        except BaseException:
            lock.release()
            raise
        store.writer_lock = lock
        return store

    @staticmethod
    def _create_locked(path: Path, manifest: Manifest, overwrite: bool) -> "Store":
        if (path / MANIFEST_NAME).exists():
            existing = read_manifest(path)
            for what in ("kind", "backend", "fingerprints", "params", "layout"):
                old, new = getattr(existing, what), getattr(manifest, what)
                if old != new and overwrite:
                    for child in path.iterdir():  # everything but the lock we hold
                        if child.name != LOCK_NAME:
                            shutil.rmtree(child) if child.is_dir() else child.unlink()
                    return Store._create_locked(path, manifest, overwrite=False)
                if old != new:
                    raise StoreError(f"{path} already holds a store with different {what} "
                                     f"({_diff(old, new)}): pass --overwrite, delete it, or choose another run folder")
            store = Store(path, existing)
            store.refresh_manifest()
            return store
        (path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        write_manifest(path, manifest)
        return Store(path, manifest)

    @staticmethod
    def open(path: Path, expect: dict | None = None, require_complete: bool = True) -> "Store":
        """Open a store for reading; refuse it when a fingerprint/param differs from `expect`."""
        path = Path(path)
        manifest = read_manifest(path)
        if require_complete and not manifest.complete:
            missing = len(manifest.layout) - len(manifest.shards)
            raise StoreError(f"store {path} is incomplete ({missing} of {len(manifest.layout)} shards missing): "
                             "rerun the stage that writes it to finish it")
        store = Store(path, manifest)
        store.check_commit_records()
        store.check(expect or {})
        return store

    def check_commit_records(self) -> None:
        """An edited manifest (or one copied from another store) no longer matches its shards' commit records,
        which carry the identity of the manifest they were written under. One record is enough to tell."""
        identity = self.manifest.identity()
        for rec in self.manifest.shards[:1]:
            commit = self.shard_dir(rec.name) / COMMIT_NAME
            if not commit.exists():
                raise StoreError(f"shard {commit.parent} is listed in {self.path / MANIFEST_NAME} but missing: "
                                 "rerun the stage that writes the store to restore it")
            recorded = _read_commit(commit).get("store")
            differ = [k for k in identity if recorded is not None and recorded.get(k) != identity[k]]
            if differ:
                raise StoreError(f"{self.path / MANIFEST_NAME} does not match the commit record of shard {rec.name} "
                                 f"(its {', '.join(differ)} differ): the manifest was edited or comes from another "
                                 "store; delete the store and rerun the stage that writes it")

    def check(self, expect: dict) -> None:
        """expect maps a fingerprint or param name to its expected value."""
        for key, want in expect.items():
            have = self.manifest.fingerprints.get(key, self.manifest.params.get(key))
            if have != want:
                raise StoreError(f"store {self.path} has {key} {have!r} but {want!r} is expected: "
                                 "rebuild the store from matching inputs")

    # ---- shards ---------------------------------------------------------------------------------------

    def shard_dir(self, name: str) -> Path:
        """The shard's folder: the backend's data (`data.zarr` / `data.arrow`) and its `_commit.json`."""
        if not name or "/" in name or "\\" in name or "\0" in name or name.startswith(".") or ".." in name:
            raise StoreError(f"invalid shard name {name!r} in {self.path}: the manifest may be tampered with")
        return self.path / SHARDS_DIR / name

    def _data_path(self, shard_dir: Path) -> Path:
        return shard_dir / ("data" + self.backend.SUFFIX)

    def committed(self) -> dict[str, ShardRecord]:
        """Shards that are on disk under their final name, from their commit records."""
        out, identity = {}, self.manifest.identity()
        for rec in self.manifest.layout:
            commit = self.shard_dir(rec.name) / COMMIT_NAME
            if commit.exists():
                info = _read_commit(commit)
                if info.get("store", identity) != identity:
                    raise StoreError(f"shard {commit.parent} was written for another store (its commit record does "
                                     f"not match {self.path / MANIFEST_NAME}): delete that shard folder and rerun")
                out[rec.name] = replace(rec, checksum=info["checksum"], nbytes=info["nbytes"],
                                        content=info.get("content", ""))
        return out

    def write_shard(self, name: str, arrays: dict[str, np.ndarray]) -> ShardRecord:
        """Write and commit one shard atomically. Rewriting a committed shard is a no-op if identical."""
        layout = {r.name: r for r in self.manifest.layout}
        if name not in layout:
            raise StoreError(f"shard {name!r} is not in the layout of {self.path}")
        final = self.shard_dir(name)
        tmp = final.with_name(f".tmp-{name}-{uuid.uuid4().hex[:8]}")
        try:
            tmp.mkdir()
            self.backend.write(self._data_path(tmp), arrays)
            _fsync_tree(tmp)
            checksum, nbytes = shard_checksum(tmp)
            content = content_hash(arrays)
            (tmp / COMMIT_NAME).write_text(json.dumps({"name": name, "checksum": checksum, "nbytes": nbytes,
                                                       "content": content, "files": file_checksums(tmp),
                                                       "store": self.manifest.identity()},
                                                      indent=1, sort_keys=True))
            if final.exists():
                existing = json.loads((final / COMMIT_NAME).read_text())["checksum"] \
                    if (final / COMMIT_NAME).exists() else None
                if existing != checksum:
                    raise StoreError(f"shard {final} already exists with different content "
                                     f"({existing} vs {checksum}): the inputs changed; delete the store and rerun")
            else:
                os.rename(tmp, final)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise StoreError(f"disk full while writing shard {name} of store {self.path}: the partial shard was "
                             "discarded and the committed shards are intact; free space and rerun to resume") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return replace(layout[name], checksum=checksum, nbytes=nbytes, content=content)

    def read_shard(self, name: str, names: list[str] | None = None, verify: bool = True) -> dict[str, np.ndarray]:
        """Read a committed shard's arrays; with verify, refuse it unless its bytes match the manifest checksum."""
        shard = self.shard_dir(name)
        records = {s.name: s for s in self.manifest.shards}
        if name not in records or not shard.exists():
            raise StoreError(f"shard {shard} is missing or not committed: run `kdcache verify {self.path}` "
                             "and rerun the stage that writes it")
        if verify:
            checksum, _ = shard_checksum(shard)
            if checksum != records[name].checksum:
                raise StoreError(f"shard {shard} is corrupted ({self._damaged_file(shard)}checksum {checksum[:19]} != "
                                 f"manifest {records[name].checksum[:19]}): run `kdcache verify {self.path}`, "
                                 "delete the shard and rerun the stage that writes it")
        try:
            return self.backend.read(self._data_path(shard), names)
        except Exception as e:  # a backend error on a verified shard means a damaged or foreign file
            raise StoreError(f"shard {shard} cannot be read ({type(e).__name__}: {e}): delete it and rerun") from e

    @staticmethod
    def _damaged_file(shard: Path) -> str:
        """'file X differs, ' for the first data file whose bytes differ from the commit record (or '')."""
        try:
            recorded = json.loads((shard / COMMIT_NAME).read_text()).get("files") or {}
        except (OSError, ValueError):
            return ""
        actual = file_checksums(shard)
        for name in sorted(set(recorded) | set(actual)):
            if recorded.get(name) != actual.get(name):
                state = "is missing" if name not in actual else "is unexpected" if name not in recorded else "differs"
                return f"file {name} {state}, "
        return ""

    def refresh_manifest(self) -> Manifest:
        """Rewrite the manifest from the shards on disk; drop leftovers of killed writers."""
        for leftover in (self.path / SHARDS_DIR).glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.path.glob(f".{MANIFEST_NAME}.*.tmp"):  # a manifest write killed before its rename
            leftover.unlink(missing_ok=True)
        committed = self.committed()
        shards = tuple(committed[r.name] for r in self.manifest.layout if r.name in committed)
        self.manifest = replace(self.manifest, shards=shards)
        write_manifest(self.path, self.manifest)
        return self.manifest

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.manifest.shards)


def _unstarted(path: Path) -> bool:
    """Empty, or what a create killed before its first manifest leaves: the lock, an empty shards folder, a
    manifest temporary."""
    for child in path.iterdir():
        if child.name == LOCK_NAME or child.name.startswith(f".{MANIFEST_NAME}."):
            continue
        if child.name == SHARDS_DIR and child.is_dir() and not any(child.iterdir()):
            continue
        return False
    return True


def _diff(old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in keys[:3])
    return f"{str(old)[:60]} vs {str(new)[:60]}"


def make_layout(split_sizes: dict[str, int], shard_sequences: int) -> tuple[ShardRecord, ...]:
    """Cut each split into shards of `shard_sequences` sequences, named like `train-00003`."""
    layout = []
    for split, n in split_sizes.items():
        for i, start in enumerate(range(0, n, shard_sequences)):
            layout.append(ShardRecord(name=f"{split}-{i:05d}", split=split, start=start,
                                      count=min(shard_sequences, n - start)))
    return tuple(layout)
