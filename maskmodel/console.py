"""What a person sees while a job runs: Ray started quietly, a progress display, and nothing else.

Ray, Ray Data and Ray Train log at INFO to the console by default: every
dataset's execution plan, every checkpoint, whole ``TrainingReport(...)``
dicts. The lines a person needs (one per epoch, a progress bar, the final
summary) drown in them. :func:`init_ray` starts or joins Ray so that those
internal INFO logs go only to Ray's log files (``/tmp/ray/session_*/logs``,
``ray-data.log``, ``train/``), in the driver and in every worker process;
warnings and errors still reach the console. ``--verbose`` on any job (or
``MASKMODEL_LOG_LEVEL=DEBUG``) brings everything back.

:class:`Progress` is the scoring job's display: a live line in a terminal,
one log line every few seconds otherwise (``ray job submit`` logs, CI).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, TextIO

log = logging.getLogger(__name__)

LOG_LEVEL_ENV = "MASKMODEL_LOG_LEVEL"
PROGRESS_SECONDS_ENV = "MASKMODEL_PROGRESS_SECONDS"
# Ray Data reads its logging config from this file on every (re)configuration, in every process.
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
RAY_DATA_LOGGING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")
WORKER_SETUP_HOOK = "maskmodel.console.setup_worker"
# Lines Ray prints at a level its own settings cannot lower, each also in Ray's log files:
_NOISE = (
    # The C++ core worker, at ERROR, about Ray's own actors (Ray Data's map workers, Ray Train's
    # preemption watcher), which Ray creates with constructor arguments in the object store on
    # purpose: a statement about restart semantics, nothing a user can act on.
    b"has constructor arguments in the object store and max_restarts > 0",
    # Ray Train's report bookkeeping logs whole TrainingReport(...) dicts at INFO through a logger
    # named after its file, which Ray Train's own log level does not reach.
    b"Reporting training result ",
)


def verbose() -> bool:
    """Whether the user asked for everything (``--verbose`` or ``MASKMODEL_LOG_LEVEL=DEBUG``)."""
    return os.environ.get(LOG_LEVEL_ENV, "INFO").upper() == "DEBUG"


def quiet_ray_logging() -> None:
    """In this process: Ray's own INFO logs to its files only, warnings still on the console.

    Safe to call before or after ``import ray``; when :func:`verbose`, it only
    undoes what a quiet parent process passed on in the environment.
    """
    if verbose():
        if os.environ.get(RAY_DATA_LOGGING_ENV) == RAY_DATA_LOGGING_FILE:
            del os.environ[RAY_DATA_LOGGING_ENV]
        return
    os.environ.setdefault(RAY_DATA_LOGGING_ENV, RAY_DATA_LOGGING_FILE)
    if "ray.data" in sys.modules:  # already configured from the default: apply ours now
        from ray.data._internal.logging import configure_logging

        configure_logging()
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    # maskmodel shows its own progress and turns Ray Data's bars off; Ray Data warns about that, once per process.
    logging.getLogger("ray.data._internal.progress").addFilter(_hide_bars_notice)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in captured worker lines

    # Raised inside Ray's own actors about Ray's own calls (e.g. Ray Train's DataConfig).
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    # Driver side: "Started a local Ray instance", usage-stats notices and the like are INFO.
    for handler in logging.getLogger("ray").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def _hide_bars_notice(record: logging.LogRecord) -> bool:
    return "Progress bars disabled" not in record.getMessage()


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: runs in every worker process of the job before any task."""
    quiet_ray_logging()


def train_logging_config():
    """Ray Train's own console level: WARNING unless verbose (its system log files keep everything)."""
    import ray.train

    return ray.train.LoggingConfig(log_level="DEBUG" if verbose() else "WARNING")


def _noise(line: str | bytes) -> bool:
    raw = line.encode("utf-8", "replace") if isinstance(line, str) else line
    return any(n in raw for n in _NOISE)


def _filtered_worker_logs(data: dict[str, Any], *, ignore_prefix: bool) -> None:
    from ray._private.worker import print_to_stdstream

    lines = [line for line in data.get("lines", []) if not _noise(line)]
    if lines:
        print_to_stdstream({**data, "lines": lines}, ignore_prefix=ignore_prefix)


class _StderrFilter:
    """Raw writes to this process's fd 2 pass a thread that drops :data:`_NOISE`; Python's ``sys.stderr`` does not.

    Ray's C++ core worker writes its ERROR-level lines straight to the driver's
    fd 2 as well as to its log file, past any Python setting. Python-level
    output (logging, tracebacks, the progress display) gets its own handle on
    the real stderr, so it keeps its order with stdout; only what is written to
    fd 2 underneath Python takes the detour. Complete lines are forwarded at
    once. :meth:`stop` (run at exit) puts the real stderr back on fd 2.
    """

    def __init__(self) -> None:
        import threading

        sys.stderr.flush()
        self.real = os.dup(2)
        sys.stderr = os.fdopen(os.dup(self.real), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                               errors="backslashreplace")
        self.read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.thread = threading.Thread(target=self._pump, name="maskmodel-stderr-filter", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
            ready, pending = pending[:cut], pending[cut:]
            out = b"".join(line for line in ready.splitlines(keepends=True) if not _noise(line))
            self._write(out)
        self._write(pending)

    def _write(self, data: bytes) -> None:
        while data:
            try:
                data = data[os.write(self.real, data):]
            except OSError:
                return

    def stop(self) -> None:
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - stderr may already be closed at exit
            pass
        os.dup2(self.real, 2)  # the pipe's last writer is gone: the thread drains it and ends
        self.thread.join(timeout=2)


_stderr_filter: _StderrFilter | None = None


def filter_stderr() -> None:
    """Drop Ray's non-actionable console lines from this process's stderr (jobs only, not libraries or tests).

    Call it before logging is configured: handlers keep the ``sys.stderr`` they were given.
    """
    global _stderr_filter
    if verbose() or _stderr_filter is not None:
        return
    import atexit

    _stderr_filter = _StderrFilter()
    atexit.register(_stderr_filter.stop)


def init_ray(**kwargs: Any) -> None:
    """``ray.init`` (joins ``RAY_ADDRESS`` when set, else starts a local Ray) with the console kept quiet.

    Every worker process of the job runs :func:`setup_worker`; the driver prints
    worker output except Ray's known non-actionable C++ notices. ``kwargs`` go
    to ``ray.init`` (a ``runtime_env`` given there is merged with ours).
    """
    import ray

    quiet_ray_logging()
    if ray.is_initialized():
        return
    if not verbose():
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        runtime_env.setdefault("worker_process_setup_hook", WORKER_SETUP_HOOK)
        kwargs["runtime_env"] = runtime_env
    ray.init(**kwargs)
    if not verbose():
        import functools

        import ray.data

        # maskmodel's own progress display replaces Ray Data's bars (and its "tqdm not installed" warning).
        ray.data.DataContext.get_current().enable_progress_bars = False

        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
            ignore = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("ray_print_logs", functools.partial(_filtered_worker_logs, ignore_prefix=ignore))


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
