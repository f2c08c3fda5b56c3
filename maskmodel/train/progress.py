"""Progress inside a training epoch: a log line every few seconds (or steps), so a long epoch is never silent.

An epoch of a detector on a few hundred photos can take many minutes on CPUs; the epoch's own line comes
only at its end. :class:`StepProgress` logs, from rank 0, ``step/total``, images per second, the epoch's
running mean loss and the epoch's ETA. It reads the running sums back from the device only when a line is
due (one host sync per line, not per step).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch

from maskmodel.console import fmt_seconds

log = logging.getLogger(__name__)


class StepProgress:
    """Logs ``<label> step i/total | R img/s | loss L | ETA T`` when ``every_s`` seconds have passed since the
    last line (0: every step), or every ``every_steps`` steps (0: by time only).

    ``total_steps``: steps this worker will take in the epoch (``None``: unknown, no ETA); ``world``: workers
    training (images per second are this worker's times ``world``: every worker takes the same steps).
    """

    def __init__(self, label: str, *, total_steps: int | None, world: int = 1, every_s: float = 30.0,
                 every_steps: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.world = label, total_steps, max(1, world)
        self.every_s, self.every_steps, self.clock = every_s, every_steps, clock
        self.start = self.last = clock()

    def due(self, step: int) -> bool:
        """Whether step ``step`` (counted from 1) gets a line."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        return self.clock() - self.last >= self.every_s

    def update(self, step: int, sums: torch.Tensor) -> str | None:
        """After step ``step`` (from 1), with the epoch's running sums ``[loss * images, images, ...]`` (any
        device): the logged line when one was due, else ``None``."""
        if not self.due(step):
            return None
        now = self.last = self.clock()
        loss_sum, images = (float(v) for v in sums[:2].tolist())  # the one host sync of a line
        elapsed = max(now - self.start, 1e-9)
        rate = images * self.world / elapsed
        loss = f"{loss_sum / images:.4f}" if images else "n/a"
        if self.total:
            eta = fmt_seconds(elapsed / step * max(self.total - step, 0))
            line = f"{self.label} step {step}/{self.total} | {rate:.1f} img/s | loss {loss} | ETA {eta}"
        else:
            line = f"{self.label} step {step} | {rate:.1f} img/s | loss {loss}"
        log.info("%s", line)
        return line


def steps_per_worker(images: int, *, world: int, batch_size: int) -> int | None:
    """Steps each of ``world`` workers takes over ``images`` training images at ``batch_size`` per worker
    (``None`` when the count is unknown, ``images <= 0``)."""
    if images <= 0:
        return None
    return math.ceil(math.ceil(images / max(1, world)) / max(1, batch_size))
