"""Box annotations (COCO JSON, Pascal VOC XML), the alert-class rule, and the synthetic scenes' boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maskmodel import alert
from maskmodel.data import synth
from maskmodel.data.annotations import ImageBoxes, read_annotations, read_coco, read_voc, write_coco
from maskmodel.errors import UserError
from maskmodel.io import storage

VOC = """<annotation>
  <folder>images</folder><filename>{name}</filename>
  <size><width>400</width><height>300</height><depth>3</depth></size>
  <object><name>with_mask</name><difficult>0</difficult>
    <bndbox><xmin>11</xmin><ymin>21</ymin><xmax>60</xmax><ymax>80</ymax></bndbox></object>
  <object><name>without_mask</name>
    <bndbox><xmin>350</xmin><ymin>200</ymin><xmax>420</xmax><ymax>310</ymax></bndbox></object>
  <object><name>mask_weared_incorrect</name>
    <bndbox><xmin>500</xmin><ymin>10</ymin><xmax>520</xmax><ymax>40</ymax></bndbox></object>
</annotation>
"""


def test_voc_file_and_folder(tmp_path):
    (tmp_path / "a.xml").write_text(VOC.format(name="a.png"))
    (tmp_path / "b.xml").write_text(VOC.format(name="b.png").replace("<object>", "<skip>", 0))
    rec = read_voc(str(tmp_path / "a.xml"))[0]
    assert rec.path == str(tmp_path / "a.png") and (rec.width, rec.height) == (400, 300)
    # 1-based inclusive -> 0-based, exclusive ends; clipped to the image; the box wholly outside is invalid
    np.testing.assert_allclose(rec.boxes, [[10, 20, 60, 80], [349, 199, 400, 300]])
    assert rec.classes == ("with_mask", "without_mask") and rec.labels == ("face", "face")
    assert rec.invalid == 1 and rec.attributes[0] == {"difficult": "0"}
    both = read_annotations(str(tmp_path), images_root="s3://bucket/images")
    assert [r.path for r in both] == ["s3://bucket/images/a.png", "s3://bucket/images/b.png"]
    mapped = read_voc(str(tmp_path / "a.xml"), class_map={"with_mask": "face"})[0]
    assert mapped.classes == ("with_mask",) and mapped.skipped == 2  # unmapped classes dropped, counted
    (tmp_path / "bad.xml").write_text("<annotation><filename>x.png</filename></annotation>")
    with pytest.raises(UserError, match="bad.xml"):
        read_voc(str(tmp_path))


def test_coco_round_trip_with_negatives_crowds_and_attributes(tmp_path):
    records = [ImageBoxes(path=str(tmp_path / "img" / "a.jpg"), width=100, height=80,
                          boxes=np.array([[1.5, 2, 30, 40], [50, 10, 99, 79]], np.float32),
                          classes=("mask", "no_mask"), labels=("face", "face"),
                          attributes=({"variant": "n95"}, {}), extra={"label": "no_mask"}),
               ImageBoxes(path="s3://elsewhere/b.jpg", width=64, height=64, boxes=np.zeros((0, 4), np.float32),
                          classes=(), labels=())]
    uri = str(tmp_path / "ann.json")
    doc = write_coco(records, uri)
    assert doc["images"][0]["file_name"] == "img/a.jpg" and doc["images"][1]["file_name"] == "s3://elsewhere/b.jpg"
    assert doc["annotations"][0]["bbox"] == [1.5, 2.0, 28.5, 38.0]
    back = read_coco(uri)
    assert [r.path for r in back] == [r.path for r in records] and len(back[1]) == 0  # a valid negative
    np.testing.assert_allclose(back[0].boxes, records[0].boxes)
    assert back[0].classes == ("mask", "no_mask") and back[0].labels == ("face", "face")
    assert back[0].attributes == ({"variant": "n95"}, {}) and back[0].extra == {"label": "no_mask"}
    raw = json.loads((tmp_path / "ann.json").read_text())
    raw["annotations"].append({"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1})
    raw["annotations"].append({"id": 10, "image_id": 1, "category_id": 1, "bbox": [200, 0, 5, 5]})
    (tmp_path / "ann.json").write_text(json.dumps(raw))
    again = read_coco(uri, class_map={"mask": "face", "no_mask": None})[0]
    assert again.classes == ("mask",) and again.skipped == 2 and again.invalid == 1  # no_mask + crowd; outside
    raw["annotations"][0]["image_id"] = 77
    (tmp_path / "ann.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="refers to image 77"):
        read_coco(uri)
    (tmp_path / "ann.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="not a COCO annotation file"):
        read_coco(uri)


def test_alert_classes_and_deciding_face():
    assert alert.alert_classes(("mask", "no_mask")) == ("no_mask",)
    assert alert.alert_classes(("WithoutMask", "WithMask")) == ("WithoutMask",)
    assert alert.alert_classes(("no_mask", "other")) == ("no_mask",)  # never a no-mask spelling as compliant
    assert alert.alert_classes(("a", "b", "c")) == ("b", "c")  # no spelling known: the first class is compliant
    three = ("mask_weared_incorrect", "with_mask", "without_mask")
    assert alert.alert_classes(three) == ("mask_weared_incorrect", "without_mask")
    assert alert.alert_classes(three, "without_mask") == ("mask_weared_incorrect", "with_mask")
    with pytest.raises(ValueError, match="not one of the classes"):
        alert.alert_classes(three, "mask")
    # A group photo: two confident masked faces, one unmasked one decides.
    probs = [[0.99, 0.01], [0.4, 0.6], [0.3, 0.7], [0.95, 0.05]]
    assert alert.deciding_face(probs, 1) == 2
    assert alert.deciding_face([[0.7, 0.3], [0.98, 0.02]], 1) == 1  # nobody alerted: the most confident face
    assert alert.deciding_face(np.zeros((0, 2)), 1) is None
    # Three classes: a face whose label is not the alert class never decides over one whose label is.
    assert alert.deciding_face([[0.3, 0.3, 0.4], [0.0, 0.55, 0.45]], 2) == 0
    assert alert.deciding_face([[0.1, 0.5, 0.4], [0.5, 0.1, 0.4]], 2) == 0  # no alert label: most confident
    # Several alert classes: among the alerted faces, the one most likely of ITS alert class decides.
    faces = [[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]]
    assert alert.deciding_face(faces, (1, 2)) == 2
    assert alert.deciding_face(faces, (1,)) == 1
    assert alert.deciding_face([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1]], (1, 2)) == 0  # nobody alerted
    # A photo's verdict and its truth under three classes.
    alerts = ("mask_incorrect", "no_mask")
    assert alert.is_alert("mask_incorrect", alerts) and not alert.is_alert("mask", alerts)
    assert not alert.is_alert(None, alerts)  # no face found, no fallback: no alert
    assert alert.truth_alert(["mask", "mask_incorrect"], alerts) and not alert.truth_alert(["mask"], alerts)
    assert not alert.truth_alert([], alerts)
    assert alert.row_alert("error", None, None, alerts) is None
    assert alert.row_alert("ok", "mask_incorrect", None, alerts) is True  # a row written before the column
    assert alert.row_alert("ok", "mask", True, alerts) is True  # the column, when present, is the verdict


def test_synthetic_scenes_hold_boxes_and_the_verdict(tmp_path):
    out = str(tmp_path / "faces")
    record = synth.write_dataset(synth.DatasetConfig(out=out, n_per_class=24, image_size=32, workers=4))
    assert record["scene_size"] == 128 and record["scene_annotations"]["file"] == synth.SCENE_ANNOTATIONS
    scenes = read_coco(storage.join(out, synth.SCENE_ANNOTATIONS))
    assert len(scenes) == 3 * synth.split_sizes(24)["scene"]
    variants = set()
    for s in scenes:
        folder = s.path.split("/")[-2]
        assert s.path.startswith(out) and storage.exists(s.path) and s.extra["label"] == folder
        assert (folder == "no_mask") == ("no_mask" in s.classes)  # the picture's verdict by the alert rule
        assert len(s) <= 4 and s.invalid == 0 and (s.width, s.height) == (128, 128)
        wh = s.boxes[:, 2:] - s.boxes[:, :2]
        assert (s.boxes >= 0).all() and (s.boxes <= 128).all() and (wh.min(initial=99) >= 20)
    # Over more scenes (drawn directly, same code): every face count, every variant, mixed pictures.
    drawn = [synth.render_scene_sample(label, i, size=128) for label in synth.CLASSES for i in range(30)]
    assert {len(d.faces) for d in drawn} == {0, 1, 2, 3, 4}
    variants = {f.variant for d in drawn for f in d.faces}
    assert {"hand", "paper", "scarf", "plain", *synth.WORN_WRONG} <= variants and set(synth.MASK_STYLES) <= variants
    assert any({f.label for f in d.faces} == {"mask", "no_mask"} for d in drawn)
    assert min(f.box[2] - f.box[0] for d in drawn for f in d.faces) < 32  # small faces too
