"""One writer per store: an exclusive, non-blocking flock on a lock file inside the store.

Why a lock and not cooperating writers: two drivers on one store would each compute every missing shard and race
on the same names (the second rename fails or the shards are computed twice), and their manifest rewrites would
interleave. A second writer therefore stops at once with a one-line error naming the holder. The kernel drops the
lock when its holder dies (even by SIGKILL), so a killed run never blocks its rerun. Workers of the holding driver
(dask tasks) write shards under the driver's lock; they never take it.

flock is per open file: a process that already holds a store's lock gets the same lock back (one process is one
writer), so a stage rerun inside one Python process does not lock itself out.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from kdcache.storage.errors import StoreError

LOCK_NAME = ".writer.lock"

_HELD: dict[Path, "WriterLock"] = {}  # resolved store path -> the lock this process holds


class WriterLock:
    """The held lock of one store; `release()` gives it up (process exit does too)."""

    def __init__(self, store_dir: Path, fd: int):
        self.store_dir, self.fd = store_dir, fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            _HELD.pop(self.store_dir, None)


def acquire_writer_lock(store_dir: Path) -> WriterLock:
    """Take the store's writer lock (creating the folder), or raise StoreError naming the process that holds it."""
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    key = store_dir.resolve()
    if key in _HELD:
        return _HELD[key]
    path = store_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise StoreError(f"store {store_dir} is being written by another process ({holder}; lock {path}): "
                         "wait for it to finish or stop it, or write to another run folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    lock = _HELD[key] = WriterLock(key, fd)
    return lock
