"""The store writer lock between real processes (fast: no stages; the harness covers stages mid-run)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.storage import Manifest, Store, StoreError, make_layout

pytestmark = [pytest.mark.reliability]

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = Manifest(kind="tokens", backend="zarr", params={"seq_len": 4}, layout=make_layout({"train": 2}, 1))
OTHER_WRITER = """
import sys
from kdcache.storage import Manifest, Store, StoreError, make_layout
m = Manifest(kind="tokens", backend="zarr", params={"seq_len": 4}, layout=make_layout({"train": 2}, 1))
try:
    Store.create(sys.argv[1], m).close()
except StoreError as e:
    print(e)
    sys.exit(2)
"""


def _other_writer(path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", OTHER_WRITER, str(path)], env=env, capture_output=True, text=True)


def test_a_second_process_cannot_write_while_the_lock_is_held(tmp_path):
    store = Store.create(tmp_path / "s", MANIFEST)
    again = Store.create(tmp_path / "s", MANIFEST)  # the same process may reopen its own store
    assert again.writer_lock is store.writer_lock
    out = _other_writer(tmp_path / "s")
    assert out.returncode == 2
    assert f"is being written by another process (pid {os.getpid()} on " in out.stdout
    store.close()
    assert _other_writer(tmp_path / "s").returncode == 0  # released: the next writer goes ahead


def test_the_lock_file_does_not_make_a_fresh_folder_look_foreign(tmp_path):
    store = Store.create(tmp_path / "s", MANIFEST)
    store.close()
    (tmp_path / "s" / "manifest.json").unlink()  # as if killed before the first manifest was written
    Store.create(tmp_path / "s", MANIFEST).close()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not a kdcache store"):
        Store.create(tmp_path / "t", MANIFEST)
    assert not (tmp_path / "t" / ".writer.lock").exists()  # a foreign folder is left untouched
