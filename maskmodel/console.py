"""What a person sees while a job runs: the progress display and the one verbosity switch. No Ray.

:class:`Progress` is the scoring job's display: a live line in a terminal,
one log line every few seconds otherwise (``ray job submit`` logs, CI).
:func:`verbose` says whether the user asked for everything (``--verbose``);
:mod:`maskmodel.runtime.raysession` starts Ray with its own console output kept quiet
unless so.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)

LOG_LEVEL_ENV = "MASKMODEL_LOG_LEVEL"
PROGRESS_SECONDS_ENV = "MASKMODEL_PROGRESS_SECONDS"


def verbose() -> bool:
    """Whether the user asked for everything (``--verbose`` or ``MASKMODEL_LOG_LEVEL=DEBUG``)."""
    return os.environ.get(LOG_LEVEL_ENV, "INFO").upper() == "DEBUG"


def fmt_seconds(s: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``; ``?`` when unknown."""
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Progress of a job over ``total`` items (``None``: unknown): images done, rate, errors, ETA.

    In a terminal (``stream.isatty()``) one line is redrawn at most every
    0.25 s; otherwise a log line is written every ``every_s`` seconds
    (``MASKMODEL_PROGRESS_SECONDS``, default 10) and once at the end, so a job's
    log shows it is alive without flooding.
    """

    def __init__(self, what: str, total: int | None, *, stream: TextIO | None = None,
                 every_s: float | None = None, clock=time.monotonic) -> None:
        self.what, self.total = what, total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else float(os.environ.get(PROGRESS_SECONDS_ENV) or 10)
        self.clock = clock
        self.start = self.last = clock()
        self.done = self.errors = 0
        self._logged = -1  # ``done`` at the last log line: close() does not repeat it

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            pct = f" ({100 * self.done / self.total:.0f}%)"
            eta = fmt_seconds((self.total - self.done) / rate) if rate > 0 else "?"
            done = f"{self.done:,}/{self.total:,}{pct}"
        else:
            done, eta = f"{self.done:,}", "?"
        return f"{self.what}: {done} images | {rate:.1f} img/s | {self.errors:,} errors | ETA {eta}"

    def update(self, done: int, errors: int = 0) -> None:
        """Add ``done`` items (``errors`` of them failed) and redraw or log if it is time."""
        self.done += done
        self.errors += errors
        now = self.clock()
        if self.tty and now - self.last >= 0.25:
            # Clear, draw, return: the next write (an update or a log line) starts over it.
            self.stream.write("\033[K" + self.line() + "\r")
            self.stream.flush()
            self.last = now
        elif not self.tty and now - self.last >= self.every_s:
            log.info("%s", self.line())
            self.last, self._logged = now, self.done

    def close(self) -> None:
        """The final state: the terminal line ends with a newline; a log records it once."""
        if self.tty:
            self.stream.write("\033[K" + self.line() + "\n")
            self.stream.flush()
        elif self._logged != self.done:
            log.info("%s", self.line())
