"""Writing one file so that a reader (or a resumed run) sees the old file or the new one, never half of one.

The bottom of the stack (no torch, nothing above storage): storage, the stages and the pipeline all use it.
Folders that are renamed into place (checkpoints, saved models, shards) do their own write-then-rename.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write `data` to `path` atomically: to a hidden temporary name in the same folder (the same filesystem, so
    the rename is atomic), then renamed over `path`. A failed write (a full disk, a kill signal turned into an
    exception) removes the temporary file and leaves `path` as it was. With `fsync` the bytes reach the disk
    before the rename (a store's manifest: a power cut must not leave an empty one). Returns `path`."""
    path = Path(path)
    # pid + random: two processes (or threads) writing the same file never share a temporary name
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        if fsync:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """`atomic_write_bytes` of `text` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync)
