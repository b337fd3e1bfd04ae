"""Counts for the README's Reliability section: kills survived, corruptions detected, bad inputs tried.

Tests add to them through the `tally` fixture; at the end of the session they are written to
<pytest basetemp>/reliability-counts.json and printed as one summary line.
"""
from __future__ import annotations

import json

import pytest

COUNTS: dict[str, int] = {}
DETAILS: dict = {}  # e.g. the kill harness's full result, written next to the counts
WRITTEN: list[str] = []


@pytest.fixture(scope="session")
def tally(tmp_path_factory):
    def add(key: str, n: int = 1) -> None:
        COUNTS[key] = COUNTS.get(key, 0) + n

    yield add
    path = tmp_path_factory.getbasetemp() / "reliability-counts.json"
    path.write_text(json.dumps({"counts": COUNTS, **DETAILS}, indent=1, sort_keys=True))
    WRITTEN.append(str(path))


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        summary = ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
        terminalreporter.write_line(f"reliability: {summary} ({WRITTEN[0] if WRITTEN else 'not written'})")


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, tiny_teacher):
    """A run folder with a token store and the teacher's signal store (read-only: copy it with `run_copy`)."""
    from kdcache.pipeline.config import load_config
    from kdcache.stages import precompute, prepare

    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    cfg = load_config(None, overrides(run_dir, tiny_teacher))
    prepare.run(cfg)
    precompute.run(cfg)
    return run_dir


@pytest.fixture
def run_copy(tmp_path, base_run, tiny_teacher):
    """A writable copy of base_run and its config."""
    import shutil

    from kdcache.pipeline.config import load_config

    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    return load_config(None, overrides(run_dir, tiny_teacher))


ONE_THREAD = {"precompute.threads_per_worker": 1}  # spinning OpenMP threads make tiny matmuls crawl on a busy machine


def overrides(run_dir, teacher, **extra) -> list[str]:
    from tests.conftest import tiny_overrides

    return tiny_overrides(run_dir, teacher, **{**ONE_THREAD, **extra})


def cli_args(cfg_or_run, teacher, *command, **extra) -> list[str]:
    """`kdcache COMMAND` arguments for the tiny run at a run folder."""
    run_dir = getattr(cfg_or_run, "run_dir", cfg_or_run)
    return list(command) + [a for o in overrides(run_dir, teacher, **extra) for a in ("-s", o)]


def one_error_line(err: str) -> str:
    """The CLI's stderr must be exactly one line, `kdcache: error: ...`, and no traceback."""
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdcache: error: "), err
    assert "Traceback" not in err
    return lines[0]


def instruction_lines(n: int, words: int = 5) -> str:
    """n instruction records (dolly fields) as JSON lines, made here so the tests need no shared data file."""
    return "".join(json.dumps({"instruction": f"Repeat the number {i} a few times.", "context": "",
                               "response": " ".join([str(i)] * (words + i % 7)), "category": "x"}) + "\n"
                   for i in range(n))
