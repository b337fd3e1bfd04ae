"""The one write-then-rename helper for single files."""
import os

import pytest

from kdcache.storage.files import atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old ✓")
    assert atomic_write_text(path, "new ✓") == path
    assert path.read_text(encoding="utf-8") == "new ✓"
    atomic_write_bytes(tmp_path / "plot.png", b"\x89PNG")
    assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "plot.png"]


@pytest.mark.parametrize("fail_at", ["write", "rename"])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "state.json"
    path.write_text("old")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fail_at == "write":
        real = type(path).write_bytes

        def half_then_full(self, data):
            real(self, data[:2])  # a partial temporary file exists when the disk fills up
            disk_full()
        monkeypatch.setattr(type(path), "write_bytes", half_then_full)
    else:
        monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new contents")
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_single_files_are_replaced_only_through_the_helper():
    """os.replace (a file over a file) appears only in the helper (a store's manifest too, with fsync). Folders
    renamed into place use os.rename and may stay as they are."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    allowed = {"storage/files.py"}
    found = []
    for folder in ("pipeline", "stages", "storage", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "replace" and \
                        isinstance(node.value, ast.Name) and node.value.id == "os":
                    found.append(str(path.relative_to(root)))
    assert set(found) <= allowed, sorted(set(found) - allowed)


def test_fsync_on_request_and_for_a_stores_manifest(tmp_path, monkeypatch):
    import os

    from kdcache.storage.manifest import Manifest, write_manifest

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    atomic_write_text(tmp_path / "plain.txt", "x")
    assert synced == []                                   # the default: no fsync
    atomic_write_text(tmp_path / "synced.txt", "x", fsync=True)
    assert len(synced) == 1
    write_manifest(tmp_path, Manifest(kind="tokens", backend="zarr"))
    assert len(synced) == 2 and (tmp_path / "manifest.json").exists()  # a manifest reaches the disk before its rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "plain.txt", "synced.txt"]
