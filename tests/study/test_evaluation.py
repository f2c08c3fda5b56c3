"""Evaluation: the pure metrics against hand-computed values, then ``jobs.evaluate`` on a real local Ray with the
report checked against numbers computed independently from the committed scoring rows."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from maskmodel.metrics import classification
from maskmodel import results
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.models.classifier import ModelCard, build_model, save_model_dir, state_dict_bytes
from maskmodel.study import eval_reports, evaluation
from tests.conftest import write_tiny_tree

CLASSES = ("mask", "no_mask")


# ----------------------------------------------------------------------------- pure metrics

def test_roc_auc_and_average_precision_by_hand():
    # Descending: 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg). Of the 4 pos/neg pairs, 3 rank the positive higher.
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert classification.roc_auc(y, s) == pytest.approx(0.75)
    fpr, tpr, thr = classification.roc_curve(y, s)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1] and thr[0] == np.inf
    # Precision at each positive: 1/1 (recall 0.5), 2/3 (recall 1.0) -> AP = 0.5 * 1 + 0.5 * 2/3.
    assert classification.average_precision(y, s) == pytest.approx(0.5 + 1 / 3)


def test_auc_ties_count_half_and_match_pairwise_counting():
    assert classification.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert classification.roc_auc(y, s) == pytest.approx(sum(pairs) / len(pairs))


def test_undefined_curves_are_none():
    assert classification.roc_auc([1, 1], [0.2, 0.9]) is None
    assert classification.average_precision([0, 0], [0.2, 0.9]) is None
    report = classification.binary_report([0, 0], [0.2, 0.9])
    assert report["roc"] is None and report["pr"] is None and report["thresholds"][0]["recall"] is None


def test_threshold_table_by_hand():
    rows = {r["threshold"]: r for r in classification.threshold_table([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8],
                                                                  [0.35, 0.5, 0.9])}
    assert rows[0.35] == {"threshold": 0.35, "flagged": 3, "tp": 2, "fp": 1, "fn": 0,
                          "precision": pytest.approx(2 / 3), "recall": 1.0}
    assert rows[0.5]["precision"] == 1.0 and rows[0.5]["recall"] == 0.5
    assert rows[0.9]["flagged"] == 0 and rows[0.9]["precision"] is None and rows[0.9]["recall"] == 0.0


def test_calibration_by_hand():
    cal = classification.calibration([0.95, 0.85, 0.65, 0.55], [1, 0, 1, 1], n_bins=10)
    # |1-0.95| + |0-0.85| + |1-0.65| + |1-0.55| over 4 images.
    assert cal["ece"] == pytest.approx((0.05 + 0.85 + 0.35 + 0.45) / 4)
    assert cal["mce"] == pytest.approx(0.85)
    assert [b["count"] for b in cal["bins"]] == [0, 0, 0, 0, 0, 1, 1, 0, 1, 1]
    assert cal["bins"][0]["accuracy"] is None
    # Bins are (lo, hi]: 0.5 belongs to the 0.4-0.5 bin, 0.0 to the first.
    edges = classification.calibration([0.5, 0.0], [1, 1], n_bins=10)["bins"]
    assert edges[4]["count"] == 1 and edges[0]["count"] == 1
    assert classification.calibration([0.7, 0.7], [1, 0], n_bins=2)["ece"] == pytest.approx(0.2)
    assert classification.calibration([], [], n_bins=5)["ece"] is None


def test_positive_class_flag_says_what_replaced_it():
    with pytest.raises(ValueError, match="--positive-class was replaced.*--roc-classes no_mask"):
        evaluation.EvalConfig(model="m", data="d", output="o", positive_class="no_mask")


def _tiles(png: bytes, layout: dict) -> list[str]:
    """The border colour of each tile, read from the sheet's pixels ('right', 'wrong' or 'empty')."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size == (layout["columns"] * layout["tile_width"], layout["rows"] * layout["tile_height"])
    names = {eval_reports.RIGHT_COLOR: "right", eval_reports.WRONG_COLOR: "wrong", (255, 255, 255): "empty"}
    return [names[img.getpixel((c * layout["tile_width"] + 1, r * layout["tile_height"] + 1))]
            for r in range(layout["rows"]) for c in range(layout["columns"])]


def test_contact_sheet_has_one_tile_per_image():
    imgs = [Image.new("RGB", (40 + i, 30), (i * 20, 90, 90)) for i in range(11)]
    correct = [False, False] + [True] * 9
    png, layout = eval_reports.contact_sheet_png(imgs, [("mask 0.90", "true mask")] * 11, correct, cols=4)
    assert (layout["tiles"], layout["columns"], layout["rows"]) == (11, 4, 3)
    assert _tiles(png, layout) == ["wrong", "wrong"] + ["right"] * 9 + ["empty"]


def test_bad_annotations_fail_before_anything_is_scored(tmp_path):
    """No Ray: these checks run before the first split is scored."""
    from maskmodel.study.evaluation import EvalConfig, evaluate

    data, model = str(tmp_path / "data"), str(tmp_path / "model")
    write_tiny_tree(data, splits=(("train", 2), ("val", 2), ("test", 2)), size=40)  # a val split: no hash hold-out
    save_model_dir(model, state_dict_bytes(build_model("resnet18", 2)),
                   ModelCard(arch="resnet18", classes=CLASSES, input_size=32, resize_size=37))
    base = dict(model=model, data=data, output=str(tmp_path / "o"))
    with pytest.raises(UserError, match="--annotations .* does not exist"):
        evaluate(EvalConfig(**base, annotations=str(tmp_path / "none.json")))
    (tmp_path / "test.coco.json").write_text('{"images": []}')
    with pytest.raises(UserError, match="not a COCO annotation file"):
        evaluate(EvalConfig(**base, annotations=str(tmp_path / "test.coco.json")))
    voc = tmp_path / "voc"  # a VOC folder naming the test photos, which are not next to its xml files
    voc.mkdir()
    for name in ("000.jpg", "001.jpg"):
        (voc / f"{name}.xml").write_text(f"<annotation><filename>{name}</filename><size><width>40</width><height>40"
                                         f"</height></size><object><name>mask</name><bndbox><xmin>5</xmin><ymin>5"
                                         f"</ymin><xmax>30</xmax><ymax>30</ymax></bndbox></object></annotation>")
    with pytest.raises(UserError, match=r"None of the 2 photo\(s\) annotated in '.*voc' is among the 4 photo\(s\) of "
                                        r"split\(s\) test in --data: the first, '.*/voc/000.jpg', was looked for in "
                                        r"the folder '.*/voc' \(no such file\)"):
        evaluate(EvalConfig(**base, annotations=str(voc)))
    storage.write_text(os.path.join(data, "test.coco.json"), "not json")
    with pytest.raises(UserError, match="is not valid JSON"):  # the default, <data>/<split>.coco.json, is read too
        evaluate(EvalConfig(**base))
    assert not os.path.exists(tmp_path / "o" / "scores")


def test_a_manifest_of_only_the_photos_to_evaluate_is_their_split(tmp_path):
    """jobs.evaluate needs no training split (issue 27): rows without a split are the one split asked (other than
    train/val, which keep the hash split training made); rows of the asked split are enough."""
    from maskmodel.data.discovery import discover, discover_splits

    write_tiny_tree(str(tmp_path), splits=(("scene", 2),), size=40)
    names = [f"scene/{c}/{i:03d}.jpg" for c in CLASSES for i in range(2)]
    (tmp_path / "photos.csv").write_text("path,label\n" + "".join(f"{n},{n.split('/')[1]}\n" for n in names))
    (tmp_path / "split.csv").write_text("path,label,split\n" + "".join(f"{n},{n.split('/')[1]},Scene\n"
                                                                       for n in names))
    with pytest.raises(UserError, match="has no training images; give rows split 'train'"):  # was: a folder
        discover(str(tmp_path / "split.csv"))
    for manifest in ("photos.csv", "split.csv"):
        data = discover_splits(str(tmp_path / manifest), ["scene"])
        assert data.classes == CLASSES and list(data.splits) == ["scene"]
        assert sorted(it.uri for it in data.splits["scene"]) == sorted(str(tmp_path / n) for n in names)
        assert [data.classes[it.label] for it in data.splits["scene"]] == [n.split("/")[1] for n in names]
    tree = str(tmp_path / "tree")
    write_tiny_tree(tree, splits=(("train", 6),), size=40)  # no val folder: val is the hash split training made
    assert {it.uri for it in discover_splits(tree, ["val"]).splits["val"]} == {it.uri for it in discover(tree).splits["val"]}
    # Rows without a split, two splits asked: the hash split (whether any of 6 photos lands in val depends on the path).
    with pytest.raises(UserError, match=r"no labelled images in split 'test' \(it has: train(, val)?\)"):
        discover_splits(str(tmp_path / "photos.csv"), ["test", "scene"])


# ----------------------------------------------------------------------------- the job on a real local Ray

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, ray_local, s3_endpoint):
    """A random-weight model (right on some images, wrong on others) evaluated on val and test; report on S3."""
    import s3fs

    root = tmp_path_factory.mktemp("eval")
    data, model = str(root / "data"), str(root / "model")
    write_tiny_tree(data, splits=(("train", 3), ("Validation", 5), ("test", 7)), size=40)
    storage.write_bytes(os.path.join(data, "test", "mask", "broken.jpg"), b"\xff\xd8\xff not a jpeg")
    torch.manual_seed(3)
    save_model_dir(model, state_dict_bytes(build_model("resnet18", 2)),
                   ModelCard(arch="resnet18", classes=CLASSES, input_size=32, resize_size=37))
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("eval-reports")
    out = "s3://eval-reports/r1"
    from jobs.evaluate import main

    assert main(["--model", model, "--data", data, "--output", out, "--split", "val", "test",
                 "--max-tiles", "6", "--thresholds", "0.3", "0.5", "0.7"]) == 0
    return {"data": data, "model": model, "out": out, "report": storage.read_json(storage.join(out, "report.json"))}


def _independent(out: str, split: str) -> dict:
    """Numbers recomputed straight from the committed rows; the true class is the image's folder name."""
    t = results.read_results(storage.join(out, "scores"), run_ids=[split]).to_pydict()
    rows = list(zip(t["path"], t["status"], t["label"], t["p_no_mask"], t["confidence"]))
    ok = [(p.split("/")[-2], lab, pn, c) for p, st, lab, pn, c in rows if st == "ok"]
    pos = [pn for truth, _, pn, _ in ok if truth == "no_mask"]
    neg = [pn for truth, _, pn, _ in ok if truth == "mask"]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    ece = 0.0
    for b in range(10):
        members = [(truth == lab, c) for truth, lab, _, c in ok if min(max(int(np.ceil(c * 10)) - 1, 0), 9) == b]
        if members:
            ece += len(members) / len(ok) * abs(np.mean([m[0] for m in members]) - np.mean([m[1] for m in members]))
    cm = [[sum(1 for truth, lab, _, _ in ok if (truth, lab) == (a, b)) for b in CLASSES] for a in CLASSES]
    at_half = [(truth, pn >= 0.5) for truth, _, pn, _ in ok]
    tp = sum(1 for truth, flag in at_half if flag and truth == "no_mask")
    return {"images": len(rows), "errors": sum(st == "error" for _, st, *_ in rows), "scored": len(ok),
            "accuracy": sum(truth == lab for truth, lab, _, _ in ok) / len(ok), "auc": sum(pairs) / len(pairs),
            "ece": ece, "cm": cm, "tp_at_half": tp, "flagged_at_half": sum(f for _, f in at_half),
            "wrong": sum(truth != lab for truth, lab, _, _ in ok),
            "error_paths": sorted(p for p, st, *_ in rows if st == "error")}


@pytest.mark.ray
def test_report_numbers_equal_the_committed_rows(evaluated):
    report = evaluated["report"]
    assert set(report["splits"]) == {"val", "test"}  # "Validation" folder, asked for as "val"
    card = storage.read_json(os.path.join(evaluated["model"], "model.json"))
    assert report["model_id"] == card["model_id"] and report["data"] == evaluated["data"]
    for split, n_images in (("val", 10), ("test", 15)):
        r, ind = report["splits"][split], _independent(evaluated["out"], split)
        assert r["model_ids"] == [card["model_id"]]
        assert (r["images"], r["errors"], r["scored"]) == (ind["images"], ind["errors"], ind["scored"])
        assert r["images"] == n_images
        assert r["accuracy"] == pytest.approx(ind["accuracy"])
        assert r["confusion_matrix"] == ind["cm"]
        assert r["binary"]["roc_auc"] == pytest.approx(ind["auc"])
        assert r["calibration"]["ece"] == pytest.approx(ind["ece"], abs=1e-6)
        half = next(t for t in r["binary"]["thresholds"] if t["threshold"] == 0.5)
        assert (half["tp"], half["flagged"]) == (ind["tp_at_half"], ind["flagged_at_half"])
        assert sorted(e["path"] for e in r["error_rows"]) == ind["error_paths"]
        assert r["accuracy_all_images"] == pytest.approx(ind["accuracy"] * ind["scored"] / ind["images"])
    test = report["splits"]["test"]
    assert test["errors"] == 1 and test["error_rows"][0]["path"].endswith("test/mask/broken.jpg")
    assert test["error_rows"][0]["error"] == "truncated image"  # the scoring row's own reason, passed through
    md = storage.read_text(storage.join(evaluated["out"], "report.md"))
    assert report["model_id"] in md and evaluated["data"] in md and "**1 error rows**" in md


@pytest.mark.ray
def test_contact_sheets_decode_with_one_tile_per_requested_image(evaluated):
    for split in ("val", "test"):
        r = evaluated["report"]["splits"][split]
        sheet = r["contact_sheet"]
        assert sheet["tiles"] == min(6, r["scored"]) == len(sheet["paths"])
        png = storage.read_bytes(storage.join(evaluated["out"], f"contact_sheet_{split}.png"))
        tiles = [t for t in _tiles(png, sheet) if t != "empty"]
        assert len(tiles) == sheet["tiles"]
        wrong = min(_independent(evaluated["out"], split)["wrong"], sheet["tiles"])
        assert tiles == ["wrong"] * wrong + ["right"] * (sheet["tiles"] - wrong)  # misclassified first
        # crops without face annotations: no faces section, no boxed sheet, and report.json says why
        assert r["detection"]["annotations"] is None and f"boxes_{split}.png" not in r["files"]
        assert "### Faces" not in storage.read_text(storage.join(evaluated["out"], "report.md"))
        for name in ("confusion_matrix", "roc_pr", "reliability"):
            Image.open(io.BytesIO(storage.read_bytes(storage.join(evaluated["out"], f"{name}_{split}.png")))).verify()


@pytest.mark.ray
def test_bad_input_is_one_sentence(evaluated, tmp_path):
    from maskmodel.study.evaluation import EvalConfig, evaluate

    base = dict(model=evaluated["model"], data=evaluated["data"], output=str(tmp_path / "o"))
    with pytest.raises(UserError, match="no labelled images in split 'scene'"):
        evaluate(EvalConfig(**base, split=("scene",)))
    with pytest.raises(UserError, match="not a class of the model"):
        evaluate(EvalConfig(**base, roc_classes=("hat",)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError):
        evaluate(EvalConfig(**{**base, "output": str(tmp_path / "file" / "o")}))
    res = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--model", str(tmp_path / "nope"),
                          "--data", evaluated["data"], "--output", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "not a model directory" in res.stderr


@pytest.mark.ray
def test_synthetic_scene_split_gets_a_complete_detection_section(tmp_path, ray_local, capsys):
    """jobs.evaluate on the synthetic scene split (its scene.coco.json found by default). Scoring without a face
    stage writes no `faces` column: the section says so; with the face stage the same run has every number."""
    from jobs.evaluate import main
    from maskmodel.data.synth import DatasetConfig, write_dataset
    from maskmodel.study import detection_report

    data, model, out = str(tmp_path / "data"), str(tmp_path / "model"), str(tmp_path / "out")
    write_dataset(DatasetConfig(out=data, n_per_class=4, image_size=32, workers=2, incorrect_share=0.0))
    torch.manual_seed(5)
    save_model_dir(model, state_dict_bytes(build_model("resnet18", 2)),
                   ModelCard(arch="resnet18", classes=CLASSES, input_size=32, resize_size=37))
    # A manifest holding only the photos to evaluate, no split column (issue 27: it needed a training split).
    scene = sorted(os.path.relpath(os.path.join(d, f), data) for d, _, fs in os.walk(os.path.join(data, "scene"))
                   for f in fs)
    storage.write_text(os.path.join(data, "photos.csv"),
                       "path,label\n" + "".join(f"{p},{p.split(os.sep)[1]}\n" for p in scene))
    assert main(["--model", model, "--data", os.path.join(data, "photos.csv"), "--output", out, "--split", "scene",
                 "--max-tiles", "4"]) == 0
    printed = capsys.readouterr().out
    report = storage.read_json(os.path.join(out, "report.json"))
    det, md = report["splits"]["scene"]["detection"], storage.read_text(os.path.join(out, "report.md"))
    assert det["annotations"] == os.path.join(data, "scene.coco.json") and det["scored_images_not_annotated"] == 0
    assert "Faces: detection and per-face classification" in md
    scored = results.read_results(os.path.join(out, "scores"), run_ids=["scene"])
    face_stage = "faces" in scored.column_names
    if not face_stage:  # scoring without a face stage: the 'no boxes' path, not a crash
        assert det["available"] is False and det["reason"] == detection_report.NO_BOXES
        assert "no face boxes in the scored rows" in printed and "no face boxes in the scored rows" in md
        assert not os.path.exists(os.path.join(out, "boxes_scene.png"))
        scored = _with_true_faces(scored, det["annotations"])  # a perfect detector's rows: the joins line up
        det = detection_report.evaluate_detection(scored, det["annotations"], scored.column("path").to_pylist(),
                                                  CLASSES, ("no_mask",), iou=0.5, max_tiles=4, output=out,
                                                  split="scene")
        assert det["recall"] == det["precision"] == det["ap50"] == 1.0 and det["face_accuracy"] is not None
    coco = storage.read_json(os.path.join(data, "scene.coco.json"))
    assert det["available"] is True and det["images"] == len(coco["images"]) == 4
    assert det["faces"] == len(coco["annotations"])
    assert det["by_group"] and det["by_size"]
    for key in ("recall", "precision", "ap50", "ap", "face_accuracy", "image_accuracy", "by_group", "by_size"):
        assert key in det
    assert det["breakdown_by"] == "variant"
    assert sum(r["faces"] for r in det["by_group"]) == sum(r["faces"] for r in det["by_size"]) == det["faces"]
    if face_stage:  # printed by the job itself
        assert "detection recall" in printed and "AP50" in printed and "variant" in printed
    assert det["files"] == ["boxes_scene.png"]
    Image.open(os.path.join(out, "boxes_scene.png")).verify()


def _with_true_faces(table, annotations: str):
    """``table`` with the face stage's columns holding each image's annotated faces (score 1, the row's label)."""
    import pyarrow as pa

    from maskmodel.study.detection_report import load_truth

    truth, _ = load_truth(annotations, table.column("path").to_pylist())
    faces = [[{"x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3], "score": 1.0, "label": label, "confidence": 1.0,
               "probs": [1.0, 0.0]} for b in truth[p].boxes.tolist()]
             for p, label in zip(table.column("path").to_pylist(), table.column("label").to_pylist())]
    struct = pa.struct([*(pa.field(k, pa.float32()) for k in ("x0", "y0", "x1", "y1", "score")),
                        pa.field("label", pa.string()), pa.field("confidence", pa.float32()),
                        pa.field("probs", pa.list_(pa.float32()))])
    return (table.append_column("faces", pa.array(faces, pa.list_(struct)))
            .append_column("detector", pa.array(["centerface"] * table.num_rows)))


def test_a_photo_with_no_face_found_is_no_alert_not_a_crash():
    """An ok row without a label (the face stage found no face) joins as the compliant class (issue 27)."""
    import pyarrow as pa

    from maskmodel.results import prob_column
    from maskmodel.study.eval_scoring import join_rows

    classes = ["mask", "no_mask"]
    table = pa.table({"path": ["a.jpg", "b.jpg", "c.jpg"], "status": ["ok", "ok", "error"],
                      "error": [None, None, "truncated image"], "label": [None, "no_mask", None],
                      prob_column("mask"): [None, 0.2, None], prob_column("no_mask"): [None, 0.8, None]})
    joined = join_rows(table, {"a.jpg": 1, "b.jpg": 1, "c.jpg": 0}, classes, ("no_mask",))
    assert joined["ok"].tolist() == [True, True, False]
    assert joined["pred"].tolist() == [0, 1, -1]
    assert joined["probs"][0].tolist() == [1.0, 0.0]
    assert joined["errors"] == [{"path": "c.jpg", "error": "truncated image"}]
