"""precompute on a dask cluster that cannot run its tasks fails at once, in one line, instead of waiting for ever:
a worker that cannot import kdcache, no worker at all, workers that all die mid-run, a task that kills every
worker that runs it, a scheduler that is not there. Real `dask scheduler` / `dask worker` processes, loopback
only."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dask
import pytest

from kdcache.pipeline.config import load_config
from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import precompute, prepare
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, tiny_teacher) -> Path:
    """A token store to precompute from (each test copies it into a run folder of its own)."""
    run_dir = tmp_path_factory.mktemp("dask-tokens") / "run"
    prepare.run(load_config(None, tiny_overrides(run_dir, tiny_teacher)))
    return run_dir / "tokens"


def _run_dir(tmp_path: Path, tokens: Path) -> Path:
    shutil.copytree(tokens, tmp_path / "run" / "tokens")
    return tmp_path / "run"


def _dask(*args: str, env: dict | None = None, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "dask", *args, "--no-dashboard"], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def scheduler(tmp_path):
    """A `dask scheduler` on a free loopback port -> its address."""
    file = tmp_path / "scheduler.json"
    process = _dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", str(file),
                    log=tmp_path / "scheduler.log")
    try:
        deadline = time.monotonic() + 120
        while not file.exists() or not file.read_text().strip():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one go, but give it a moment
        yield json.loads(file.read_text())["address"]
    finally:
        _stop(process)


def _worker(scheduler: str, log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A `dask worker` of one thread, registered with the scheduler when this returns."""
    from dask.distributed import Client

    process = _dask("worker", scheduler, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1", *args,
                    env=env, log=log)
    with Client(scheduler, timeout=60) as client:
        client.wait_for_workers(1, timeout=120)
    return process


def test_a_worker_that_cannot_import_kdcache_fails_the_run_at_once_in_one_line(tmp_path, tokens, scheduler,
                                                                               tiny_teacher):
    shadow = tmp_path / "shadow" / "kdcache"   # another `kdcache` first on the worker's sys.path
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not the kdcache you are looking for')\n")
    worker = _worker(scheduler, tmp_path / "worker.log", env={"PYTHONPATH": str(shadow.parent)})
    try:
        run_dir = _run_dir(tmp_path, tokens)
        args = [a for o in tiny_overrides(run_dir, tiny_teacher) for a in ("-s", o)]
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "kdcache.pipeline.cli", "precompute", "--scheduler", scheduler,
                              *args], capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - start
    finally:
        _stop(worker)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("kdcache: error: dask worker tcp://127.0.0.1:")
    assert ("cannot import this kdcache (ImportError('not the kdcache you are looking for')): install kdcache"
            in out.stderr), out.stderr
    assert seconds < 60, seconds                     # the command's own start-up included; it used to never return
    assert not list((run_dir / "signals" / "teacher" / "shards").glob("*"))   # no task was sent


def test_no_worker_at_all_fails_after_worker_timeout(tmp_path, tokens, scheduler, tiny_teacher):
    cfg = load_config(None, tiny_overrides(_run_dir(tmp_path, tokens), tiny_teacher,
                                           **{"precompute.worker_timeout": 2}))
    start = time.monotonic()
    with pytest.raises(KdcacheError, match=rf"no dask worker joined the dask scheduler {scheduler} within 2 s "
                                           r"\(precompute.worker_timeout\): start workers"):
        precompute.run(cfg, scheduler=scheduler)
    assert time.monotonic() - start < 30


def exit_worker(*args, **kwargs):
    """A precompute task that kills the worker process running it (as the OOM killer would)."""
    os._exit(1)


def test_workers_that_all_die_mid_run_fail_it_after_worker_timeout(tmp_path, tokens, scheduler, tiny_teacher,
                                                                   monkeypatch):
    # no nanny, so nothing restarts the worker; PYTHONPATH: the task (this module's exit_worker) is sent by name
    worker = _worker(scheduler, tmp_path / "worker.log", "--no-nanny", env={"PYTHONPATH": str(REPO)})
    try:
        monkeypatch.setattr(precompute, "precompute_shard", exit_worker)
        cfg = load_config(None, tiny_overrides(_run_dir(tmp_path, tokens), tiny_teacher,
                                               **{"precompute.worker_timeout": 3}))
        with pytest.raises(KdcacheError, match=r"has had no dask worker for 3 s \(precompute.worker_timeout\) with "
                                               r"4 shard\(s\) still to do: .* rerun to resume"):
            precompute.run(cfg, scheduler=scheduler)
        assert worker.wait(timeout=30) != 0          # the worker did die
    finally:
        _stop(worker)


def test_a_task_that_kills_every_worker_it_runs_on_is_one_line(tmp_path, tokens, tiny_teacher, monkeypatch):
    monkeypatch.setattr(precompute, "precompute_shard", exit_worker)
    cfg = load_config(None, tiny_overrides(_run_dir(tmp_path, tokens), tiny_teacher,
                                           **{"precompute.scheduler": "local", "precompute.threads_per_worker": 1}))
    # the LocalCluster's nanny restarts the worker; dask gives up on a task after allowed-failures deaths
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with pytest.raises(KdcacheError, match="a precompute task killed every dask worker of the LocalCluster that "
                                               "ran it"):
            precompute.run(cfg)


def test_a_scheduler_that_is_not_there_is_one_line(tmp_path, tokens, tiny_teacher):
    import socket

    with socket.socket() as s:                       # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    cfg = load_config(None, tiny_overrides(_run_dir(tmp_path, tokens), tiny_teacher,
                                           **{"precompute.worker_timeout": 2}))
    with pytest.raises(KdcacheError, match=f"cannot reach the dask scheduler {address} "):
        precompute.run(cfg, scheduler=address)
