"""Job metrics where Ray users look: ``ray.util.metrics``, shown by the Ray dashboard and its Prometheus endpoint.

Ray exports every metric with a ``ray_`` prefix from each node's metrics agent
(``http://<node>:<metrics_export_port>/metrics``; counters get ``_total``).
Tags are low-cardinality on purpose: a run id, and an error *kind* (the part of
the reason before ``:``), never a path.
"""

from __future__ import annotations

import sys
from collections import Counter as Tally
from typing import Callable, Iterable

SCORE_IMAGES = "maskmodel_score_images"
SCORE_ERRORS = "maskmodel_score_errors"
SCORE_RATE = "maskmodel_score_images_per_second"
SCORE_DECODE_FALLBACKS = "maskmodel_score_decode_fallbacks"


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


RUN_GAUGES = {
    "maskmodel_run_verdict_rate": ("verdict_rate", "share of the run's photos with a verdict whose verdict is the alert "
                                                   "class"),
    "maskmodel_run_mean_confidence": ("mean_confidence", "mean confidence of the run's photo verdicts"),
    "maskmodel_run_error_rate": ("error_rate", "share of the run's objects that became error rows"),
    "maskmodel_run_no_face_rate": ("no_face_rate", "share of the run's ok photos in which no face was found"),
}


class RunGauges:
    """A finished run's outcome as gauges tagged ``run_id``, set once by the driver after the commit.

    ``record`` takes the run's figures (:func:`maskmodel.results.profile.figures`) and sets each gauge that is
    defined (a rate over no photos is not set). Ray must be initialised.
    """

    def __init__(self, run_id: str) -> None:
        from ray.util.metrics import Gauge

        self.tags = {"run_id": run_id}
        self.gauges = {name: (key, Gauge(name, description=text, tag_keys=("run_id",)))
                       for name, (key, text) in RUN_GAUGES.items()}

    def record(self, values: dict) -> None:
        for key, gauge in self.gauges.values():
            if values.get(key) is not None:
                gauge.set(float(values[key]), tags=self.tags)


def decode_fallback_recorder(run_id: str) -> Callable[[str, int], None] | None:
    """Where Ray runs (a predictor actor), a function counting JPEGs the GPU failed to decode (decoded on the CPU
    instead) in :data:`SCORE_DECODE_FALLBACKS`, tagged with the kind of failure; ``None`` without Ray.

    Ray is never imported here: a process that has not started or joined Ray has no metrics to export.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    from ray.util.metrics import Counter

    counter = Counter(SCORE_DECODE_FALLBACKS, description="JPEGs the GPU failed to decode, decoded on the CPU instead",
                      tag_keys=("run_id", "reason"))

    def record(reason: str, n: int) -> None:
        counter.inc(n, tags={"run_id": run_id, "reason": error_kind(reason)})

    return record


TRAIN_GAUGES = {
    "maskmodel_train_epoch": ("epoch", "the last finished epoch (counting from 1)"),
    "maskmodel_train_loss": ("train_loss", "mean training loss of the last epoch"),
    "maskmodel_train_accuracy": ("train_acc", "training accuracy of the last epoch"),
    "maskmodel_val_loss": ("val_loss", "validation loss of the last epoch"),
    "maskmodel_val_accuracy": ("val_acc", "validation accuracy of the last epoch"),
    "maskmodel_train_images_per_second": ("images_per_s", "training images per second in the last epoch"),
}


class TrainingMetrics:
    """Per-epoch training gauges, set by rank 0; tag ``run`` is the run's ``--output``."""

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {name: (key, Gauge(name, description=text, tag_keys=("run",)))
                       for name, (key, text) in TRAIN_GAUGES.items()}

    def record(self, row: dict) -> None:
        for key, gauge in self.gauges.values():
            if key in row:  # the detector has no accuracy
                gauge.set(float(row[key]), tags=self.tags)
