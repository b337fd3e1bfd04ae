"""Crash safety: prepare, precompute and train SIGKILLed at many seeded random points (tests/reliability/harness.py)
each resume to exactly what an uninterrupted run produces; two writers on one store never interleave."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

KILLS = {"prepare": 20, "precompute": 20, "train": 6}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness(tmp_path_factory, tiny_teacher, tally):
    from tests.reliability.conftest import instruction_lines

    work = tmp_path_factory.mktemp("kills")
    data = work / "data.jsonl"
    data.write_text(instruction_lines(60))
    spec = work / "spec.json"
    spec.write_text(json.dumps({"workdir": str(work), "teacher": str(tiny_teacher), "data": str(data), "seed": 8,
                                "kills": KILLS}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(work / "hf")}
    out = work / "out.json"
    proc = subprocess.run([sys.executable, "-m", "tests.reliability.harness", str(spec), str(out)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for stage in KILLS:
        tally(f"kills survived ({stage})", result[stage]["kills"])
    from tests.reliability.conftest import DETAILS

    DETAILS["kill_harness"] = result
    return result


@pytest.mark.parametrize("stage", ["prepare", "precompute"])
def test_killed_store_writers_resume_to_the_identical_store(harness, stage):
    r = harness[stage]
    assert r["kills"] >= KILLS[stage]
    assert r["identical_finals"] == r["cycles"] >= 1   # every interrupted cycle ended byte-identical
    # (how many kills landed mid-shard or before a manifest update is timing: reported, not asserted)


def test_killed_training_resumes_to_the_same_loss_trajectory(harness):
    r = harness["train"]
    assert r["kills"] >= KILLS["train"] and r["identical_finals"] == r["cycles"] >= 1
    assert r["steps"] == 12


@pytest.mark.parametrize("stage", ["prepare", "precompute"])
def test_second_writer_stops_with_a_clear_error(harness, stage):
    c = harness["concurrency"][stage]
    assert c["second_exit"] == 2 and c["second_wrote_nothing"]
    assert "is being written by another process" in c["second_error"] and f"pid {c['holder_pid']} " in c["second_error"]
    assert c["first_exit"] == 0 and c["first_identical"]


def test_crash_before_the_first_checkpoint_logs_each_step_once(run_copy, monkeypatch):
    """Found by the harness: a run killed after logging step 1 but before its first checkpoint must not leave that
    line behind for the rerun to log again."""
    import json

    from kdcache.stages import train

    real, calls = train._train_step, []

    def crash_on_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "_train_step", crash_on_second_step)
    with pytest.raises(KeyboardInterrupt):
        train.run(run_copy)
    assert not (run_copy.student_dir / "checkpoints").exists() or not train.latest_checkpoint(
        run_copy.student_dir / "checkpoints")
    monkeypatch.undo()
    train.run(run_copy)
    steps = [json.loads(l)["step"] for l in (run_copy.student_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
