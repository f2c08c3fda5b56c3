"""Job metrics where Ray users look: ``ray.util.metrics``, shown by the Ray dashboard and its Prometheus endpoint.

Ray exports every metric with a ``ray_`` prefix from each node's metrics agent
(``http://<node>:<metrics_export_port>/metrics``; counters get ``_total``).
Tags are low-cardinality on purpose: a run id, and an error *kind* (the part of
the reason before ``:``), never a path.
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Iterable

SCORE_IMAGES = "maskmodel_score_images"
SCORE_ERRORS = "maskmodel_score_errors"
SCORE_RATE = "maskmodel_score_images_per_second"


def error_kind(reason: str) -> str:
    """``too large: 123 bytes > 64`` -> ``too large``: the reason without its per-object detail."""
    return reason.split(":", 1)[0].strip() or "error"


class ScoringMetrics:
    """The scoring job's counters, recorded by the driver as committed-to-be rows arrive."""

    def __init__(self, run_id: str) -> None:
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run_id": run_id}
        self.images = Counter(SCORE_IMAGES, description="images scored (ok and error rows)", tag_keys=("run_id",))
        self.errors = Counter(SCORE_ERRORS, description="error rows by kind of reason",
                              tag_keys=("run_id", "reason"))
        self.rate = Gauge(SCORE_RATE, description="images scored per second since the run started",
                          tag_keys=("run_id",))

    def record(self, rows: int, errors: Iterable[str | None], rate: float) -> None:
        """Count ``rows`` images and the non-null ``errors`` among them; set the current rate."""
        if rows:
            self.images.inc(rows, tags=self.tags)
        for kind, n in Tally(error_kind(e) for e in errors if e).items():
            self.errors.inc(n, tags={**self.tags, "reason": kind})
        self.rate.set(rate, tags=self.tags)
