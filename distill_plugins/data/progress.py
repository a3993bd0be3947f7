"""A minimal progress line on stderr for long data work (corpus build, tokenizing).

On a terminal the line is redrawn in place (``\\r``) at most every half second;
when stderr is a file or pipe (CI logs, SLURM output) a full line is written
at most every ``log_interval`` seconds and once at the end, so logs stay short.
Disabled instances do nothing, which lets callers pass ``enabled=(rank == 0)``.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Optional


class Progress:
    """Counts work items and shows ``desc: done/total unit (pct%, rate/s, eta)``.

    Usage::

        with Progress("tokenizing", total=len(docs), unit="docs") as bar:
            for doc in docs:
                ...
                bar.update()
    """

    def __init__(self, desc: str, total: Optional[int] = None, *, unit: str = "items", enabled: bool = True,
                 stream: Optional[IO[str]] = None, log_interval: float = 10.0):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.5 if self.tty else log_interval
        self.count = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = -1  # count at the last draw

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Add ``n`` finished items; redraw if the interval has passed."""
        self.count += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(final=False)

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.count / elapsed
        if self.total:
            pct = 100.0 * self.count / self.total
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            eta_s = f", eta {eta:.0f}s" if eta != float("inf") else ""
            return f"{self.desc}: {self.count}/{self.total} {self.unit} ({pct:.0f}%, {rate:.0f}/s{eta_s})"
        return f"{self.desc}: {self.count} {self.unit} ({rate:.0f}/s, {elapsed:.0f}s)"

    def _draw(self, final: bool) -> None:
        if final and not self.tty and self._drawn == self.count:
            return  # the last line already says it
        self._drawn = self.count
        if self.tty:
            self.stream.write("\r\x1b[2K" + self._line() + ("\n" if final else ""))
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final line (once)."""
        if self.enabled and self._last != -1.0:
            self._draw(final=True)
        self._last = -1.0
        self.enabled = False
