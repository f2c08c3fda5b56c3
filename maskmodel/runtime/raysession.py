"""Ray started or joined for a job with its console kept quiet: Ray's INFO logs go to its files, not the terminal.

Ray, Ray Data and Ray Train log at INFO to the console by default: every
dataset's execution plan, every checkpoint, whole ``TrainingReport(...)``
dicts. The lines a person needs (one per epoch, a progress bar, the final
summary) drown in them. :func:`init_ray` starts or joins Ray so that those
internal INFO logs go only to Ray's log files (``/tmp/ray/session_*/logs``,
``ray-data.log``, ``train/``), in the driver and in every worker process;
warnings and errors still reach the console. ``--verbose`` on any job (or
``MASKMODEL_LOG_LEVEL=DEBUG``, :func:`maskmodel.console.verbose`) brings
everything back. What needs Ray's private API is in :mod:`maskmodel.runtime.rayshim`.
Ray is imported lazily: importing this module does not import Ray.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from maskmodel.runtime import rayshim, timeline
from maskmodel.console import verbose

log = logging.getLogger(__name__)

# Ray Data reads its logging config from this file on every (re)configuration, in every process.
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # the instance a process (and Ray's state API in it) talks to
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # "token" once Ray has turned token auth on (its default for a new local instance)
# Ray 2.60 turns token auth on for every new local instance and says so in a WARNING on every run; init_ray
# says it in one line of its own when it matters (a dashboard to open needs the token).
_RAY_LOG_NOISE = ("Token authentication is enabled for this Ray cluster",)
WORKER_SETUP_HOOK = "maskmodel.runtime.raysession.setup_worker"
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


def quiet_ray_logging() -> None:
    """In this process: Ray's own INFO logs to its files only, warnings still on the console.

    Safe to call before or after ``import ray``; when :func:`verbose`, it only
    undoes what a quiet parent process passed on in the environment.
    """
    ours = rayshim.ray_data_logging_file("WARNING")
    if verbose():
        if os.environ.get(RAY_DATA_LOGGING_ENV) == ours:
            del os.environ[RAY_DATA_LOGGING_ENV]
        return
    os.environ.setdefault(RAY_DATA_LOGGING_ENV, ours)
    if "ray.data" in sys.modules:  # already configured from the default: apply ours now
        rayshim.reconfigure_ray_data_logging()
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    # maskmodel shows its own progress and turns Ray Data's bars off; Ray Data warns about that, once per process.
    logging.getLogger(rayshim.DATA_PROGRESS_LOGGER).addFilter(_hide_bars_notice)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in captured worker lines

    # Raised inside Ray's own actors about Ray's own calls (e.g. Ray Train's DataConfig).
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    # Driver side: "Started a local Ray instance", usage-stats notices and the like are INFO.
    for handler in logging.getLogger("ray").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            if _ray_log_kept not in handler.filters:
                handler.addFilter(_ray_log_kept)


def _ray_log_kept(record: logging.LogRecord) -> bool:
    return not any(n in record.getMessage() for n in _RAY_LOG_NOISE)


def _hide_bars_notice(record: logging.LogRecord) -> bool:
    return "Progress bars disabled" not in record.getMessage()


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: runs in every worker process of the job before any task.

    Also names the job's own Ray instance in ``RAY_ADDRESS``: Ray's state API (Ray Train's placement
    group cleaner asks it whether the controller lives) otherwise looks for "the" local instance, and
    with another one on the machine fails with a traceback (``Found multiple active Ray instances``).
    """
    quiet_ray_logging()
    if not os.environ.get(RAY_ADDRESS_ENV):
        import ray

        os.environ[RAY_ADDRESS_ENV] = ray.get_runtime_context().gcs_address


def train_logging_config():
    """Ray Train's own console level: WARNING unless verbose (its system log files keep everything)."""
    import ray.train

    return ray.train.LoggingConfig(log_level="DEBUG" if verbose() else "WARNING")


def _noise(line: str | bytes) -> bool:
    raw = line.encode("utf-8", "replace") if isinstance(line, str) else line
    return any(n in raw for n in _NOISE)


def _kept(line: str | bytes) -> bool:
    return not _noise(line)


_stderr_filter: rayshim.StderrFilter | None = None


def filter_stderr() -> None:
    """Drop Ray's non-actionable console lines from this process's stderr (jobs only, not libraries or tests).

    Call it before logging is configured: handlers keep the ``sys.stderr`` they were given.
    """
    global _stderr_filter
    if verbose() or _stderr_filter is not None:
        return
    import atexit

    _stderr_filter = rayshim.StderrFilter(_noise)
    atexit.register(_stderr_filter.stop)


_started_here = False
_own_address: str | None = None


def shutdown_ray() -> None:
    """Stop the local Ray instance :func:`init_ray` started in this process, if it did (a joined cluster is left up).

    Called by a job that has finished its work: Ray's own exit hook would do the same, after a fixed 0.5 s
    wait for late worker log lines; here the work is committed and its lines printed (2.1 s at exit against
    1.45 s here on 2 cores, benchmarks/README.md).
    """
    global _started_here
    if _started_here:
        import ray

        ray.shutdown()
        _started_here = False
        if _own_address is not None and os.environ.get(RAY_ADDRESS_ENV) == _own_address:
            del os.environ[RAY_ADDRESS_ENV]  # a later ray.init in this process starts afresh, as before
        timeline.mark("ray stopped")


def init_ray(*, env_is_enough: bool = False, local: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """``ray.init`` (joins ``RAY_ADDRESS`` when set, else starts a local Ray) with the console kept quiet.

    Every worker process of the job runs :func:`setup_worker`; the driver prints
    worker output except Ray's known non-actionable C++ notices. ``kwargs`` go
    to ``ray.init`` (a ``runtime_env`` given there is merged with ours).

    ``env_is_enough``: the job's workers need only the environment variables
    :func:`quiet_ray_logging` sets (not its in-process warning filters), so when
    this process starts a local Ray, whose workers inherit the driver's
    environment, no setup hook is set. A job ``runtime_env`` (the hook is one)
    keeps Ray from handing the job the worker processes it prestarts in
    ``ray.init``, which are started before any job's runtime env is known: every
    task and actor then waits for a fresh process, about 3 s of a short scoring
    run on 2 cores (benchmarks/README.md, "The actor's start, split"). Joined
    clusters keep the hook: their workers never saw this environment.

    ``local``: more ``ray.init`` arguments for a Ray instance this process
    starts only (``include_dashboard``, ``num_cpus`` and the like, which
    joining a cluster ignores or refuses).
    """
    import ray

    quiet_ray_logging()
    if ray.is_initialized():
        return
    starts = "address" not in kwargs and rayshim.will_start_local_ray()
    if starts and local:
        kwargs.update(local)
    if not verbose() and not (env_is_enough and starts and "runtime_env" not in kwargs):
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        runtime_env.setdefault("worker_process_setup_hook", WORKER_SETUP_HOOK)
        kwargs["runtime_env"] = runtime_env
    context = ray.init(**kwargs)
    global _started_here, _own_address
    _started_here = rayshim.started_local_ray()
    if _started_here:
        # The job joins the instance it started, by its address, never another local one: this process's
        # own later calls and the processes it starts; the job's Ray workers get it from setup_worker.
        _own_address = ray.get_runtime_context().gcs_address
        os.environ[RAY_ADDRESS_ENV] = _own_address
        if getattr(context, "dashboard_url", None) and os.environ.get(AUTH_MODE_ENV, "").lower() == "token":
            log.info("Ray dashboard at http://%s: token auth is on (`ray get-auth-token` prints the token; "
                     "RAY_AUTH_MODE=disabled opts out)", context.dashboard_url)
    if not verbose():
        import ray.data

        # maskmodel's own progress display replaces Ray Data's bars (and its "tqdm not installed" warning).
        ray.data.DataContext.get_current().enable_progress_bars = False
        rayshim.filter_worker_lines(_kept)

