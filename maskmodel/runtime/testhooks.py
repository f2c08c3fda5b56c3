"""Test-only pause points: a job stops at a named point until the test says go.

Fault-injection tests (kill the driver, lose a node, stop and resume) must act
while a job is at a known point, not race it. With
``MASKMODEL_TEST_PAUSE=<point>`` and ``MASKMODEL_TEST_PAUSE_DIR=<uri>`` set,
every process that reaches the point writes ``<uri>/<point>.paused`` and waits
until ``<uri>/<point>.release`` exists (the test writes it once it has done
its damage, or kills the job); after that the point lets everyone pass, so a
restarted worker or a re-run goes on. Unset, :func:`pause` costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

PAUSE_ENV = "MASKMODEL_TEST_PAUSE"
PAUSE_DIR_ENV = "MASKMODEL_TEST_PAUSE_DIR"
# A forgotten release must not hang CI forever: the job goes on after this long.
MAX_PAUSE_S = 600.0


def pause(point: str) -> None:
    """Pause here if a test asked for ``point`` (see the module docstring)."""
    if os.environ.get(PAUSE_ENV) != point or not os.environ.get(PAUSE_DIR_ENV):
        return
    from maskmodel.io import storage

    base = os.environ[PAUSE_DIR_ENV]
    paused, release = storage.join(base, f"{point}.paused"), storage.join(base, f"{point}.release")
    if storage.exists(release):
        return
    storage.write_text(paused, f"{os.getpid()}\n")
    log.warning("test pause point %s reached; waiting for %s", point, release)
    deadline = time.monotonic() + MAX_PAUSE_S
    while not storage.exists(release) and time.monotonic() < deadline:
        time.sleep(0.1)


def env(point: str, directory: str) -> dict[str, str]:
    """The environment variables that make a job pause at ``point`` (for tests)."""
    return {PAUSE_ENV: point, PAUSE_DIR_ENV: directory}


def wait_paused(point: str, directory: str, *, alive=lambda: True, timeout: float = 300.0) -> None:
    """Block until the job has paused at ``point``; ``alive()`` false (the job ended) or a timeout fails it."""
    from maskmodel.io import storage

    marker = storage.join(directory, f"{point}.paused")
    deadline = time.monotonic() + timeout
    while not storage.exists(marker):
        if not alive():
            raise AssertionError(f"the job ended before it reached pause point {point!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the job did not reach pause point {point!r} in {timeout:.0f}s")
        time.sleep(0.2)


def release(point: str, directory: str) -> None:
    """Let a job paused at ``point`` go on."""
    from maskmodel.io import storage

    storage.write_text(storage.join(directory, f"{point}.release"), "go\n")
