"""The Makefile as the stage graph: `make -n` reruns exactly the stages whose inputs changed."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdcache.pipeline.config import load_config
from kdcache.pipeline.freshness import mark_done, stage_inputs, write_stamps

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")]

REPO = Path(__file__).resolve().parents[2]
STAGES = ("prepare", "precompute", "train", "evaluate")


def _plan(run: Path, installed: Path, *overrides: str) -> list[str]:
    """The stages `make -n evaluate` would run."""
    args = " ".join(f"-s {o}" for o in overrides)
    out = subprocess.run(["make", "-n", "-C", str(REPO), "evaluate", f"RUN={run}", f"PYTHON={sys.executable}",
                          f"STAMP={installed}", f"ARGS={args}"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    return [s for s in STAGES if f"kdcache.pipeline.cli {s} " in out.stdout]


def _finish_all(run: Path, *overrides: str) -> None:
    """As if every stage had run with this config: stamps first, then the .done markers, later."""
    cfg = load_config(None, [f"run_dir={run}", *overrides])
    write_stamps(cfg)
    now = time.time()
    for stage in STAGES:  # in the past, so a stamp rewritten by the next `make` is newer than its .done
        os.utime(run / ".stages" / f"{stage}.config", (now - 20, now - 20))
        os.utime(mark_done(cfg, stage), (now - 10, now - 10))


@pytest.fixture
def installed(tmp_path) -> Path:
    stamp = tmp_path / "installed"
    stamp.touch()
    return stamp


def test_make_reruns_exactly_the_stale_stages(tmp_path, installed):
    run = tmp_path / "run"
    assert _plan(run, installed) == list(STAGES)            # nothing done yet: everything runs
    _finish_all(run)
    assert _plan(run, installed) == []                      # all done, same config: nothing runs
    assert _plan(run, installed, "train.lr=1e-4") == ["train", "evaluate"]
    _finish_all(run)
    assert _plan(run, installed, "precompute.k=8") == ["precompute", "train", "evaluate"]
    _finish_all(run)
    assert _plan(run, installed, "precompute.samples=24") == ["precompute", "train", "evaluate"]  # N of the default
    _finish_all(run)
    assert _plan(run, installed, "prepare.seq_len=128") == list(STAGES)
    _finish_all(run)
    assert _plan(run, installed, "precompute.workers=2") == []  # how a stage runs is not what it produces
    (run / ".stages" / "train.done").unlink()               # a killed train leaves no .done
    assert _plan(run, installed, "precompute.workers=2") == ["train", "evaluate"]


def test_stage_inputs_follow_the_teacher_into_prepare():
    cfg = load_config(None, ["precompute.teacher=/models/a"])
    other = load_config(None, ["precompute.teacher=/models/b"])
    assert stage_inputs(cfg)["prepare"] != stage_inputs(other)["prepare"]   # its tokenizer made the tokens
    assert "scheduler" not in stage_inputs(cfg)["precompute"]
