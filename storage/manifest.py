"""Store manifests: frozen dataclasses serialised as JSON (never pickle).

A manifest describes a whole store (what it holds, which inputs it was made from) and lists the shards that
are committed. Fingerprints are opaque strings compared for equality by readers.
"""
from __future__ import annotations

import errno
import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path

from kdcache.storage.errors import StoreError
from kdcache.storage.files import atomic_write_text

# 2: the layout is stored as split sizes + shard_sequences (derived, not listed) and the committed shards as
# columns; version 1 listed a record per shard twice (the layout and the shards), parsed whole by every task
FORMAT_VERSION = 2
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


def _lazy_item(seq, i, what: str):
    """seq[i] (an index or a slice) of a sequence whose records are built on demand by seq._record(i)."""
    if isinstance(i, slice):
        return tuple(seq._record(j) for j in range(*i.indices(len(seq))))
    if i < 0:
        i += len(seq)
    if not 0 <= i < len(seq):
        raise IndexError(f"{what} index out of range")
    return seq._record(i)


class Layout(Sequence):
    """Every shard a store will hold, in order: derived from the split sizes and `shard_sequences` (make_layout's
    cut), so a store of 10^5 shards stores and compares two numbers per split, and a shard is found by its name in
    O(1) without building the others. A layout that is not such a cut (hand-made, e.g. tests) keeps its records.
    The spec is canonical (empty splits dropped, shard_sequences capped at the largest split), so equal layouts have
    equal specs and equal identities."""

    __slots__ = ("splits", "shard_sequences", "_records", "_offsets", "_by_name", "_positions")

    def __init__(self, splits=(), shard_sequences: int = 1, records: tuple | None = None):
        self._by_name = self._positions = None
        if records is not None:
            self.splits, self.shard_sequences, self._records = None, None, tuple(records)
            self._offsets = None
            return
        splits = tuple((str(k), int(n)) for k, n in splits if int(n) > 0)
        if int(shard_sequences) < 1:
            raise StoreError(f"shard_sequences must be at least 1, not {shard_sequences}")
        self.splits = splits
        self.shard_sequences = min(int(shard_sequences), max((n for _, n in splits), default=1))
        self._records = None
        offsets, total = [], 0
        for _, n in splits:
            offsets.append(total)
            total += -(-n // self.shard_sequences)
        self._offsets = (tuple(offsets), total)

    @staticmethod
    def of(records) -> "Layout":
        """A Layout from shard records: the derived form when they are make_layout's cut (checked once, O(n))."""
        if isinstance(records, Layout):
            return records
        records = tuple(records)
        sizes: dict[str, int] = {}
        for r in records:
            sizes[r.split] = r.start + r.count
        derived = Layout(tuple(sizes.items()), max((r.count for r in records), default=1) or 1)
        if len(derived) == len(records) and all(a == b for a, b in zip(derived, records)):
            return derived
        return Layout(records=records)

    @property
    def derived(self) -> bool:
        return self._records is None

    def __len__(self) -> int:
        return len(self._records) if self._records is not None else self._offsets[1]

    def _record(self, i: int) -> ShardRecord:
        offsets = self._offsets[0]
        j = bisect_right(offsets, i) - 1
        split, n = self.splits[j]
        return self._derived(split, n, i - offsets[j])

    def _derived(self, split: str, n: int, k: int) -> ShardRecord:
        """Shard k of a split of n sequences, cut every shard_sequences (make_layout's naming)."""
        start = k * self.shard_sequences
        return ShardRecord(name=f"{split}-{k:05d}", split=split, start=start, count=min(self.shard_sequences, n - start))

    def __getitem__(self, i):
        if self._records is not None:
            return self._records[i]
        return _lazy_item(self, i, "layout")

    def __iter__(self):
        if self._records is not None:
            yield from self._records
            return
        for split, n in self.splits:
            for k in range(-(-n // self.shard_sequences)):
                yield self._derived(split, n, k)

    def get(self, name: str) -> ShardRecord | None:
        """The shard called `name` (None if the layout has none): O(1), parsed from the name when derived."""
        if self._records is not None:
            if self._by_name is None:
                self._by_name = {r.name: r for r in self._records}
            return self._by_name.get(name)
        split, _, number = name.rpartition("-")
        if not number.isdigit() or len(number) < 5 or (len(number) > 5 and number[0] == "0"):
            return None
        for j, (s, n) in enumerate(self.splits):
            if s == split:
                if int(number) * self.shard_sequences >= n:
                    return None
                return self._derived(split, n, int(number))
        return None

    def sequences(self) -> int:
        """How many sequences the layout covers."""
        return sum(n for _, n in self.splits) if self.derived else sum(r.count for r in self)

    def position(self, name: str) -> int:
        """Where shard `name` sits in the layout (0-based; len(self) for a name not in it): O(1)."""
        if self._records is not None:
            if self._positions is None:
                self._positions = {r.name: i for i, r in enumerate(self._records)}
            return self._positions.get(name, len(self))
        split, _, number = name.rpartition("-")
        for j, (s, _n) in enumerate(self.splits):
            if s == split and self.get(name) is not None:
                return self._offsets[0][j] + int(number)
        return len(self)

    def __contains__(self, item) -> bool:
        if isinstance(item, str):
            return self.get(item) is not None
        return isinstance(item, ShardRecord) and self.get(item.name) == item

    def spec(self):
        """What the manifest stores: {"splits": [[split, n], ...], "shard_sequences": s} (derived) or
        {"records": [[name, split, start, count], ...]}."""
        if self._records is None:
            return {"splits": [list(p) for p in self.splits], "shard_sequences": self.shard_sequences}
        return {"records": [[r.name, r.split, r.start, r.count] for r in self._records]}

    @staticmethod
    def from_spec(d: dict) -> "Layout":
        if "records" in d:
            return Layout(records=tuple(ShardRecord(*r) for r in d["records"]))
        return Layout(tuple((s, n) for s, n in d["splits"]), d["shard_sequences"])

    def __eq__(self, other) -> bool:
        if isinstance(other, Layout) and self.derived and other.derived:
            return (self.splits, self.shard_sequences) == (other.splits, other.shard_sequences)
        if isinstance(other, (Layout, tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self):
        return hash(json.dumps(self.spec()))

    def __repr__(self) -> str:
        return f"Layout({self.spec() if self.derived else len(self)})"


COLUMNS = ("name", "checksum", "nbytes", "content")


class Shards(Sequence):
    """The committed shards, held as columns (name, checksum, nbytes, content) as the manifest stores them: a
    ShardRecord is built only when asked for (its split, start and count from the layout), so opening a store of
    10^5 shards builds none, and a lookup by name is O(1) after one index of the names."""

    __slots__ = ("cols", "layout", "_index")

    def __init__(self, cols: dict, layout: "Layout"):
        self.cols, self.layout, self._index = cols, layout, None

    @staticmethod
    def of(records, layout: "Layout") -> "Shards":
        if isinstance(records, Shards):
            return records if records.layout is layout else Shards(records.cols, layout)
        records = tuple(records)
        return Shards({"name": [r.name for r in records], "checksum": [r.checksum for r in records],
                       "nbytes": [r.nbytes for r in records], "content": [r.content for r in records]}, layout)

    def __len__(self) -> int:
        return len(self.cols["name"])

    def _record(self, i: int) -> ShardRecord:
        c = self.cols
        name = c["name"][i]
        rec = self.layout.get(name) or ShardRecord(name, "", 0, 0)  # not in the layout: verify names it
        return ShardRecord(name, rec.split, rec.start, rec.count, c["checksum"][i], c["nbytes"][i], c["content"][i])

    def __getitem__(self, i):
        return _lazy_item(self, i, "shard")

    def __iter__(self):
        for i in range(len(self)):
            yield self._record(i)

    def names(self) -> list[str]:
        return self.cols["name"]

    def sequences(self) -> int:
        """How many sequences the committed shards hold: O(splits) for a derived layout (every shard holds
        shard_sequences but a split's last), one record per shard otherwise."""
        layout = self.layout
        if not layout.derived:
            return sum(r.count for r in self)
        total = len(self) * layout.shard_sequences
        for split, n in layout.splits:
            last = (n - 1) // layout.shard_sequences
            if self.get(f"{split}-{last:05d}") is not None:
                total -= (last + 1) * layout.shard_sequences - n
        return total

    def get(self, name: str) -> ShardRecord | None:
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.cols["name"])}
        i = self._index.get(name)
        return None if i is None else self._record(i)

    def nbytes(self) -> int:
        return sum(self.cols["nbytes"])

    def __add__(self, other):
        return tuple(self) + tuple(other)

    def __eq__(self, other) -> bool:
        if isinstance(other, Shards):
            return self.cols == other.cols
        if isinstance(other, (tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"Shards({len(self)} committed)"


@dataclass(frozen=True)
class Manifest:
    """What a store holds.

    kind:          "tokens" or "signals"
    backend:       "zarr" or "arrow"
    fingerprints:  name -> fingerprint of each input (dataset, tokenizer, teacher, token store ...)
    params:        everything a reader needs to interpret the arrays (seq_len, vocab_size, k, dtypes ...)
    layout:        every shard the store will hold (name, split, start, count), checksum empty: a Layout, derived
                   from split sizes + shard_sequences (a tuple of records given here is turned into one)
    shards:        the committed shards, with checksums, in layout order
    """

    kind: str
    backend: str
    fingerprints: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    layout: tuple[ShardRecord, ...] = ()
    shards: tuple[ShardRecord, ...] = ()
    format_version: int = FORMAT_VERSION
    code_version: str = field(default_factory=code_version)

    def __post_init__(self):
        if not isinstance(self.layout, Layout):
            object.__setattr__(self, "layout", Layout.of(self.layout))
        object.__setattr__(self, "shards", Shards.of(self.shards, self.layout))

    @property
    def complete(self) -> bool:
        # the committed shards are a subset of the layout (refresh_manifest takes them from it), so counting is enough
        return len(self.layout) == len(self.shards)

    def splits(self) -> dict[str, list[ShardRecord]]:
        """Committed shards grouped by split, in sequence order."""
        out: dict[str, list[ShardRecord]] = {}
        for s in sorted(self.shards, key=lambda s: (s.split, s.start)):
            out.setdefault(s.split, []).append(s)
        return out

    def shard(self, name: str) -> ShardRecord | None:
        """The committed shard called `name` (None if it is not committed)."""
        return self.shards.get(name)

    def find(self, split: str, index: int) -> ShardRecord | None:
        """The committed shard of `split` that holds sequence `index` (None if none does)."""
        starts, records = self._split_starts.get(split, ([], []))
        i = bisect_right(starts, index) - 1
        if i >= 0 and index < records[i].start + records[i].count:
            return records[i]
        return None

    # lookups built once per manifest (it is frozen): a reader looks shards up per sequence
    @cached_property
    def _split_starts(self) -> dict[str, tuple[list[int], list[ShardRecord]]]:
        return {split: ([r.start for r in records], records) for split, records in self.splits().items()}

    def nbytes(self) -> int:
        """Bytes of the committed shards' data files, as recorded when each was committed (no file is looked at)."""
        return self.shards.nbytes()

    def to_dict(self) -> dict:
        """The JSON form: the layout as its spec, the committed shards as columns (one list per field, in layout
        order), so a store of 10^5 shards has a compact manifest that parses in a fraction of a second."""
        d = {"kind": self.kind, "backend": self.backend, "fingerprints": self.fingerprints, "params": self.params,
             "format_version": self.format_version, "code_version": self.code_version}
        d["layout"] = self.layout.spec()
        d["shards"] = dict(self.shards.cols)
        d["complete"] = self.complete
        d["shards_committed"] = len(self.shards)
        d["nbytes"] = self.nbytes()
        return d

    @staticmethod
    def from_dict(d: dict) -> "Manifest":
        d = dict(d)
        for derived in ("complete", "shards_committed", "nbytes"):
            d.pop(derived, None)
        if d.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"store format version {d.get('format_version')} is not supported (this kdcache reads "
                             f"version {FORMAT_VERSION}): delete the store and rerun the stage that wrote it")
        layout = Layout.from_spec(d.get("layout") or {"splits": [], "shard_sequences": 1})
        cols = d.get("shards") or {c: [] for c in COLUMNS}
        if len({len(cols[c]) for c in COLUMNS}) != 1:
            raise ValueError("the columns of shards differ in length")
        d["layout"], d["shards"] = layout, Shards({c: cols[c] for c in COLUMNS}, layout)
        return Manifest(**d)

    def identity(self) -> dict:
        """A short hash of each section that defines the store, recorded in every shard's commit record so an
        edited manifest is caught (the committed shards list and code version are not part of it). Computed once
        per manifest (it is frozen) from the layout's spec: O(1) for a derived layout, whatever the shard count."""
        return dict(self._identity)

    @cached_property
    def _identity(self) -> dict:
        import hashlib

        sections = {"kind": self.kind, "backend": self.backend, "fingerprints": self.fingerprints,
                    "params": self.params, "layout": self.layout.spec()}
        return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for k, v in sections.items()}

    def fingerprint(self) -> str:
        """A fingerprint of the store's content: its inputs, parameters and committed shards' array contents
        (not their file bytes, so the fingerprint survives `kdcache convert` to another backend)."""
        import hashlib

        body = json.dumps([self.kind, self.fingerprints, self.params,
                           sorted(zip(self.shards.names(), (content or checksum for content, checksum in
                                  zip(self.shards.cols["content"], self.shards.cols["checksum"]))))],
                          sort_keys=True)  # from the columns: no record is built
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
        raw = json.loads(path.read_text())
        version = raw.get("format_version")
        if version != FORMAT_VERSION:  # format 1 listed every shard twice; reading it would cost what 2 avoids
            raise StoreError(f"store {store_dir} has format version {version}, this kdcache reads version "
                             f"{FORMAT_VERSION}: delete it and rerun {writer(store_dir)} (or pass --overwrite)")
        return Manifest.from_dict(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise StoreError(f"{path} is not a valid manifest ({e}): delete the store and rerun {writer(store_dir)}")


def write_manifest(store_dir: Path, manifest: Manifest) -> None:
    """Atomically replace the manifest (a temporary file, fsync, rename: storage.files)."""
    path = Path(store_dir) / MANIFEST_NAME
    d = manifest.to_dict()
    shards = d.pop("shards")
    # the header indented for people, the shard columns on one line: json's C encoder (indent makes json use its
    # pure-Python one, ~10x slower on 10^5 shards)
    text = json.dumps(d, indent=1, sort_keys=True)[:-2] + ',\n "shards": ' + json.dumps(shards, sort_keys=True) + "\n}\n"
    try:
        atomic_write_text(path, text, fsync=True)
    except OSError as e:  # e.g. disk full: the old manifest stays, no half-written temporary is left
        if e.errno == errno.ENOSPC:
            raise StoreError(f"disk full while writing {path}: the previous manifest is intact and the store "
                             "consistent; free space and rerun to resume") from e
        raise
