"""Relative local paths on the command line land where the user ran the job, not in Ray's folders.

Ray Train and Tune run their workers in a working directory of their own (the run's artifact folder
under Ray's session folder), so a relative path that reached a worker unresolved would write there.
Every job config resolves its paths on the driver (:func:`maskmodel.config.resolve_paths`). The jobs
themselves run with relative paths, one after another in one folder, in ``tests/test_docs.py``.
"""

from __future__ import annotations

import glob
import os

import pytest

from maskmodel.config import absolute_uri
from maskmodel.train.training import TrainConfig

pytestmark = pytest.mark.ray

TINY = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "16",
        "--cpus-per-worker", "0.45", "--epochs", "1"]

TRAIN_FILES = ("model/model.pt", "model/model.json", "metrics.csv", "curves.png", "augmented_samples.png",
               "report.json", "confusion_matrix.png", "train_config.json")


def _stray(tag: str) -> list[str]:
    """Files or folders named after this test's output folders anywhere under Ray's temp folders."""
    roots = {"/tmp/ray", os.path.expanduser("~/ray_results")}
    return [p for r in roots for p in glob.glob(os.path.join(r, "**", f"*{tag}*"), recursive=True)]


def test_absolute_uri_resolves_local_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("runs/r1") == str(tmp_path / "runs" / "r1")
    assert absolute_uri("file://runs/r1") == f"file://{tmp_path}/runs/r1"
    assert absolute_uri("/abs/x") == "/abs/x"
    for uri in ("s3://bucket/runs/r1", "gs://b/x", "memory://x", ""):
        assert absolute_uri(uri) == uri
    cfg = TrainConfig(data="d", output="o", weights="none")
    assert (cfg.data, cfg.output, cfg.weights) == (str(tmp_path / "d"), str(tmp_path / "o"), "none")
    assert TrainConfig(data="d", output="o", weights="w.pt").weights == str(tmp_path / "w.pt")
