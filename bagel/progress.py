"""Progress that reads well both in a terminal and in a log file.

In a terminal, a tqdm bar. When stderr is not a terminal (`make demo > log 2>&1`, a job
scheduler, CI), a bar would redraw itself with carriage returns into one endless line, so the
same calls (`track`) print one plain line every `BAGEL_PROGRESS_EVERY` seconds (default 30) and one when
the work ends:

    [train] 1200/2500 step (48%)  3.7 step/s  elapsed 5m24s  eta 5m51s  ce=0.412 mse=0.0311

The mode is chosen once per process: `auto` (default: bar on a terminal, lines otherwise),
`bar`, `lines` or `off`; set it with `set_mode` (the CLIs' `--progress` / `--quiet`) or the
`BAGEL_PROGRESS` environment variable.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

MODES = ("auto", "bar", "lines", "off")
_mode = "auto"


def set_mode(mode: str) -> None:
    """Set the process-wide progress mode (one of MODES)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
    _mode = mode


def current_mode() -> str:
    """The mode in force: `set_mode`'s choice, else BAGEL_PROGRESS, resolved against the terminal."""
    mode = _mode if _mode != "auto" else os.environ.get("BAGEL_PROGRESS", "auto")
    if mode not in MODES:
        raise ValueError(f"BAGEL_PROGRESS={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "lines"
    return mode


def line_interval() -> float:
    """Seconds between plain progress lines (BAGEL_PROGRESS_EVERY, default 30)."""
    text = os.environ.get("BAGEL_PROGRESS_EVERY", "30")
    try:
        every = float(text)
    except ValueError:
        raise ValueError(f"BAGEL_PROGRESS_EVERY={text!r}: expected seconds, e.g. 30") from None
    if not every >= 0:
        raise ValueError(f"BAGEL_PROGRESS_EVERY={text!r}: expected seconds >= 0")
    return every


def track(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, enabled: bool = True):
    """A progress tracker with tqdm's core interface (iterate, update, set_postfix, close, `n`),
    drawn as the current mode says; `enabled=False` tracks silently."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    mode = current_mode() if enabled else "off"
    if mode == "bar":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, quiet=mode == "off")


def format_duration(seconds: float) -> str:
    """1h02m, 5m24s, 12.3s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


class LineProgress:
    """Plain progress lines to stderr: at most one per `line_interval()` seconds, and one at close."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, quiet: bool = False, every: float | None = None, stream=None):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start_n = initial
        self.quiet = quiet
        self.every = line_interval() if every is None else every
        self.stream = stream
        self.postfix = ""
        self.start = self.last_print = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        finished = self.total is not None and self.n >= self.total  # close() prints that line
        if now - self.last_print >= self.every and not finished:
            self.last_print = now
            self._print(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def refresh(self) -> None:
        """Kept for tqdm's interface; lines are printed on their own clock."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._print(time.perf_counter(), done=True)

    def line(self, now: float, done: bool = False) -> str:
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} {self.unit} ({self.n / self.total:.0%})" if self.total else f"{self.n} {self.unit}"
        parts = [f"[{self.desc}] {count}" if self.desc else count]
        if rate >= 1:
            parts.append(f"{rate:,.0f} {self.unit}/s" if rate >= 100 else f"{rate:.2f} {self.unit}/s")
        elif rate > 0:
            parts.append(f"{1 / rate:.2f} s/{self.unit}")
        parts.append(f"{'took' if done else 'elapsed'} {format_duration(elapsed)}")
        if not done and self.total and rate > 0:
            parts.append(f"eta {format_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return "  ".join(parts)

    def _print(self, now: float, done: bool = False) -> None:
        if self.quiet:
            return
        stream = self.stream or sys.stderr
        print(self.line(now, done), file=stream, flush=True)
