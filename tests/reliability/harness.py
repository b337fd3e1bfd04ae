"""Crash-safety harness: SIGKILL prepare, precompute and train at many seeded random points, rerun, compare.

One process imports everything once and never runs a stage itself; every run — the uninterrupted reference
and each attempt — is a fork() of it running the real stage code, killed with SIGKILL after a seeded random
delay. A fork costs milliseconds where a fresh python+torch start costs seconds, so dozens of kills fit in a
test. The parent stays single-threaded (torch one thread, tqdm's monitor off, no zarr I/O loop started: a stage
run in the parent leaves threads behind whose locks deadlock a forked child), and it checks stores with JSON
and hashlib only.

    python -m tests.reliability.harness SPEC.json OUT.json

SPEC: {"workdir", "teacher", "data" (a jsonl file), "seed", "kills": {"prepare": n, "precompute": n, "train": n}}.
OUT: counts per stage (kills that landed, of them mid-shard / with the manifest behind the shards, cycles run to
completion, final stores byte-identical to the reference) and the concurrency result.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

MAX_RUNS_PER_CYCLE = 40  # a cycle that needs more reruns than this is making no progress: a failure


def _fork(fn, err_file: Path) -> int:
    """Run fn() in a forked child with stdout/stderr discarded; a failure's traceback goes to err_file."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        fn()
    except BaseException as e:  # the child reports and exits, it never returns into the harness
        err_file.write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        code = 2
    os._exit(code)


def _run_until(pid: int, delay: float) -> tuple[bool, int]:
    """Let the child run `delay` seconds, then SIGKILL it. (killed, exit code); killed is False if it finished."""
    end = time.monotonic() + delay
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return False, os.waitstatus_to_exitcode(status)
        time.sleep(min(0.003, max(0.0, end - time.monotonic())))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return killed, 0 if not killed else -signal.SIGKILL


def _timed_full_run(fn, err_file: Path, probe) -> tuple[float, float]:
    """Duration of an uninterrupted forked run and the time at which probe() first became true (0 if never)."""
    start = time.monotonic()
    pid = _fork(fn, err_file)
    first = 0.0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if not first and probe():
            first = time.monotonic() - start
        time.sleep(0.003)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"uninterrupted run failed: {err_file.read_text() if err_file.exists() else code}")
    return time.monotonic() - start, first


def store_files(store_dir: Path) -> dict[str, bytes]:
    """Every file of a store (manifest, shards, commit records) except the writer lock."""
    from kdcache.storage.lock import LOCK_NAME

    return {p.relative_to(store_dir).as_posix(): p.read_bytes() for p in sorted(store_dir.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def check_store_after_kill(store_dir: Path, counts: dict) -> None:
    """What a kill may leave: whole shards under final names, a parseable manifest listing only whole shards."""
    from kdcache.storage import Store, StoreError
    from kdcache.storage.manifest import MANIFEST_NAME, read_manifest
    from kdcache.storage.store import COMMIT_NAME, shard_checksum

    shards = store_dir / "shards"
    entries = list(shards.iterdir()) if shards.exists() else []
    if any(p.name.startswith(".tmp-") for p in entries):
        counts["mid_shard"] += 1
    final = {}
    for shard in entries:
        if shard.name.startswith("."):
            continue
        commit = shard / COMMIT_NAME
        assert commit.exists(), f"partial shard visible under its final name: {shard}"
        record = json.loads(commit.read_text())
        assert shard_checksum(shard)[0] == record["checksum"], f"shard {shard} does not match its commit record"
        final[shard.name] = record["checksum"]
    if not (store_dir / MANIFEST_NAME).exists():
        assert not final, "shards committed without a manifest"
        return
    manifest = read_manifest(store_dir)  # never half-written: it is replaced by a rename
    for rec in manifest.shards:
        assert final.get(rec.name) == rec.checksum, f"manifest lists {rec.name} but it is not that committed shard"
    if len(manifest.shards) < len(final):
        counts["manifest_behind"] += 1
    if not manifest.complete:
        try:
            Store.open(store_dir)
        except StoreError as e:
            assert "incomplete" in str(e), e
        else:
            raise AssertionError("an incomplete store opened for reading")


def kill_cycles(what: str, run_stage, reset, store_dir: Path, reference: dict, min_kills: int,
                rng: random.Random, workdir: Path, after_kill=None, final_check=None) -> dict:
    """Fresh start, then attempts killed at random delays until one finishes; repeat until min_kills landed.

    Half the delays are uniform over a whole uninterrupted run, half over its write phase (from the first
    output on), so kills land both during start-up and between/inside shard commits."""
    err = workdir / f"{what}-child-error.txt"
    started = time.monotonic()
    reset()
    duration, first_output = _timed_full_run(run_stage, err, lambda: _has_output(store_dir))
    assert final_check(store_dir) if final_check else store_files(store_dir) == reference, \
        f"{what}: an uninterrupted forked run differs from the reference"
    counts = {"kills": 0, "runs": 1, "cycles": 0, "identical_finals": 0, "mid_shard": 0, "manifest_behind": 0,
              "run_seconds": round(duration, 2)}
    while counts["kills"] < min_kills:
        reset()
        for attempt in range(MAX_RUNS_PER_CYCLE):
            low = first_output if rng.random() < 0.5 else 0.0
            delay = rng.uniform(low, duration)
            counts["runs"] += 1
            killed, code = _run_until(_fork(run_stage, err), delay)
            if not killed:
                assert code == 0, f"{what} rerun failed: {err.read_text() if err.exists() else code}"
                break
            counts["kills"] += 1
            (after_kill or check_store_after_kill)(store_dir, counts)
        else:
            raise AssertionError(f"{what}: {MAX_RUNS_PER_CYCLE} reruns without finishing")
        counts["cycles"] += 1
        same = final_check(store_dir) if final_check else store_files(store_dir) == reference
        assert same, f"{what}: the store after kills and reruns differs from the uninterrupted one"
        counts["identical_finals"] += 1
    counts["seconds"] = round(time.monotonic() - started, 1)
    return counts


def _has_output(path: Path) -> bool:
    shards = path / "shards"
    if shards.exists():
        return any(True for _ in shards.iterdir())
    return (path / "checkpoints").exists() and any(True for _ in (path / "checkpoints").iterdir())


def concurrency(cfg, stage_run, store_dir: Path, reset, workdir: Path, reference: dict) -> dict:
    """A second writer on a store whose writer is mid-run (paused with SIGSTOP while it holds the lock) must stop
    with the lock error and write nothing; the first then finishes an identical store."""
    err_a, err_b = workdir / "writer-a.txt", workdir / "writer-b.txt"
    for attempt in range(5):
        reset()
        err_b.unlink(missing_ok=True)
        pid_a = _fork(stage_run, err_a)
        lock = store_dir / ".writer.lock"
        while True:
            done, status = os.waitpid(pid_a, os.WNOHANG)
            if done or (lock.exists() and lock.read_text().startswith(f"pid {pid_a} ")):
                break
            time.sleep(0.001)
        if done:  # the first writer finished before it could be paused: try again
            continue
        os.kill(pid_a, signal.SIGSTOP)
        if os.waitpid(pid_a, os.WNOHANG)[0]:
            continue
        before = store_files(store_dir)
        pid_b = _fork(stage_run, err_b)
        _, status_b = os.waitpid(pid_b, 0)
        after = store_files(store_dir)
        os.kill(pid_a, signal.SIGCONT)
        _, status_a = os.waitpid(pid_a, 0)
        message = err_b.read_text().splitlines()[0] if err_b.exists() else ""
        return {"attempts": attempt + 1, "second_exit": os.waitstatus_to_exitcode(status_b),
                "second_error": message, "holder_pid": pid_a, "second_wrote_nothing": before == after,
                "first_exit": os.waitstatus_to_exitcode(status_a),
                "first_identical": store_files(store_dir) == reference}
    raise AssertionError("the first writer always finished before it could be paused")


def main(spec_path: str, out_path: str) -> None:
    import threading

    import torch

    torch.set_num_threads(1)
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread that could hold tqdm's lock across a fork
    import datasets  # noqa: F401  warm the imports every child needs
    import transformers.models.llama.modeling_llama  # noqa: F401
    import zarr  # noqa: F401

    from kdcache.pipeline.config import load_config
    from kdcache.stages import precompute, prepare, train
    from tests.conftest import tiny_overrides

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["workdir"])
    rng = random.Random(spec["seed"])
    extra = {"prepare.dataset": spec["data"], "prepare.seq_len": 64, "prepare.max_train_sequences": 40,
             "prepare.max_validation_sequences": 4, "prepare.shard_sequences": 2,
             "precompute.threads_per_worker": 1,  # 2 spinning OpenMP threads per tiny matmul crawl on a busy machine
             "train.max_steps": 12, "train.checkpoint_every": 2, "train.prefetch": 0}
    ref_cfg = load_config(None, tiny_overrides(work / "reference", spec["teacher"], **extra))
    cfg = load_config(None, tiny_overrides(work / "killed", spec["teacher"], **extra))
    started = time.monotonic()
    out = {}

    # the uninterrupted references, each in a forked child like every attempt
    for name, stage in (("prepare", prepare), ("precompute", precompute), ("train", train)):
        assert threading.active_count() == 1, threading.enumerate()
        _timed_full_run(lambda: stage.run(ref_cfg), work / f"reference-{name}.txt", lambda: False)
    out["reference_seconds"] = round(time.monotonic() - started, 1)
    ref_tokens, ref_signals = store_files(ref_cfg.tokens_dir), store_files(ref_cfg.signals_dir)
    ref_losses = _losses(ref_cfg.student_dir)

    def run_prepare():
        prepare.run(cfg)

    def run_precompute():
        precompute._TEACHERS.clear()  # each attempt loads its teacher, as a fresh process would
        precompute.run(cfg)

    def run_train():
        train.run(cfg)

    def reset_tokens():
        shutil.rmtree(cfg.tokens_dir, ignore_errors=True)

    def reset_signals():
        shutil.rmtree(cfg.signals_dir, ignore_errors=True)

    def reset_student():
        shutil.rmtree(cfg.student_dir, ignore_errors=True)

    out["prepare"] = kill_cycles("prepare", run_prepare, reset_tokens, cfg.tokens_dir, ref_tokens,
                                 spec["kills"]["prepare"], rng, work)
    if store_files(cfg.tokens_dir) != ref_tokens:
        raise AssertionError("prepare: final token store differs from the reference")
    out["precompute"] = kill_cycles("precompute", run_precompute, reset_signals, cfg.signals_dir, ref_signals,
                                    spec["kills"]["precompute"], rng, work)

    def after_train_kill(student_dir: Path, counts: dict) -> None:
        latest = train.latest_checkpoint(student_dir / "checkpoints") if (student_dir / "checkpoints").exists() else None
        if latest is not None:  # the checkpoint a resume will use is whole
            assert all((latest / f).exists() for f in ("model.safetensors", "optimizer.pt", "state.json")), latest
        if list((student_dir / "checkpoints").glob(".tmp-*")) if (student_dir / "checkpoints").exists() else []:
            counts["mid_shard"] += 1  # killed while a checkpoint was being written

    out["train"] = kill_cycles("train", run_train, reset_student, cfg.student_dir, {}, spec["kills"]["train"], rng,
                               work, after_kill=after_train_kill,
                               final_check=lambda d: _losses(d) == ref_losses)
    out["train"]["steps"] = len(ref_losses)
    out["concurrency"] = {
        "precompute": concurrency(cfg, run_precompute, cfg.signals_dir, reset_signals, work, ref_signals),
        "prepare": concurrency(cfg, run_prepare, cfg.tokens_dir, reset_tokens, work, ref_tokens)}
    out["seconds"] = round(time.monotonic() - started, 1)
    Path(out_path).write_text(json.dumps(out, indent=1))


def _losses(student_dir: Path) -> list:
    """The logged (step, loss) trajectory, exactly as written."""
    log = student_dir / "metrics.jsonl"
    if not log.exists():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, log.read_text().splitlines())]


if __name__ == "__main__":
    main(*sys.argv[1:])
