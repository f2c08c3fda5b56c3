"""jobs.train from annotated photos in every format, one epoch each on a real local Ray: the same faces and classes
whichever format the set comes in (COCO, VOC flat, VOC with a sibling images/ folder, YOLO), cut once, the summary kept
in model.json."""

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


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return build(tmp_path_factory.mktemp("annotated-train"), n=8)


@pytest.mark.parametrize("fmt", ["coco", "voc", "voc_sibling", "yolo"])
def test_one_epoch_from_each_format_with_a_class_map(ray_local, sets, fmt, tmp_path):
    out = str(tmp_path / "run")
    config = parse_config(TrainConfig, ["--data", sets[fmt], "--output", out, "--epochs", "1",
                                        "--arch", "resnet18", "--weights", "none", "--image-size", "32",
                                        "--batch-size", "8", "--cpus-per-worker", "0.5", "--val-fraction", "0.5",
                                        "--class-map", "no_mask=without_mask"])
    res = train(config)
    _, card = load_model_dir(res.model_dir)
    assert card.classes == ("mask", "without_mask")  # the set's classes after the map, sorted
    dataset = card.metrics["dataset"]
    if fmt == "coco":
        assert dataset["photos"] == {"train": 4, "val": 4}  # the COCO file's own split field
    else:  # VOC and YOLO carry no split: a hash of each photo's path, never a photo on both sides
        assert sum(dataset["photos"].values()) == 8 and set(dataset["photos"]) == {"train", "val"}
    faces = dataset["faces"]
    per_class = {c: sum(split.get(c, 0) for split in faces.values()) for c in card.classes}
    assert per_class == {"mask": sets["per_class"]["mask"], "without_mask": sets["per_class"]["no_mask"]}
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(out, "metrics.csv")))))
    assert [int(r["val_images"]) for r in rows] == [sum(faces["val"].values())]  # one row per face, each once
    assert int(rows[0]["skipped_train"]) == 0
