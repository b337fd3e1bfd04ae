"""Disk full (ENOSPC injected into the backend write, the fsync, the manifest write and a checkpoint): the store
stays consistent, the CLI says so in one line, and a rerun completes to the store of an uninterrupted run."""
import errno
import json
import os

import pytest

import kdcache.storage._zarr
import kdcache.storage.store
from kdcache.pipeline.cli import main
from kdcache.stages import train
from kdcache.storage import open_store
from tests.reliability.conftest import cli_args, one_error_line

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def _files(store_dir):
    return {p.relative_to(store_dir).as_posix(): p.read_bytes() for p in sorted(store_dir.rglob("*"))
            if p.is_file() and p.name != ".writer.lock"}


def _fail_after(n_ok: int, real):
    """real() for the first n_ok calls, then the real call (so bytes hit the disk) followed by ENOSPC."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        return result
    return fake


def _assert_consistent(store_dir, n_committed):
    manifest = json.loads((store_dir / "manifest.json").read_text())
    on_disk = sorted(p.name for p in (store_dir / "shards").iterdir())
    assert not [n for n in on_disk if n.startswith(".")], on_disk          # no partial shard left
    assert manifest["shards"]["name"] == on_disk              # the manifest lists what is committed
    assert len(on_disk) == n_committed
    assert not list(store_dir.glob(".manifest.json.*"))


@pytest.mark.parametrize("where", ["backend write", "fsync"])
def test_disk_full_during_a_shard_leaves_the_store_consistent(where, run_copy, base_run, tiny_teacher, monkeypatch,
                                                             capfd, tally):
    reference = _files(base_run / "signals" / "teacher")
    store_dir = run_copy.signals_dir
    import shutil

    shutil.rmtree(store_dir)
    if where == "backend write":
        monkeypatch.setattr(kdcache.storage._zarr, "write", _fail_after(2, kdcache.storage._zarr.write))
    else:
        monkeypatch.setattr(kdcache.storage.store, "_fsync_tree", _fail_after(2, kdcache.storage.store._fsync_tree))
    assert main(cli_args(run_copy, tiny_teacher, "precompute")) == 2
    err = capfd.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("kdcache: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"disk full while writing shard train-00002 of store {store_dir}" in errors[0]
    assert "committed shards are intact" in errors[0] and "rerun to resume" in errors[0]
    _assert_consistent(store_dir, 2)
    monkeypatch.undo()
    assert main(cli_args(run_copy, tiny_teacher, "precompute")) == 0
    assert _files(store_dir) == reference                                 # as if the disk had never filled
    tally("disk-full failures survived")


def test_disk_full_while_writing_the_manifest(run_copy, tiny_teacher, monkeypatch, capfd, tally):
    store_dir = run_copy.signals_dir
    before = (store_dir / "manifest.json").read_bytes()
    real_fsync = os.fsync

    def full(fd):
        real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(cli_args(run_copy, tiny_teacher, "precompute")) == 2     # reopening rewrites the manifest
    line = one_error_line(capfd.readouterr().err)
    assert f"disk full while writing {store_dir / 'manifest.json'}" in line and "consistent" in line
    assert (store_dir / "manifest.json").read_bytes() == before            # the old manifest is intact
    assert not list(store_dir.glob(".manifest.json.*"))                    # and no temporary is left
    monkeypatch.undo()
    assert open_store(store_dir).manifest.complete
    tally("disk-full failures survived")


def test_disk_full_during_a_checkpoint_then_resume(run_copy, base_run, tiny_teacher, monkeypatch, capfd, tally):
    reference_cfg = run_copy
    train.run(reference_cfg)
    reference = [json.loads(l)["loss"] for l in (reference_cfg.student_dir / "metrics.jsonl").read_text().splitlines()]
    import shutil

    shutil.rmtree(reference_cfg.student_dir)
    monkeypatch.setattr(train, "save_model", _fail_after(1, train.save_model))  # the 2nd checkpoint fails
    assert main(cli_args(run_copy, tiny_teacher, "train")) == 2
    err = capfd.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("kdcache: error: ")]
    assert len(errors) == 1 and "disk full" in errors[0] and "Traceback" not in err, err
    ckpts = run_copy.student_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]     # no half-written checkpoint
    monkeypatch.undo()
    assert main(cli_args(run_copy, tiny_teacher, "train")) == 0
    resumed = [json.loads(l)["loss"] for l in (run_copy.student_dir / "metrics.jsonl").read_text().splitlines()]
    assert resumed == reference
    tally("disk-full failures survived")
