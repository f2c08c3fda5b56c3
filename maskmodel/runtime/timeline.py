"""Wall-clock marks of a job's start-up, from every process of the job, for finding where fixed cost goes.

With ``MASKMODEL_TIMELINE=<local file>`` set, :func:`mark` appends one JSON line
``{"t": <unix seconds>, "event": <name>, "pid": <pid>, "proc": <role>}`` to that
file, from the driver and from every Ray worker process (a local Ray instance
passes the driver's environment on to its workers). Unset, :func:`mark` costs one
dict lookup. :func:`read` and :func:`format_timeline` turn the file into the
table ``benchmarks/peers.py`` prints. Nothing in the product reads the file.
"""

from __future__ import annotations

import json
import os
import time

TIMELINE_ENV = "MASKMODEL_TIMELINE"


def process_start() -> float:
    """Unix time (s) at which this process started, from ``/proc`` (``time.time()`` where there is none)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()


_started_marked = False


def mark(event: str, proc: str = "driver", *, at: float | None = None) -> None:
    """Record ``event`` (a short name) of this process (``proc``: its role) now, or at unix time ``at``.

    A process's first mark is preceded by its ``process start`` (:func:`process_start`), so every process on
    the timeline shows when it was spawned as well as when it got to work.
    """
    global _started_marked
    path = os.environ.get(TIMELINE_ENV)
    if not path:
        return
    lines = []
    if not _started_marked:
        _started_marked = True
        lines.append({"t": process_start(), "event": "process start", "pid": os.getpid(), "proc": proc})
    lines.append({"t": time.time() if at is None else at, "event": event, "pid": os.getpid(), "proc": proc})
    _append(path, "".join(json.dumps(line) + "\n" for line in lines))


def _append(path: str, text: str) -> None:
    # One write in append mode: lines from several processes do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read(path: str) -> list[dict]:
    """The marks in ``path``, oldest first (``[]`` if the file does not exist)."""
    try:
        with open(path) as f:
            marks = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    return sorted(marks, key=lambda m: m["t"])


def format_timeline(marks: list[dict], t0: float) -> list[str]:
    """One line per mark: seconds since ``t0`` (unix s), the process role and pid, the event."""
    return [f"{m['t'] - t0:7.2f} s  {m['proc']:<9} {m['pid']:>7}  {m['event']}" for m in marks]
