"""The console: progress display, and Ray's non-actionable lines kept off stderr."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tempfile

import pytest

from maskmodel.console import Progress, fmt_seconds


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_terminal_redraws_one_line():
    clock, out = _Clock(), _Tty()
    p = Progress("scoring r", 1000, stream=out, clock=clock)
    clock.t += 10
    p.update(200, 3)
    clock.t += 0.1
    p.update(10)  # too soon to redraw
    clock.t += 10
    p.update(190)
    p.close()
    frames = out.getvalue().split("\r")
    assert frames[0] == "\033[Kscoring r: 200/1,000 (20%) images | 20.0 img/s | 3 errors | ETA 40s"
    assert frames[1] == "\033[Kscoring r: 400/1,000 (40%) images | 19.9 img/s | 3 errors | ETA 30s"
    assert out.getvalue().endswith("images | 19.9 img/s | 3 errors | ETA 30s\n") and len(frames) == 3


def test_progress_without_a_terminal_logs_every_few_seconds(caplog):
    clock, out = _Clock(), io.StringIO()
    p = Progress("scoring r", None, stream=out, every_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="maskmodel.console"):
        for _ in range(7):
            clock.t += 10
            p.update(50)
        p.close()
    assert out.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["scoring r: 150 images | 5.0 img/s | 0 errors | ETA ?",
                     "scoring r: 300 images | 5.0 img/s | 0 errors | ETA ?",
                     "scoring r: 350 images | 5.0 img/s | 0 errors | ETA ?"]


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (0, 42.4, 187, 7500, float("inf"))] == ["0s", "42s", "3m07s", "2h05m", "?"]


def test_stderr_filter_drops_ray_notices_and_keeps_everything_else():
    code = (
        "import os, sys, logging\n"
        "from maskmodel.runtime.raysession import filter_stderr\n"
        "filter_stderr()\n"
        "os.write(2, b'[2026 E 1 1] core_worker.cc:2465: Actor with class name: X has constructor arguments "
        "in the object store and max_restarts > 0. If the arguments...\\n')\n"
        "os.write(2, b'[2026 E 1 1] core_worker.cc:99: a real C++ error\\n')\n"
        "print('python line', file=sys.stderr)\n"
        "os.write(2, b'no newline at exit')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "constructor arguments" not in res.stderr
    assert "a real C++ error" in res.stderr and "python line" in res.stderr and "no newline at exit" in res.stderr


def test_progress_does_not_log_the_final_state_twice(caplog):
    clock, out = _Clock(), io.StringIO()
    p = Progress("scoring r", 100, stream=out, every_s=5, clock=clock)
    with caplog.at_level(logging.INFO, logger="maskmodel.console"):
        clock.t += 10
        p.update(100)  # the periodic line already shows 100/100
        p.close()
    assert [r.getMessage() for r in caplog.records] == ["scoring r: 100/100 (100%) images | 10.0 img/s | 0 errors | ETA 0s"]


_WORKERS_QUIET_BY = """
import json, os, sys
import ray
from maskmodel.runtime.raysession import RAY_DATA_LOGGING_ENV, init_ray, shutdown_ray
# num_cpus: an argument ray.init refuses when joining a cluster, so it must only reach a Ray this process starts
init_ray(env_is_enough=sys.argv[1] != "hook", local={"include_dashboard": False, "num_cpus": 1})
@ray.remote
def worker():
    return os.environ.get(RAY_DATA_LOGGING_ENV)
print(json.dumps([ray.get_runtime_context().runtime_env, ray.get(worker.remote())]))
shutdown_ray()
print(ray.is_initialized())
"""


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["env", "hook", "join"])
def test_a_local_ray_quiets_its_workers_through_the_environment_or_a_setup_hook(mode, request):
    # env: a Ray this process starts passes the driver's environment (Ray Data's quiet logging config) to its
    # workers, and no runtime_env keeps them from being the ones Ray prestarted; hook: a job that asks for the
    # hook; join: a joined cluster's workers never saw this environment, so they get the hook whatever the job
    # says, and the local-only arguments stay out of ray.init.
    ray_local = request.getfixturevalue("ray_local") if mode == "join" else None  # sets the auth env first
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_local:
        env["RAY_ADDRESS"] = ray_local.get_runtime_context().gcs_address
    with tempfile.TemporaryDirectory(prefix="mm", dir="/tmp") as tmp:  # no `ray start` cluster to find here
        if mode != "join":
            env["RAY_TMPDIR"] = tmp
        res = subprocess.run([sys.executable, "-c", _WORKERS_QUIET_BY, mode], env=env, capture_output=True,
                             text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    runtime_env, worker_config = json.loads(res.stdout.splitlines()[-2])
    assert "maskmodel-ray-data-logging" in (worker_config or "")  # quiet config reached the worker
    hook = (runtime_env or {}).get("worker_process_setup_hook")
    assert (hook is None) if mode == "env" else (hook == "maskmodel.runtime.raysession.setup_worker"), runtime_env
    # shutdown_ray stops a Ray it started and leaves a joined cluster (this driver stays connected until exit)
    assert res.stdout.splitlines()[-1] == ("True" if mode == "join" else "False")
