"""The shared progress helper: a tqdm bar on a terminal, whole lines (no carriage return) in a log."""
import io

import pytest

from kdcache.pipeline.errors import KdcacheError
from kdcache.stages import progress as progress_module
from kdcache.stages.progress import LineProgress, progress, track


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    """time.monotonic under the test's control."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    monkeypatch.setenv("TQDM_DELAY", "0")  # lines from the start (the delay has its own test)
    return clock


def test_a_log_gets_a_line_every_tenth_of_the_work_with_rate_eta_and_postfix(clock, monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    log = io.StringIO()
    bar = progress(100, "train (kl)", unit="step", file=log)
    assert isinstance(bar, LineProgress)
    for _ in range(100):
        clock.now += 0.5                      # 50 s in all: the 30 s interval alone would give one line
        bar.set_postfix({"loss": "2.500", "lr": "3.0e-04"}, refresh=False)
        bar.update(1)
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == 11                   # the start, then 10%, 20%, ..., 100%
    assert lines[0] == "train (kl): 0/100 step (0%), ? step/s, elapsed 00:00, ETA ?"
    assert lines[5] == "train (kl): 50/100 step (50%), 2.00 step/s, elapsed 00:25, ETA 00:25, loss=2.500, lr=3.0e-04"
    assert lines[-1].startswith("train (kl): 100/100 step (100%), 2.00 step/s, elapsed 00:50, ETA 00:00")


def test_a_slow_stage_gets_a_line_every_interval(clock, monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "5")
    log = io.StringIO()
    bar = progress(1000, "precompute teacher", unit="tok", unit_scale=True, file=log)
    for _ in range(12):
        clock.now += 2.5                      # a line every second update: 5 s apart, far below 10% each
        bar.update(4)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 + 6
    assert lines[-1] == "precompute teacher: 48/1.00k tok (5%), 1.60 tok/s, elapsed 00:30, ETA 09:55"


def test_work_done_within_the_delay_writes_nothing_and_longer_work_shows_its_end(clock, monkeypatch):
    monkeypatch.delenv("TQDM_DELAY")                                 # the default: 5 s
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    log = io.StringIO()
    quick = progress(10, "prepare: tokenising", unit="doc", file=log)
    for _ in range(10):
        clock.now += 0.4
        quick.update(1)
    quick.close()
    assert log.getvalue() == ""                                     # 4 s: the stage's own summary line is enough
    slow = progress(100, "evaluate (trained)", unit="tok", file=log)
    for _ in range(95):
        clock.now += 0.125                                          # 5 s after 40 updates
        slow.update(1)
    slow.close()                                                    # 95 of 100 done when it stops
    lines = log.getvalue().splitlines()
    assert [l.split(",")[0] for l in lines] == [f"evaluate (trained): {n}/100 tok ({n}%)"
                                                for n in (40, 50, 60, 70, 80, 90, 95)]


def test_resumed_work_counts_its_rate_from_this_run(clock):
    log = io.StringIO()
    bar = progress(10, "train (kl)", unit="step", initial=6, file=log)
    clock.now += 4
    bar.update(2)
    assert log.getvalue().splitlines()[-1].startswith("train (kl): 8/10 step (80%), 0.50 step/s, elapsed 00:04, "
                                                      "ETA 00:04")


def test_a_terminal_keeps_the_tqdm_bar():
    term = Terminal()
    bar = progress(10, "evaluate", unit="tok", file=term)
    assert not isinstance(bar, LineProgress)
    bar.update(10)
    bar.close()
    assert "\r" in term.getvalue() and "10/10" in term.getvalue()


def test_no_work_and_disabled_bars_write_nothing():
    log = io.StringIO()
    for bar in (progress(0, "prepare: writing shards", file=log), progress(5, "rank 1", disable=True, file=log)):
        bar.update(1)
        bar.close()
    assert list(track(["a", "b"], 2, "x", unit="item")) == ["a", "b"]
    assert log.getvalue() == ""


@pytest.mark.parametrize("name", ["TQDM_MININTERVAL", "TQDM_DELAY"])
def test_bad_interval_is_a_one_line_error(monkeypatch, name):
    monkeypatch.setenv(name, "soon")
    with pytest.raises(KdcacheError, match=f"{name}='soon' is not a number of seconds"):
        progress(5, "train", file=io.StringIO())
