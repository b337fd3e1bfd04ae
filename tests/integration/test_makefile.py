"""The Makefile as the stage graph (pipeline/stages.mk, included by the repository's Makefile and by a `kdcache init`
project's): `make -n` reruns exactly the stages whose inputs changed, RUN is the config's run_dir unless given,
and --overwrite is passed only when the user says OVERWRITE=1."""
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


def _make(installed: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(cwd), f"PYTHON={sys.executable}", f"STAMP={installed}", *args],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _commands(run: Path | None, installed: Path, *overrides: str, make_args: tuple[str, ...] = ()) -> list[str]:
    """The stage commands `make -n evaluate` would run, one line each."""
    args = " ".join(f"-s {o}" for o in overrides)
    out = _make(installed, "-n", "evaluate", *([f"RUN={run}"] if run else []), f"ARGS={args}", *make_args)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if "kdcache.pipeline.cli " in line]


def _plan(run: Path, installed: Path, *overrides: str) -> list[str]:
    """The stages `make -n evaluate` would run."""
    lines = "\n".join(_commands(run, installed, *overrides)) + "\n"
    return [s for s in STAGES if f"kdcache.pipeline.cli {s} " in lines]


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


def test_overwrite_is_passed_only_when_the_user_says_so(tmp_path, installed):
    run = tmp_path / "run"
    _finish_all(run)
    stale = ("prepare.seq_len=128",)                         # every stage is stale
    plain = _commands(run, installed, *stale)
    assert [line.split("kdcache.pipeline.cli ")[1].split()[0] for line in plain] == list(STAGES)
    assert not any("--overwrite" in line for line in plain)  # a changed setting never replaces work by itself
    forced = _commands(run, installed, *stale, make_args=("OVERWRITE=1",))
    writing = {"prepare", "precompute", "train"}             # evaluate rewrites its metrics, it replaces no work
    for line in forced:
        stage = line.split("kdcache.pipeline.cli ")[1].split()[0]
        assert (" --overwrite" in line) == (stage in writing), line


def test_run_folder_is_the_configs_run_dir_unless_given(tmp_path, installed):
    config = tmp_path / "my.yaml"
    config.write_text(f"run_dir: {tmp_path / 'from-yaml'}\ntrain:\n  lr: 1.0e-4\n")
    lines = _commands(None, installed, make_args=(f"CONFIG={config}",))
    assert len(lines) == len(STAGES) and all(f"--run-dir {tmp_path / 'from-yaml'} -c {config}" in l for l in lines)
    assert (tmp_path / "from-yaml" / ".stages" / "train.config").exists()       # the stamps went there too
    lines = _commands(None, installed, f"run_dir={tmp_path / 'from-args'}", make_args=(f"CONFIG={config}",))
    assert all(f"--run-dir {tmp_path / 'from-args'} " in l for l in lines)      # ARGS override the YAML
    lines = _commands(tmp_path / "given", installed, make_args=(f"CONFIG={config}",))
    assert all(f"--run-dir {tmp_path / 'given'} " in l for l in lines)          # and RUN= overrides both
    out = _make(installed, "-n", "clean", f"CONFIG={config}")
    assert f"rm -rf {tmp_path / 'from-yaml'}" in out.stdout


def test_a_config_kdcache_cannot_read_stops_make_with_kdcaches_one_line_error(tmp_path, installed):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  lr: -1\n")
    out = _make(installed, "-n", "evaluate", f"CONFIG={config}")
    assert out.returncode != 0 and "kdcache.pipeline.cli" not in out.stdout
    first, second = out.stderr.strip().splitlines()
    assert first == "kdcache: error: invalid config: train.lr must be > 0, got -1.0"
    assert "could not read the run folder from the config: the line above says why" in second


def test_goals_that_need_no_run_folder_never_ask_kdcache(tmp_path, installed):
    """install, test, help, ...: they run before kdcache is installed, so make must not need it to read the
    Makefile (here: a PYTHON without kdcache)."""
    out = subprocess.run(["make", "-C", str(REPO), "-n", "help", "test", "PYTHON=/bin/false", f"STAMP={installed}"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "/bin/false -m pytest -q tests" in out.stdout and "error" not in out.stderr


def test_clean_never_deletes_the_folder_make_runs_in(tmp_path, installed):
    keep = tmp_path / "keep.txt"
    keep.write_text("x")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pipeline").mkdir()
    shutil.copy(REPO / "pipeline" / "stages.mk", tmp_path / "pipeline" / "stages.mk")
    for run in (".", str(tmp_path), str(tmp_path.parent)):
        out = _make(installed, "clean", f"RUN={run}", cwd=tmp_path)
        assert out.returncode != 0 and "not deleting it" in out.stderr, out.stderr
        assert keep.exists()
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert _make(installed, "clean", "RUN=runs/x", cwd=tmp_path).returncode == 0
    assert not (tmp_path / "runs" / "x").exists() and keep.exists()


def test_a_kdcache_init_project_runs_the_installed_stage_graph(tmp_path):
    """`kdcache init`'s Makefile, in a folder with no repository: the same plan, in the config's run_dir, by the
    Python that ran init; no kdcache for its PYTHON is one line from make."""
    from kdcache.pipeline.cli import main

    assert main(["init", str(tmp_path / "proj")]) == 0
    project = tmp_path / "proj"
    config = project / "kdcache.yaml"
    config.write_text(config.read_text().replace("\nrun_dir: runs/default\n", "\nrun_dir: runs/mine\n"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def make(*args):
        return subprocess.run(["make", "-C", str(project), *args], capture_output=True, text=True, env=env)

    out = make("-n", "evaluate")
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if "kdcache.pipeline.cli " in l]
    assert [l.split("kdcache.pipeline.cli ")[1].split()[0] for l in lines] == list(STAGES)
    assert all(l.startswith(f"{sys.executable} -m kdcache.pipeline.cli ") and "--run-dir runs/mine -c kdcache.yaml"
               in l for l in lines)
    assert (project / "runs" / "mine" / ".stages" / "train.config").exists()
    assert "evaluate" in make("help").stdout
    missing = make("-n", "evaluate", "PYTHON=/bin/false")
    assert missing.returncode != 0
    assert "kdcache is not installed for PYTHON=/bin/false: pip install it there" in missing.stderr
