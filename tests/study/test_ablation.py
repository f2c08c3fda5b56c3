"""The ablation study: the table logic without Ray, then a tiny grid as real Ray Tune trials of Ray Train runs."""

from __future__ import annotations

import csv
import io
from types import SimpleNamespace

import pytest
from PIL import Image

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.study.ablation import (
    FAIL_TRIAL_ENV,
    AblationConfig,
    _history,
    run_ablation,
    summarize,
    summarize_trial,
    trial_specs,
)
from tests.conftest import write_tiny_tree

TINY = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "16",
        "--cpus-per-worker", "0.45", "--epochs", "2"]


def _h(epoch: int, train_acc: float, val_acc: float) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 - train_acc, "train_acc": train_acc, "val_loss": 1.0 - val_acc,
            "val_acc": val_acc}


def test_grid_is_the_product_in_a_fixed_order(tmp_path):
    specs = trial_specs(AblationConfig(data="d", output=str(tmp_path), lrs=(0.01, 0.005), augment=("off", "on")))
    assert [(s["lr"], s["augment"]) for s in specs] == [(0.01, "off"), (0.01, "on"), (0.005, "off"), (0.005, "on")]
    assert [s["name"] for s in specs] == ["lr0.01-aug-off", "lr0.01-aug-on", "lr0.005-aug-off", "lr0.005-aug-on"]
    assert specs[1]["train"]["augment"] is True and specs[0]["train"]["augment"] is False
    assert specs[2]["train"]["output"] == str(tmp_path / "trials" / "lr0.005-aug-off")
    three = trial_specs(AblationConfig(data="d", output="o", lrs=(0.01,), augment=("on",), weights=("imagenet", "none")))
    assert [s["name"] for s in three] == ["lr0.01-aug-on-w-imagenet", "lr0.01-aug-on-w-none"]


def test_rows_best_epoch_overfit_epoch_and_failures():
    spec = {"name": "t", "lr": 0.01, "augment": "off", "weights": "none"}
    hist = [_h(1, 0.9, 0.8), _h(2, 0.9995, 0.95), _h(3, 1.0, 0.95), _h(4, 1.0, 0.9)]
    row = summarize_trial(spec, hist, error=None, best_epoch=None, model_id="m", scene={"accuracy": 0.7,
                          "images": 10, "errors": 0}, threshold=0.999)
    assert (row["status"], row["epochs_run"], row["final_val_acc"], row["best_epoch"]) == ("ok", 4, 0.9, 2)
    assert row["train_acc_over_threshold_epoch"] == 2 and row["scene_acc"] == 0.7
    never = summarize_trial(spec, hist[:1], error=None, best_epoch=1, model_id="m", scene=None, threshold=0.999)
    assert never["train_acc_over_threshold_epoch"] == "never" and never["scene_acc"] is None
    failed = summarize_trial(spec, [], error="Traceback...\nRuntimeError: boom", best_epoch=None, model_id="",
                             scene=None, threshold=0.999)
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom" and failed["final_val_acc"] is None
    rows = [dict(row, augment="off"), dict(row, augment="on", scene_acc=0.8), dict(failed, augment="on")]
    s = summarize(rows)
    assert s["by_augment"]["on"] == {"trials": 1, "mean_scene_acc": 0.8, "mean_final_val_acc": 0.9}
    assert s["pairs"] == [{"lr": 0.01, "weights": "none", "scene_acc_on_minus_off": pytest.approx(0.1)}]
    assert s["failed"] == ["t"]


def test_a_failed_trials_history_falls_back_to_its_metrics_csv(tmp_path):
    # Ray Train V2 can lose the last report of a worker that raised right after it; metrics.csv was written first.
    import pandas as pd

    from maskmodel.train.outputs import metrics_csv

    out = str(tmp_path / "trial")
    storage.write_text(storage.join(out, "metrics.csv"), metrics_csv([_h(0, 0.6, 0.5)]))
    lost = SimpleNamespace(metrics_dataframe=None, error=RuntimeError("boom"))
    assert _history(lost, out) == [_h(0, 0.6, 0.5)]
    # A trial that ended well keeps what Tune received, whatever the file says.
    ok = SimpleNamespace(metrics_dataframe=pd.DataFrame([_h(0, 0.7, 0.6), _h(1, 0.8, 0.7)]), error=None)
    assert _history(ok, out) == [_h(0, 0.7, 0.6), _h(1, 0.8, 0.7)]
    assert _history(SimpleNamespace(metrics_dataframe=None, error=RuntimeError("x")), str(tmp_path / "none")) == []


def test_bad_data_fails_before_any_trial(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_ablation(AblationConfig(data=str(tmp_path / "nope"), output=str(tmp_path / "o"), weights=("none",)))


@pytest.mark.timeout(360)
@pytest.mark.ray
def test_tiny_grid_with_an_injected_failure(ray_local, tmp_path, monkeypatch):
    data, out = str(tmp_path / "data"), str(tmp_path / "abl")
    write_tiny_tree(data, splits=(("train", 12), ("val", 4), ("scene", 3)), size=40)
    monkeypatch.setenv(FAIL_TRIAL_ENV, "1")
    from jobs.ablation import main

    assert main(["--data", data, "--output", out, "--lrs", "0.01", "0.005", "--augment", "on", *TINY]) == 0
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(out, "ablation.csv")))))
    assert [(r["trial"], r["status"]) for r in rows] == [("lr0.01-aug-on", "ok"), ("lr0.005-aug-on", "failed")]
    ok, failed = rows
    assert ok["epochs_run"] == "2" and 0.0 <= float(ok["final_val_acc"]) <= 1.0 and ok["best_epoch"] in ("1", "2")
    assert ok["scene_images"] == "6" and ok["train_acc_over_threshold_epoch"] in ("1", "2", "never")
    scene = storage.read_json(storage.join(out, "trials", "lr0.01-aug-on", "scene_eval", "report.json"))
    assert float(ok["scene_acc"]) == pytest.approx(scene["splits"]["scene"]["accuracy"])
    assert scene["model_id"] == ok["model_id"]
    # The failing trial finished epoch 1, then its Train worker raised: a failed row with its partial history.
    assert "injected test failure" in failed["error"] and failed["epochs_run"] == "1" and failed["scene_acc"] == ""
    # What Tune received through TuneReportCallback is what the trial's rank-0 worker wrote to metrics.csv.
    record = storage.read_json(storage.join(out, "ablation.json"))
    metrics = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(out, "trials", "lr0.01-aug-on",
                                                                             "metrics.csv")))))
    assert [h["val_acc"] for h in record["histories"]["lr0.01-aug-on"]] == pytest.approx(
        [float(m["val_acc"]) for m in metrics])
    md = storage.read_text(storage.join(out, "ablation.md"))
    assert "| lr0.005-aug-on | 0.005 | on | none | failed |" in md and "**lr0.005-aug-on failed**" in md
    assert Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "ablation_curves.png")))).size[0] > 600
