"""Store manifests: frozen dataclasses serialised as JSON (never pickle).

A manifest describes a whole store (what it holds, which inputs it was made from) and lists the shards that
are committed. Fingerprints are opaque strings compared for equality by readers.
"""
from __future__ import annotations

import errno
import json
import os
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path

from kdcache.storage.errors import StoreError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def code_version() -> str:
    try:
        return metadata.version("kdcache")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard: `count` sequences of `split` starting at sequence `start`."""

    name: str
    split: str
    start: int
    count: int
    checksum: str = ""  # sha256 over the shard's data files, "" until the shard is written
    nbytes: int = 0
    content: str = ""   # sha256 over the shard's arrays (backend-independent), "" until written

    @staticmethod
    def from_dict(d: dict) -> "ShardRecord":
        return ShardRecord(**d)


@dataclass(frozen=True)
class Manifest:
    """What a store holds.

    kind:          "tokens" or "signals"
    backend:       "zarr" or "arrow"
    fingerprints:  name -> fingerprint of each input (dataset, tokenizer, teacher, token store ...)
    params:        everything a reader needs to interpret the arrays (seq_len, vocab_size, k, dtypes ...)
    layout:        every shard the store will hold (name, split, start, count), checksum empty
    shards:        the committed shards, with checksums
    """

    kind: str
    backend: str
    fingerprints: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    layout: tuple[ShardRecord, ...] = ()
    shards: tuple[ShardRecord, ...] = ()
    format_version: int = FORMAT_VERSION
    code_version: str = field(default_factory=code_version)

    @property
    def complete(self) -> bool:
        return {s.name for s in self.layout} == {s.name for s in self.shards}

    def splits(self) -> dict[str, list[ShardRecord]]:
        """Committed shards grouped by split, in sequence order."""
        out: dict[str, list[ShardRecord]] = {}
        for s in sorted(self.shards, key=lambda s: (s.split, s.start)):
            out.setdefault(s.split, []).append(s)
        return out

    def shard(self, name: str) -> ShardRecord | None:
        """The committed shard called `name` (None if it is not committed)."""
        return self._shards_by_name.get(name)

    def find(self, split: str, index: int) -> ShardRecord | None:
        """The committed shard of `split` that holds sequence `index` (None if none does)."""
        starts, records = self._split_starts.get(split, ([], []))
        i = bisect_right(starts, index) - 1
        if i >= 0 and index < records[i].start + records[i].count:
            return records[i]
        return None

    # lookups built once per manifest (it is frozen): a reader looks shards up per sequence
    @cached_property
    def _shards_by_name(self) -> dict[str, ShardRecord]:
        return {s.name: s for s in self.shards}

    @cached_property
    def _split_starts(self) -> dict[str, tuple[list[int], list[ShardRecord]]]:
        return {split: ([r.start for r in records], records) for split, records in self.splits().items()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = [asdict(s) for s in self.layout]
        d["shards"] = [asdict(s) for s in self.shards]
        d["complete"] = self.complete
        return d

    @staticmethod
    def from_dict(d: dict) -> "Manifest":
        d = dict(d)
        d.pop("complete", None)
        if d.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"store format version {d.get('format_version')} is not supported "
                             f"(this kdcache reads version {FORMAT_VERSION}): rewrite the store")
        d["layout"] = tuple(ShardRecord.from_dict(s) for s in d.get("layout", []))
        d["shards"] = tuple(ShardRecord.from_dict(s) for s in d.get("shards", []))
        return Manifest(**d)

    def identity(self) -> dict:
        """A short hash of each section that defines the store, recorded in every shard's commit record so an
        edited manifest is caught (the committed shards list and code version are not part of it)."""
        import hashlib

        sections = {"kind": self.kind, "backend": self.backend, "fingerprints": self.fingerprints,
                    "params": self.params, "layout": [(s.name, s.split, s.start, s.count) for s in self.layout]}
        return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for k, v in sections.items()}

    def fingerprint(self) -> str:
        """A fingerprint of the store's content: its inputs, parameters and committed shards' array contents
        (not their file bytes, so the fingerprint survives `kdcache convert` to another backend)."""
        import hashlib

        body = json.dumps([self.kind, self.fingerprints, self.params,
                           sorted((s.name, s.content or s.checksum) for s in self.shards)], sort_keys=True)
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()[:32]


def writer(store_dir: Path, manifest: Manifest | None = None) -> str:
    """The command that writes the store at store_dir, for the advice of an error ("run X" / "rerun X"): named
    where the store sits in a run folder (RUN/tokens: prepare; RUN/signals/<source>: precompute) and its
    manifest (when there is one) agrees; else the commands of both kinds."""
    path = Path(store_dir)
    in_run = "tokens" if path.name == "tokens" else "signals" if path.parent.name == "signals" else None
    if in_run is not None and manifest is not None and manifest.kind != in_run:
        in_run = None  # a store of the other kind moved there: say nothing specific
    if in_run == "tokens":
        return "`kdcache prepare`, the stage that writes it"
    if in_run == "signals":
        source = path.name
        if source == "teacher":
            return "`kdcache precompute`, the stage that writes it"
        return f"`kdcache precompute --source {source}` (or precompute.members), the stage that writes it"
    return ("the command that wrote it (`kdcache prepare` for a token store, `kdcache precompute` for a signal "
            "store, `kdcache convert` for a converted copy)")


def read_manifest(store_dir: Path) -> Manifest:
    path = Path(store_dir) / MANIFEST_NAME
    if not path.exists():
        raise StoreError(f"no store at {store_dir}: {MANIFEST_NAME} is missing (run {writer(store_dir)})")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise StoreError(f"{path} is not a valid manifest ({e}): delete the store and rerun {writer(store_dir)}")


def write_manifest(store_dir: Path, manifest: Manifest) -> None:
    """Atomically replace the manifest (write a temporary file, fsync, rename)."""
    path = Path(store_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest.to_dict(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # e.g. disk full: the old manifest stays, no half-written temporary is left
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise StoreError(f"disk full while writing {path}: the previous manifest is intact and the store "
                             "consistent; free space and rerun to resume") from e
        raise
