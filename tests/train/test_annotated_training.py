"""jobs.train from annotated photos, one epoch on a real local Ray: faces cut once, the summary kept in model.json."""

from __future__ import annotations

import csv
import io

import pytest

from maskmodel.config import parse_config
from maskmodel.io import storage
from maskmodel.models.classifier import load_model_dir
from maskmodel.train.training import TrainConfig, train
from tests.data.annotated_sets import build

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_one_epoch_from_a_coco_file_with_a_class_map(ray_local, tmp_path):
    sets = build(tmp_path / "set", n=8)
    out = str(tmp_path / "run")
    config = parse_config(TrainConfig, ["--data", sets["coco"], "--output", out, "--epochs", "1",
                                        "--arch", "resnet18", "--weights", "none", "--image-size", "32",
                                        "--batch-size", "8", "--cpus-per-worker", "0.5",
                                        "--class-map", "no_mask=without_mask"])
    res = train(config)
    _, card = load_model_dir(res.model_dir)
    assert card.classes == ("mask", "without_mask")  # the file's classes after the map, sorted
    dataset = card.metrics["dataset"]
    assert dataset["photos"] == {"train": 4, "val": 4}  # the COCO file's own split field
    faces = dataset["faces"]
    assert sum(sum(c.values()) for c in faces.values()) == sets["faces"]
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(out, "metrics.csv")))))
    assert [int(r["val_images"]) for r in rows] == [sum(faces["val"].values())]  # one row per face, each once
    assert int(rows[0]["skipped_train"]) == 0
