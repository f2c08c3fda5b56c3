"""Every use of Ray's private API, behind one door; nothing else in maskmodel may name a private Ray module.

Ray's private modules (``ray._private``, ``ray.data._internal`` and the like)
change without notice between releases; each use here is one small function
whose comment says what public API is missing and which Ray version it was
checked on. The dotted names this module resolves are listed in
:data:`PRIVATE_NAMES`; ``tests/runtime/test_rayshim.py`` resolves every one of them
against the installed Ray and fails when one is gone, so an upgrade shows
exactly what broke instead of degrading quietly. At run time a missing name
is logged once as a warning and the job carries on with the public behaviour.

Also here, because it exists only to work around Ray: :class:`StderrFilter`,
which takes over this process's file descriptor 2 to drop Ray's C++ notices.
All functions import Ray lazily; importing this module does not import Ray.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import sys
import tempfile
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

#: The Ray release the names below were checked on (pyproject pins ``ray>=2.60,<2.61``).
CHECKED_ON = "2.60"

# ``GlobalState.get_max_resources_from_cluster_config``: the node groups an autoscaler publishes to
# the GCS (max nodes x resources per node). Ray Train and Ray Data read the same record to tell an
# autoscaling cluster from a fixed one; there is no public call for it (``ray.autoscaler.sdk`` can
# request resources but not read the limits). Checked on Ray 2.60.
AUTOSCALER_LIMITS = "ray._private.state.state.get_max_resources_from_cluster_config"
# ``ray._private.worker._global_node``: the node this process started, if any. ``ray.init`` returns
# no public record of whether it started a local instance or joined one (it also joins a cluster
# started with ``ray start`` on this machine without RAY_ADDRESS). Checked on Ray 2.60.
GLOBAL_NODE = "ray._private.worker._global_node"
# ``ray._private.services.canonicalize_bootstrap_address(None)``: the cluster a plain ``ray.init()`` would
# join (RAY_ADDRESS, else a ``ray start`` cluster on this machine), ``None`` when it would start its own.
# ``ray.init`` decides this internally and exposes no way to ask before calling it. Checked on Ray 2.60.
BOOTSTRAP_ADDRESS = "ray._private.services.canonicalize_bootstrap_address"
# The driver's dispatcher of worker stdout/stderr lines and Ray's own printer: the only public knob
# is ``ray.init(log_to_driver=False)``, which drops every worker line, not just Ray's noise.
# Checked on Ray 2.60.
STDSTREAM_DISPATCHER = "ray._private.worker.global_worker_stdstream_dispatcher"
PRINT_TO_STDSTREAM = "ray._private.worker.print_to_stdstream"
SHOULD_IGNORE_PREFIX = "ray._private.worker._should_ignore_worker_log_prefix"
GLOBAL_WORKER = "ray._private.worker.global_worker"
# Ray Data's logging: its config is read from the file named by RAY_DATA_LOGGING_CONFIG (public),
# but the classes of Ray's own config (a file in the Ray session's log folder, a console handler
# that hides records marked hidden), and the call that re-applies the config once ``ray.data`` is
# imported, are private; no public API sets Ray Data's console level. The config below is Ray
# Data's default (ray/data/_internal/logging.py) with the console at WARNING. Checked on Ray 2.60.
DATA_HIDDEN_FILTER = "ray.data._internal.logging.HiddenRecordFilter"
DATA_SESSION_FILE_HANDLER = "ray.data._internal.logging.SessionFileHandler"
PLAIN_RAY_HANDLER = "ray._private.log.PlainRayHandler"
DATA_CONFIGURE_LOGGING = "ray.data._internal.logging.configure_logging"
# The logger that says "Progress bars disabled" once per process when maskmodel turns Ray Data's
# bars off (``DataContext.enable_progress_bars``, public); its name is Ray Data's module path.
# Checked on Ray 2.60.
DATA_PROGRESS_LOGGER = "ray.data._internal.progress"

#: Every private dotted name this module resolves (modules, attributes); each must exist on :data:`CHECKED_ON`.
PRIVATE_NAMES = (AUTOSCALER_LIMITS, GLOBAL_NODE, BOOTSTRAP_ADDRESS, STDSTREAM_DISPATCHER, PRINT_TO_STDSTREAM,
                 SHOULD_IGNORE_PREFIX, GLOBAL_WORKER, DATA_HIDDEN_FILTER, DATA_SESSION_FILE_HANDLER, PLAIN_RAY_HANDLER,
                 DATA_CONFIGURE_LOGGING, DATA_PROGRESS_LOGGER)
#: Logger names among :data:`PRIVATE_NAMES`: resolved as modules (the logger is named after one).
LOGGER_NAMES = (DATA_PROGRESS_LOGGER,)


class PrivateNameGone(RuntimeError):
    """A private Ray name this module relies on is missing from the installed Ray."""


def resolve(dotted: str) -> Any:
    """The object a dotted name denotes: the longest importable module prefix, then attributes.

    Raises :class:`PrivateNameGone` naming the part that is missing.
    """
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for i, attr in enumerate(parts[cut:], start=cut):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise PrivateNameGone(f"{'.'.join(parts[:i + 1])} is gone from Ray {_ray_version()} "
                                      f"(maskmodel.runtime.rayshim was checked on Ray {CHECKED_ON})") from None
        return obj
    raise PrivateNameGone(f"{dotted}: no module of it imports (Ray {_ray_version()})")


def _ray_version() -> str:
    try:
        import ray

        return ray.__version__
    except ImportError:
        return "not installed"


@functools.lru_cache(maxsize=None)
def _warn_gone(what: str, error: str) -> None:
    log.warning("%s; %s", error, what)


def _resolve_or_warn(dotted: str, consequence: str) -> Any | None:
    try:
        return resolve(dotted)
    except PrivateNameGone as e:
        _warn_gone(consequence, str(e))
        return None


# ----------------------------------------------------------------------------- cluster

def autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may bring up; ``None``: no limits published.

    ``None`` too (with a warning) when the private record is gone from this Ray:
    the caller then treats the cluster as fixed.
    """
    get = _resolve_or_warn(AUTOSCALER_LIMITS, "treating the Ray cluster as one that cannot grow")
    if get is None:
        return None
    try:
        return get()
    except Exception:  # noqa: BLE001 - e.g. no GCS connection: cannot tell, so behave as a fixed cluster
        log.debug("reading the autoscaler's limits failed", exc_info=True)
        return None


def started_local_ray() -> bool:
    """Whether ``ray.init`` in this process started its own Ray instance (rather than joining one)."""
    import ray  # noqa: F401 - the worker module is initialised by importing ray

    node = _resolve_or_warn(GLOBAL_NODE, "assuming this process joined a cluster")
    return bool(getattr(node, "head", False))


def will_start_local_ray() -> bool:
    """Whether a plain ``ray.init()`` in this process would start its own Ray instance rather than join one.

    It joins ``RAY_ADDRESS`` when set, else a cluster started with ``ray start``
    on this machine. ``False`` (join assumed) when that cannot be told.
    """
    if os.environ.get("RAY_ADDRESS"):
        return False
    import ray  # noqa: F401 - the private module below is importable once ray is

    find = _resolve_or_warn(BOOTSTRAP_ADDRESS, "assuming ray.init joins a cluster")
    if find is None:
        return False
    try:
        return find(None) is None
    except Exception:  # noqa: BLE001 - e.g. several local clusters: ray.init will say so itself
        log.debug("finding the Ray cluster to join failed", exc_info=True)
        return False


# ----------------------------------------------------------------------------- console

def filter_worker_lines(keep: Callable[[str | bytes], bool]) -> bool:
    """In the driver: print worker output lines only where ``keep(line)``; ``False`` if Ray's printer was not found.

    Replaces the handler ``ray.init`` registers (``ray_print_logs``) by the
    same printer over the kept lines. Call after ``ray.init``.
    """
    dispatcher = _resolve_or_warn(STDSTREAM_DISPATCHER, "worker lines are printed unfiltered")
    printer = _resolve_or_warn(PRINT_TO_STDSTREAM, "worker lines are printed unfiltered")
    should_ignore = _resolve_or_warn(SHOULD_IGNORE_PREFIX, "worker lines are printed unfiltered")
    worker = _resolve_or_warn(GLOBAL_WORKER, "worker lines are printed unfiltered")
    if None in (dispatcher, printer, should_ignore, worker):
        return False
    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return False  # log_to_driver=False, or a Ray that names its printer differently
    ignore_prefix = should_ignore(worker)

    def print_kept(data: dict[str, Any]) -> None:
        lines = [line for line in data.get("lines", []) if keep(line)]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_kept)
    return True


def ray_data_logging_config(console_level: str = "WARNING") -> dict[str, Any]:
    """Ray Data's default logging config (Ray 2.60) with its console handler at ``console_level``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}},
        "filters": {"console_filter": {"()": DATA_HIDDEN_FILTER}},
        "handlers": {
            "file": {"class": DATA_SESSION_FILE_HANDLER, "formatter": "ray", "filename": "ray-data.log"},
            "console": {"class": PLAIN_RAY_HANDLER, "formatter": "ray", "level": console_level,
                        "filters": ["console_filter"]},
        },
        "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False}},
    }


def ray_data_logging_file(console_level: str = "WARNING") -> str:
    """The path of a file holding :func:`ray_data_logging_config`, for ``RAY_DATA_LOGGING_CONFIG``.

    Execution plans and progress summaries then go to ``ray-data.log`` only.
    The file (JSON, which is YAML too) is written once per content under the
    temp folder: the same path in every process of a node, so a worker that
    inherits the variable from the driver finds the file. Does not import Ray.
    """
    text = json.dumps(ray_data_logging_config(console_level), indent=1, sort_keys=True)
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    path = os.path.join(tempfile.gettempdir(), f"maskmodel-ray-data-logging-{os.getuid()}-{digest}.yaml")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return path


def reconfigure_ray_data_logging() -> None:
    """Re-apply Ray Data's logging config (after ``RAY_DATA_LOGGING_CONFIG`` changed once ``ray.data`` is imported)."""
    configure = _resolve_or_warn(DATA_CONFIGURE_LOGGING, "Ray Data keeps its default console level")
    if configure is not None:
        configure()


# ----------------------------------------------------------------------------- fd 2

class StderrFilter:
    """Raw writes to this process's fd 2 pass a thread that drops lines where ``drop(line)``; ``sys.stderr`` does not.

    Ray's C++ core worker writes its ERROR-level lines straight to the driver's
    fd 2 as well as to its log file, past any Python setting, and Ray has no
    public switch for single notices (``RAY_BACKEND_LOG_LEVEL`` silences all of
    them, actionable ones included). Python-level output (logging, tracebacks,
    progress) gets its own handle on the real stderr, so it keeps its order with
    stdout; only what is written to fd 2 underneath Python takes the detour.
    Complete lines are forwarded at once. :meth:`stop` puts the real stderr
    back on fd 2. Checked on Ray 2.60.
    """

    def __init__(self, drop: Callable[[bytes], bool]) -> None:
        self.drop = drop
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
            self._write(b"".join(line for line in ready.splitlines(keepends=True) if not self.drop(line)))
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
