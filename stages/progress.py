"""Progress of the long stages: a tqdm bar on a terminal, plain lines in a log.

A bar redrawn with carriage returns is unreadable in a CI log, a `make ... | tee` file or nohup.out. So when the
stream is not a terminal, progress is written as whole lines instead. Work that is over within TQDM_DELAY seconds
(default 5) writes none: its stage's own summary line is enough, and a bad-input error stays the only line. Past
that, a line every TQDM_MININTERVAL seconds (default 30) or every 10% of the work, whichever comes first, and one
at the end. Each line has done/total, the rate, the elapsed time, the ETA and the stage's own numbers (loss, lr,
TAID's t, ...):

    train (taid): 10/20 step (50%), 1.17 step/s, elapsed 00:08, ETA 00:08, loss=5.277, lr=2.0e-03, t=0.6700

Stages call `progress(...)` and use the result as a tqdm bar: update(n), set_postfix(...), close();
`track(...)` wraps an iterable.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm

from kdcache.pipeline.errors import KdcacheError

LINE_DELAY = 5.0       # seconds of work before the first line in a log, unless TQDM_DELAY says otherwise
LINE_INTERVAL = 30.0   # seconds between two lines in a log, unless TQDM_MININTERVAL says otherwise
LINE_FRACTION = 0.1    # ... or this share of the total, whichever comes first


def progress(total: int, desc: str, unit: str = "it", *, initial: int = 0, unit_scale: bool = False,
             disable: bool = False, file=None):
    """A progress bar for `total` units of work (`initial` of them already done, e.g. on resume): tqdm when
    `file` (default stderr) is a terminal, LineProgress otherwise; a silent tqdm when `disable` or no work."""
    file = file if file is not None else sys.stderr
    disable = disable or total == 0
    if disable or _is_terminal(file):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, disable=disable,
                    file=file, dynamic_ncols=True)
    return LineProgress(total, desc, unit, initial=initial, unit_scale=unit_scale, file=file,
                        delay=_seconds("TQDM_DELAY", LINE_DELAY), interval=_seconds("TQDM_MININTERVAL", LINE_INTERVAL))


def track(iterable, total: int, desc: str, unit: str = "it"):
    """Yield from `iterable`, one unit of progress per item."""
    bar = progress(total, desc, unit)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise KdcacheError(f"{name}={value!r} is not a number of seconds") from None


def _is_terminal(file) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


class LineProgress:
    """The part of tqdm's interface the stages use, written as whole lines (no carriage return)."""

    def __init__(self, total: int, desc: str, unit: str, *, initial: int, unit_scale: bool, file, delay: float,
                 interval: float):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.file, self.delay, self.interval = file, delay, interval
        self.n = self.initial = self.last_n = initial
        self.postfix = ""
        self.start = self.last_time = time.monotonic()
        self.written = self.closed = False
        if delay <= 0:
            self._write()  # says the stage has started and how much it has to do

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.start < self.delay:
            return
        due = not self.written or now - self.last_time >= self.interval
        if due or self.n - self.last_n >= LINE_FRACTION * self.total or self.n >= self.total:
            self._write()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """Shown from the next line on (call it before update, as the stages do)."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.written and not self.closed and self.n != self.last_n:  # a shown bar also shows its end
            self._write()
        self.closed = True

    def _write(self) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 and self.n > self.initial else None
        remaining = 0.0 if self.n >= self.total else (self.total - self.n) / rate if rate else None
        parts = [f"{self._amount(self.n)}/{self._amount(self.total)} {self.unit}"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
                 f"{self._amount(rate, 2) if rate is not None else '?'} {self.unit}/s",
                 f"elapsed {tqdm.format_interval(elapsed)}",
                 f"ETA {tqdm.format_interval(remaining) if remaining is not None else '?'}"]
        if self.postfix:
            parts.append(self.postfix)
        self.file.write(f"{self.desc}: {', '.join(parts)}\n")
        self.file.flush()
        self.last_n, self.last_time, self.written = self.n, now, True

    def _amount(self, value: float, digits: int = 0) -> str:
        if self.unit_scale and value >= 1000:
            return tqdm.format_sizeof(value)   # 12.3k, 4.56M
        return f"{value:.{digits}f}" if digits and value < 100 else f"{value:.0f}"
