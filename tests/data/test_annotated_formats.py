"""One annotated set in every format (COCO, VOC flat, VOC with a sibling images/ folder, YOLO): the same faces.

Readers (:func:`maskmodel.data.annotations.read_annotations`), the training job's data preparation
(:func:`maskmodel.train.annotated.load_annotated`) and its data step (:class:`~maskmodel.train.annotated.CutFaces`
after :func:`~maskmodel.data.discovery.fetch_and_check`, as plain callables) give the same faces, classes and
crops whichever format the set comes in. No Ray: the one-epoch run is tests/train/test_annotated_training.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from maskmodel.data.annotations import annotation_format, check_found, read_annotations
from maskmodel.data.discovery import fetch_and_check
from maskmodel.data.transforms import EvalCrop
from maskmodel.errors import UserError
from maskmodel.models.spec import DetectOptions
from maskmodel.train.annotated import CutFaces, load_annotated, parse_class_map
from tests.data.annotated_sets import build

pytestmark = pytest.mark.timeout(60)

FORMATS = {"coco": "coco", "voc": "voc", "voc_sibling": "voc", "yolo": "yolo"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return build(tmp_path_factory.mktemp("annotated"), n=8)


def _by_photo(records) -> dict[str, tuple]:
    return {r.path.rsplit("/", 1)[-1]: (r.boxes, r.classes, r.path) for r in records}


def test_every_format_reads_the_same_faces(sets):
    expected = None
    for key, kind in FORMATS.items():
        assert annotation_format(sets[key]) == kind
        records = read_annotations(sets[key], class_map={"mask": "mask", "no_mask": "no_mask"})
        assert check_found(records, source=sets[key]) == []  # every photo found, sibling images/ included
        assert sum(len(r) for r in records) == sets["faces"]
        assert sorted({c for r in records for c in r.classes}) == sets["classes"]
        faces = _by_photo(records)
        for name, (boxes, classes, _) in faces.items():
            np.testing.assert_array_equal(boxes, sets["boxes"][name])  # YOLO's normalised numbers are exact here
        if expected is not None:
            assert {k: v[1] for k, v in faces.items()} == expected
        expected = {k: v[1] for k, v in faces.items()}
    sibling = read_annotations(sets["voc_sibling"])
    assert all("/voc_sibling/images/" in r.path for r in sibling)


def test_the_data_step_cuts_the_same_faces_from_every_format(sets):
    options = DetectOptions()
    cutter = CutFaces(EvalCrop(crop_size=24), crop_size=24, margin=options.margin, min_face=options.min_face,
                      max_pixels=4_000_000)
    crops = {}
    for key in FORMATS:
        data = load_annotated(sets[key], val_fraction=0.5, min_face=options.min_face)
        assert data.classes == ("mask", "no_mask")
        assert sum(sum(c.values()) for c in data.summary["faces"].values()) == sets["faces"]
        rows = [r for split in data.splits.values() for r in split]
        batch = fetch_and_check({"uri": np.array([r["uri"] for r in rows], object)}, check=False)
        batch.update(boxes=[r["boxes"] for r in rows], labels=[r["labels"] for r in rows])
        out = cutter(batch)
        assert (out["label"] >= 0).all() and len(out["label"]) == sets["faces"]
        order = np.argsort([u.rsplit("/", 1)[-1] for u in out["uri"]], kind="stable")
        crops[key] = (out["image"][order], out["label"][order])
    for key in FORMATS:
        np.testing.assert_array_equal(crops[key][0], crops["coco"][0])
        np.testing.assert_array_equal(crops[key][1], crops["coco"][1])


def test_class_map_renames_drops_and_the_coco_split_is_honoured(sets):
    data = load_annotated(sets["coco"], class_map="no_mask=without_mask", min_face=8)
    assert data.classes == ("mask", "without_mask")
    assert data.summary["photos"] == {"train": 4, "val": 4}  # the file's own split field, not the hash
    with pytest.raises(UserError, match="at least two"):
        load_annotated(sets["coco"], class_map="no_mask=-", min_face=8)
    with pytest.raises(UserError, match="big enough"):  # every face under the minimum size: none to train on
        load_annotated(sets["coco"], min_face=1000)
    some = load_annotated(sets["coco"], min_face=30)
    assert 0 < sum(some.summary["faces_too_small"].values()) < sets["faces"]
    assert parse_class_map("with_mask=mask, mask_weared_incorrect=,x=-") == {
        "with_mask": "mask", "mask_weared_incorrect": None, "x": None}
    with pytest.raises(UserError, match="no '='"):
        parse_class_map("with_mask")


def test_a_voc_set_whose_photos_are_elsewhere_names_the_folder_and_the_first_photo(sets, tmp_path):
    xml_only = tmp_path / "annotations"
    shutil.copytree(sets["voc_sibling"], xml_only)  # no images/ next to it
    records = read_annotations(str(xml_only))
    with pytest.raises(UserError) as err:
        check_found(records, source=str(xml_only))
    message = str(err.value)
    assert str(xml_only) in message and "'scene000.jpg'" in message and "--images-root" in message
    # --images-root points at them: found.
    rooted = read_annotations(str(xml_only), images_root=sets["voc_sibling"].replace("/annotations", "/images"))
    assert check_found(rooted, source=str(xml_only)) == []


def test_yolo_layouts_and_errors(sets, tmp_path):
    # Darknet's layout: photos and .txt side by side, classes.txt next to them.
    flat = tmp_path / "darknet"
    flat.mkdir()
    for f in (sets_path := Path(sets["yolo"])).glob("*/*"):
        shutil.copy(f, flat / f.name)
    (flat / "classes.txt").write_text("mask\nno_mask\n")
    records = read_annotations(str(flat))
    assert sum(len(r) for r in records) == sets["faces"] and records[0].path.startswith(str(flat))
    # The labels/ folder given itself finds the sibling images/ and the parent's data.yaml.
    assert sum(len(r) for r in read_annotations(str(sets_path / "labels"))) == sets["faces"]
    (flat / "scene001.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(UserError, match="line 1"):
        read_annotations(str(flat))
    (flat / "classes.txt").unlink()
    assert annotation_format(str(flat)) is None
    with pytest.raises(UserError, match="holds no annotations"):
        read_annotations(str(flat))
