"""Relative local paths on the command line land where the user ran the job, not in Ray's folders.

Ray Train and Tune run their workers in a working directory of their own (the run's artifact folder
under Ray's session folder), so a relative path that reached a worker unresolved would write there.
Every job config resolves its paths on the driver (:func:`maskmodel.config.resolve_paths`).
"""

from __future__ import annotations

import glob
import os
import uuid

import pytest

from maskmodel.config import absolute_uri
from maskmodel.train.training import TrainConfig
from tests.conftest import write_tiny_tree

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


def test_jobs_with_relative_paths_write_under_the_working_directory(ray_local, tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:10]
    data, run, scores, evals, abl = (f"{name}-{tag}" for name in ("data", "run", "scores", "eval", "abl"))
    monkeypatch.chdir(tmp_path)
    write_tiny_tree(data, splits=(("train", 10), ("val", 4), ("scene", 3)), size=40)

    from jobs import ablation, evaluate, score, train

    assert train.main(["--data", data, "--output", run, *TINY]) == 0
    for name in TRAIN_FILES:
        assert (tmp_path / run / name).is_file(), name
    assert score.main(["--input", f"{data}/scene", "--model", f"{run}/model", "--output", scores,
                       "--run-id", "rel"]) == 0
    assert (tmp_path / scores / "_delta_log").is_dir()
    assert evaluate.main(["--model", f"{run}/model", "--data", data, "--output", evals, "--split", "scene"]) == 0
    for name in ("report.json", "report.md"):
        assert (tmp_path / evals / name).is_file(), name
    assert ablation.main(["--data", data, "--output", abl, "--lrs", "0.01", "--augment", "on", *TINY]) == 0
    for name in ("ablation.csv", "ablation.md", "ablation.json", "ablation_curves.png",
                 "trials/lr0.01-aug-on/augmented_samples.png", "trials/lr0.01-aug-on/model/model.pt"):
        assert (tmp_path / abl / name).is_file(), name
    assert _stray(tag) == []
