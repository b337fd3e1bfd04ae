"""A sharded store on disk: a manifest plus one self-contained file set per shard.

Commit protocol (why a killed run loses nothing and duplicates nothing): a shard is written under a temporary
name inside the store, its data files are fsynced and checksummed, a `_commit.json` with the checksum is added,
and the directory is renamed into place. A shard exists under its final name only when it is complete (a directory rename is atomic). The
manifest lists the committed shards with their checksums; it is rebuilt from the shards' commit records, so a
driver killed between a shard's rename and the manifest update loses nothing either.

Cost at scale: committing a shard touches only that shard (its layout record is derived from its name, the
store's identity is computed once per manifest), and a refresh lists the shards folder once and reads the commit
records of only the shards the manifest does not list yet. The commit record is the shard's own truth and the
manifest a gathered index of them, so a store whose shards cannot be renamed into place (object storage) can keep
the same order: shard objects, then its commit record, the manifest last.
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

from kdcache.storage import _arrow, _zarr
from kdcache.storage.errors import StoreError
from kdcache.storage.lock import LOCK_NAME, acquire_writer_lock
from kdcache.storage.manifest import (COLUMNS, MANIFEST_NAME, Layout, Manifest, ShardRecord, Shards, read_manifest,
                                      write_manifest, writer)

BACKENDS = {"zarr": _zarr, "arrow": _arrow}
COMMIT_NAME = "_commit.json"
SHARDS_DIR = "shards"


def _backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise StoreError(f"unknown storage backend {name!r}: use one of {sorted(BACKENDS)}") from None


def _data_files(shard_dir: Path) -> list[tuple[str, str]]:
    """(path relative to the shard folder, path) of every data file, in path order (the checksum's order).
    os.scandir rather than Path.rglob: a reader lists a shard per read, and rglob costs ~10x more."""
    found = []

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, prefix + entry.name + "/")
                elif entry.is_file() and entry.name != COMMIT_NAME:
                    found.append((prefix + entry.name, entry.path))

    try:
        walk(str(shard_dir), "")
    except FileNotFoundError:  # no shard folder: no files
        return []
    return sorted(found, key=lambda f: f[0].split("/"))  # as sorted Paths compare: part by part


def _signature(rel: str, st: os.stat_result) -> tuple:
    # ctime and inode too: a rewrite that keeps size and mtime (os.utime) still changes ctime, a replaced file its inode
    return rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def read_files(shard_dir: Path) -> tuple[tuple, dict[str, bytes]]:
    """A shard's data files, each read once: (signature, relative path -> bytes, in checksum order). The signature
    (every file's path, size, mtime, ctime and inode, taken before its bytes are read) changes whenever a file is
    written, replaced, added or removed."""
    signature, files = [], {}
    for rel, path in _data_files(shard_dir):
        with open(path, "rb") as f:
            signature.append(_signature(rel, os.fstat(f.fileno())))
            files[rel] = f.read()
    return tuple(signature), files


def files_unchanged(shard_dir: Path, signature: tuple) -> bool:
    """True while every file of a `read_files` signature still has its size, mtime, ctime and inode (only those
    files are looked at: a cheap check, nothing is listed or read)."""
    root = str(shard_dir)
    try:
        return all(_signature(entry[0], os.stat(os.path.join(root, entry[0]))) == entry for entry in signature)
    except OSError:  # a file is gone
        return False


def _checksum(files: dict[str, bytes]) -> tuple[str, int]:
    """sha256 over the files' relative paths and bytes, in `read_files` order, and their total size."""
    digest = hashlib.sha256()
    for rel, data in files.items():
        digest.update(rel.encode() + b"\0")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return "sha256:" + digest.hexdigest(), sum(len(data) for data in files.values())


def _file_checksums(files: dict[str, bytes]) -> dict[str, str]:
    return {rel: "sha256:" + hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def file_checksums(shard_dir: Path) -> dict[str, str]:
    """relative path -> sha256 of each data file of a shard (so `kdcache verify` can name a damaged file)."""
    return _file_checksums(read_files(shard_dir)[1])


def shard_checksum(shard_dir: Path) -> tuple[str, int]:
    """sha256 over the shard's data files (relative path and bytes, in sorted order) and their total size."""
    return _checksum(read_files(shard_dir)[1])


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays themselves (names, dtypes, shapes, values): the same for every backend, so a store
    converted to another backend keeps its fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode() + b"\0")
        digest.update(a.tobytes())
    return "sha256:" + digest.hexdigest()


def _read_commit(commit: Path, rerun: str) -> dict:
    """A shard's commit record; `rerun` names the command that writes its store (manifest.writer)."""
    try:
        return json.loads(commit.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"commit record {commit} is corrupted ({e}): delete its shard folder and rerun "
                         f"{rerun}") from None


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
        # shard name -> (files signature, checksum) of its last verified read: a shard is hashed once per open
        # store, and again whenever a file of it changes (see read_files)
        self._verified: dict[str, tuple[tuple, str]] = {}
        self.last_read = None  # (shard name, files signature, decoded arrays): kdcache.storage.read_sequence's last shard

    def writer(self) -> str:
        """The command that writes this store, for errors' advice (manifest.writer)."""
        return writer(self.path, self.manifest)

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
            try:
                existing = read_manifest(path)
            except StoreError:  # e.g. a store of an older format: --overwrite replaces it, as it says
                if not overwrite:
                    raise
                existing = None
            for what in ("kind", "backend", "fingerprints", "params", "layout"):
                old, new = getattr(existing, what, None), getattr(manifest, what)
                if (existing is None or old != new) and overwrite:
                    for child in path.iterdir():  # everything but the lock we hold
                        if child.name != LOCK_NAME:
                            shutil.rmtree(child) if child.is_dir() else child.unlink()
                    return Store._create_locked(path, manifest, overwrite=False)
                if old != new:
                    raise StoreError(f"{path} already holds a store with different {what} "
                                     f"({_diff(old, new)}): pass --overwrite (make: OVERWRITE=1), delete it, "
                                     "or choose another run folder")
            store = Store(path, existing)
            store.refresh_manifest(recheck=True)  # a resumed run trusts nothing the last one left: every record is read
            return store
        (path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        write_manifest(path, manifest)
        return Store(path, manifest)

    @staticmethod
    def open(path: Path, expect: dict | None = None, require_complete: bool = True) -> "Store":
        """Open a store for reading; refuse it when a fingerprint/param differs from `expect`."""
        path = Path(path)
        manifest = read_manifest(path)
        store = Store(path, manifest)
        store.check_commit_records()  # first: an edited manifest (its layout, say) is named as such
        if require_complete and not manifest.complete:
            missing = len(manifest.layout) - len(manifest.shards)  # O(1): no shard is looked at
            raise StoreError(f"store {path} is incomplete ({missing} of {len(manifest.layout)} shards missing): "
                             f"to finish it, rerun {writer(path, manifest)}")
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
                                 f"to restore it, rerun {self.writer()}")
            recorded = _read_commit(commit, self.writer()).get("store")
            differ = [k for k in identity if recorded is not None and recorded.get(k) != identity[k]]
            if differ:
                raise StoreError(f"{self.path / MANIFEST_NAME} does not match the commit record of shard {rec.name} "
                                 f"(its {', '.join(differ)} differ): the manifest was edited or comes from another "
                                 f"store; delete the store and rerun {self.writer()}")

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
        return shard_dir / self.backend.NAME

    def committed(self, names: list[str] | None = None) -> dict[str, ShardRecord]:
        """Shards that are on disk under their final name, from their commit records (of `names` only if given:
        a task asking about its own shard reads one record, not the whole store's; without `names`, the shards
        folder is listed once and only what is there is read)."""
        out, identity = {}, self.manifest.identity()
        if names is None:
            names = self._listed()
        layout = self.manifest.layout
        for rec in (layout.get(name) for name in names):
            if rec is None:  # not a shard of this layout (verify names such folders)
                continue
            commit = self.shard_dir(rec.name) / COMMIT_NAME
            if commit.exists():
                info = _read_commit(commit, self.writer())
                if info.get("store", identity) != identity:
                    raise StoreError(f"shard {commit.parent} was written for another store (its commit record does "
                                     f"not match {self.path / MANIFEST_NAME}): delete that shard folder and rerun")
                out[rec.name] = replace(rec, checksum=info["checksum"], nbytes=info["nbytes"],
                                        content=info.get("content", ""))
        return out

    def _listed(self, temporaries: bool = False) -> list[str]:
        """Names of the folders in the shards folder, listed once (temporaries of writers only if asked for)."""
        try:
            with os.scandir(self.path / SHARDS_DIR) as entries:
                return [e.name for e in entries if temporaries or not e.name.startswith(".")]
        except FileNotFoundError:
            return []

    def write_shard(self, name: str, arrays: dict[str, np.ndarray]) -> ShardRecord:
        """Write and commit one shard atomically. Rewriting a committed shard is a no-op if identical. Touches only
        this shard: nothing here grows with the store's shard count."""
        record = self.manifest.layout.get(name)
        if record is None:
            raise StoreError(f"shard {name!r} is not in the layout of {self.path}")
        final = self.shard_dir(name)
        tmp = final.with_name(f".tmp-{name}-{uuid.uuid4().hex[:8]}")
        try:
            tmp.mkdir()
            self.backend.write(self._data_path(tmp), arrays)
            _fsync_tree(tmp)
            files = read_files(tmp)[1]
            checksum, nbytes = _checksum(files)
            content = content_hash(arrays)
            (tmp / COMMIT_NAME).write_text(json.dumps({"name": name, "checksum": checksum, "nbytes": nbytes,
                                                       "content": content, "files": _file_checksums(files),
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
        return replace(record, checksum=checksum, nbytes=nbytes, content=content)

    def read_shard(self, name: str, names: list[str] | None = None, verify: bool = True) -> dict[str, np.ndarray]:
        """Read a committed shard's arrays; with verify, refuse it unless its bytes match the manifest checksum.

        The files are read once: their bytes are hashed and decoded. A shard verified earlier through this Store is
        not hashed again while its files are unchanged (same size, mtime, ctime, inode); a newly opened store
        verifies it again."""
        shard = self.shard_dir(name)
        record = self.manifest.shard(name)
        if record is None or not shard.exists():
            raise StoreError(f"shard {shard} is missing or not committed: run `kdcache verify {self.path}` "
                             f"and rerun {self.writer()}")
        try:
            signature, files = read_files(shard)
        except OSError as e:  # e.g. a file removed while the shard is read
            raise StoreError(f"shard {shard} cannot be read ({type(e).__name__}: {e}): run `kdcache verify "
                             f"{self.path}`, delete the shard and rerun {self.writer()}") from e
        if verify and self._verified.get(name) != (signature, record.checksum):
            checksum, _ = _checksum(files)
            if checksum != record.checksum:
                raise StoreError(f"shard {shard} is corrupted ({_damaged_file(shard, files)}checksum "
                                 f"{checksum[:19]} != manifest {record.checksum[:19]}): run `kdcache verify "
                                 f"{self.path}`, delete the shard and rerun {self.writer()}")
            self._verified[name] = (signature, record.checksum)
        try:
            return self.backend.decode(files, names)
        except Exception as e:  # a backend error on a verified shard means a damaged or foreign file
            raise StoreError(f"shard {shard} cannot be read ({type(e).__name__}: {e}): delete it and rerun") from e

    def verified_signature(self, name: str) -> tuple | None:
        """The files signature of the last verified read of shard `name` through this store (None if none)."""
        verified = self._verified.get(name)
        return verified[0] if verified else None

    def refresh_manifest(self, recheck: bool = False) -> Manifest:
        """Rewrite the manifest from the shards on disk; drop leftovers of killed writers.

        The shards folder is listed once: a shard the manifest already lists keeps its record, a shard it does not
        list yet is read from its commit record, a listed shard that is gone is dropped. So the refresh at the end
        of a run costs one listing plus the shards the run wrote, not a commit record per shard: the listed shards
        were read by this writer's own `recheck` refresh when it opened the store (Store.create), and its writer
        lock keeps other writers out; a committed shard is never changed in place (a rewrite is a no-op or an
        error). With `recheck` every commit record is read again (a folder replaced by hand, say by another
        store's shard, is caught): once per run, when a writer resumes a store."""
        present = []
        for name in self._listed(temporaries=True):
            if name.startswith(".tmp-"):
                shutil.rmtree(self.path / SHARDS_DIR / name, ignore_errors=True)
            elif not name.startswith("."):
                present.append(name)
        for leftover in self.path.glob(f".{MANIFEST_NAME}.*.tmp"):  # a manifest write killed before its rename
            leftover.unlink(missing_ok=True)
        # at the level of the manifest's columns: no ShardRecord is built for the shards already listed
        old, layout = self.manifest.shards, self.manifest.layout
        names = [] if recheck else old.names()
        on_disk = set(present)
        keep = [i for i, name in enumerate(names) if name in on_disk]
        known = {names[i] for i in keep}
        fresh = self.committed([name for name in present if name not in known])
        if len(keep) == len(names) and not fresh:
            shards = old
        else:
            rows = [tuple(old.cols[c][i] for c in COLUMNS) for i in keep]
            rows += [(r.name, r.checksum, r.nbytes, r.content) for r in fresh.values()]
            if fresh:  # in layout order
                rows.sort(key=lambda row: layout.position(row[0]))
            shards = Shards({c: [row[j] for row in rows] for j, c in enumerate(COLUMNS)}, layout)
        self.manifest = replace(self.manifest, shards=shards)
        write_manifest(self.path, self.manifest)
        return self.manifest

    def nbytes(self) -> int:
        return self.manifest.nbytes()


def _damaged_file(shard: Path, files: dict[str, bytes]) -> str:
    """'file X differs, ' for the first data file whose bytes differ from the shard's commit record (or '')."""
    try:
        recorded = json.loads((shard / COMMIT_NAME).read_text()).get("files") or {}
    except (OSError, ValueError):
        return ""
    actual = _file_checksums(files)
    for name in sorted(set(recorded) | set(actual)):
        if recorded.get(name) != actual.get(name):
            state = "is missing" if name not in actual else "is unexpected" if name not in recorded else "differs"
            return f"file {name} {state}, "
    return ""


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


def make_layout(split_sizes: dict[str, int], shard_sequences: int) -> Layout:
    """Cut each split into shards of `shard_sequences` sequences, named like `train-00003`: a derived Layout (a
    sequence of ShardRecord built on demand; the manifest stores only the split sizes and shard_sequences)."""
    return Layout(tuple(split_sizes.items()), shard_sequences)
