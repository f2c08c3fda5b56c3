"""The detection section of jobs.evaluate: hand-built scoring rows (the face stage's columns) against hand-built
annotations, every number checked against a hand count; the boxed sheet read back pixel by pixel. No Ray."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from maskmodel.data.annotations import ImageBoxes, write_coco
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.study import detection_report as dr
from maskmodel.study import eval_reports

CLASSES = ("mask", "no_mask")
FACE = pa.struct([("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32()),
                  ("score", pa.float32()), ("label", pa.string()), ("confidence", pa.float32()),
                  ("probs", pa.list_(pa.float32()))])


def _face(box, score, label):
    p = 0.8 if label == "no_mask" else 0.2
    return dict(zip(("x0", "y0", "x1", "y1"), box), score=score, label=label, confidence=max(p, 1 - p),
                probs=[1 - p, p])


def _rows(rows: list[dict], *, faces: bool = True) -> pa.Table:
    """A results table as the face stage writes it: one row per image, ``faces`` a list of structs."""
    cols = {"path": pa.array([r["path"] for r in rows]), "status": pa.array([r["status"] for r in rows]),
            "label": pa.array([r.get("label") for r in rows], pa.string())}
    if faces:
        cols["faces"] = pa.array([r.get("faces", []) for r in rows], pa.list_(FACE))
        # the whole-image fallback says faces_found = 0, detector = 'none'
        cols["faces_found"] = pa.array([0 if r.get("detector") == "none" else len(r.get("faces") or [])
                                        for r in rows], pa.int32())
        cols["faces_dropped"] = pa.array([0] * len(rows), pa.int32())
        cols["detector"] = pa.array([r.get("detector", "centerface") for r in rows], pa.string())
    return pa.table(cols)


def _truth(root: str) -> dict[str, ImageBoxes]:
    """Four annotated images (a, b: faces; c: none; d: one face, an error row)."""
    def rec(name, size, boxes, classes, variants, label=None):
        return ImageBoxes(path=os.path.join(root, name), width=size, height=size,
                          boxes=np.array(boxes, np.float32).reshape(-1, 4), classes=tuple(classes),
                          labels=("face",) * len(classes), attributes=tuple({"variant": v} for v in variants),
                          extra={"label": label} if label else {})
    recs = [rec("a.jpg", 224, [(10, 10, 50, 50), (100, 100, 120, 120), (60, 10, 160, 110)],
                ("no_mask", "mask", "mask"), ("plain", "surgical", "n95"), "no_mask"),
            rec("b.jpg", 224, [(20, 20, 60, 60)], ("mask",), ("cloth",), "mask"),
            rec("c.jpg", 224, [], (), (), "mask"),
            rec("d.jpg", 224, [(10, 10, 40, 40)], ("no_mask",), ("hand",))]  # no image label: from its faces
    return {r.path: r for r in recs}


def _scored(root: str, *, faces: bool = True) -> pa.Table:
    a, b, c, d = (os.path.join(root, n) for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"))
    return _rows([
        # face 0 found and right, face 2 found with the wrong class, face 1 missed, one false detection
        {"path": a, "status": "ok", "label": "no_mask",
         "faces": [_face((14, 14, 50, 50), 0.9, "no_mask"), _face((60, 12, 158, 110), 0.8, "no_mask"),
                   _face((150, 150, 190, 190), 0.7, "mask")]},
        {"path": b, "status": "ok", "label": "mask", "faces": [_face((20, 20, 60, 60), 0.95, "mask")]},
        # no face found: classified whole (the fallback); its box is no detection
        {"path": c, "status": "ok", "label": "no_mask", "detector": "none",
         "faces": [_face((0, 0, 224, 224), 1.0, "no_mask")]},
        {"path": d, "status": "error", "label": None, "faces": None, "detector": None},
    ], faces=faces)


def test_numbers_equal_a_hand_count(tmp_path):
    truth = _truth(str(tmp_path))
    section, images = dr.detection_section(truth, dr.face_rows(_scored(str(tmp_path))), CLASSES, ("no_mask",))
    assert section["available"] and section["iou"] == 0.5
    assert (section["images"], section["error_rows"], section["whole_image_rows"]) == (4, 1, 1)
    assert (section["faces"], section["detections"], section["matched"]) == (5, 4, 3)
    assert section["recall"] == pytest.approx(3 / 5) and section["precision"] == pytest.approx(3 / 4)
    # pycocotools, 101 recall points: precision 1 up to recall 0.6 (B .95, A .9, A .8 right; then a false one)
    assert section["ap50"] == pytest.approx(61 / 101, abs=1e-6)
    assert 0 < section["ap"] < section["ap50"]  # a's first face overlaps at IoU 0.81 only
    assert (section["classified"], section["face_accuracy"]) == (3, pytest.approx(2 / 3))
    assert section["found_and_right"] == pytest.approx(2 / 5)
    # verdicts: a alert/alert right, b right, c flagged but not an alert (wrong), d an error row (wrong)
    assert section["image_accuracy"] == pytest.approx(0.5)
    assert section["image_alerts"] == {"true": 2, "flagged": 2, "tp": 1, "recall": 0.5, "precision": 0.5}
    assert section["breakdown_by"] == "variant"
    table = {r["variant"]: (r["faces"], r["found"], r["classified"], r["right"], r["accuracy"])
             for r in section["by_group"]}
    assert [r["variant"] for r in section["by_group"]] == ["plain", "surgical", "n95", "cloth", "hand"]
    assert table == {"plain": (1, 1, 1, 1, 1.0), "surgical": (1, 0, 0, 0, None), "n95": (1, 1, 1, 0, 0.0),
                     "cloth": (1, 1, 1, 1, 1.0), "hand": (1, 0, 0, 0, None)}
    sizes = {r["size"]: (r["faces"], r["found"], r["right"]) for r in section["by_size"]}
    assert [r["size"] for r in section["by_size"]] == ["<32", "32-64", "64-128"]
    assert sizes == {"<32": (2, 0, 0), "32-64": (2, 2, 2), "64-128": (1, 1, 0)}
    first = images[0]
    assert [k for _, k in first["boxes"]] == ["right", "missed", "wrong", "false"]
    assert first["boxes"][1][0] == (100, 100, 120, 120)        # a missed face: its annotated box
    assert first["boxes"][2][0] == (60, 12, 158, 110)          # a found face: the detector's box
    assert [im["path"].rsplit("/", 1)[1] for im in dr.sheet_order(images, 3)] == ["a.jpg", "d.jpg", "c.jpg"]


def test_breakdown_falls_back_to_the_class_and_sizes_bin_at_their_edges(tmp_path):
    truth = {k: ImageBoxes(**{**v.__dict__, "attributes": ()}) for k, v in _truth(str(tmp_path)).items()}
    section, _ = dr.detection_section(truth, dr.face_rows(_scored(str(tmp_path))), CLASSES, ("no_mask",))
    assert section["breakdown_by"] == "class"
    assert {r["class"]: (r["faces"], r["found"], r["right"]) for r in section["by_group"]} == \
        {"mask": (3, 2, 1), "no_mask": (2, 1, 1)}
    assert [dr.size_bin(s) for s in (31.9, 32, 64, 255.9, 256, 4000)] == \
        ["<32", "32-64", "64-128", "128-256", ">=256", ">=256"]


def test_rows_without_a_faces_column_give_the_no_boxes_section(tmp_path):
    section, images = dr.detection_section(_truth(str(tmp_path)), dr.face_rows(_scored(str(tmp_path), faces=False)),
                                           CLASSES, ("no_mask",))
    assert section == {"available": False, "reason": dr.NO_BOXES, "images": 4} and images == []
    md = "\n".join(eval_reports.detection_markdown(section, "scene", "no_mask"))
    assert "no face boxes in the scored rows" in md


def _write_images(root: str) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        buf = io.BytesIO()
        Image.new("RGB", (224, 224), (128, 128, 128)).save(buf, "PNG")  # lossless: exact colours on the sheet
        storage.write_bytes(os.path.join(root, name), buf.getvalue())


def test_boxed_sheet_draws_each_kind_in_its_colour_under_a_legend(tmp_path):
    root = str(tmp_path)
    _write_images(root)
    _, images = dr.detection_section(_truth(root), dr.face_rows(_scored(root)), CLASSES, ("no_mask",))
    png, layout = dr.boxed_sheet(images, 2)
    sheet = Image.open(io.BytesIO(png)).convert("RGB")
    assert layout["tiles"] == 2 and layout["legend_height"] == eval_reports.LEGEND
    assert sheet.size == (layout["width"], eval_reports.LEGEND + layout["tile_height"])
    assert layout["paths"] == [os.path.join(root, "a.jpg"), os.path.join(root, "d.jpg")]
    # Tile 0 is a.jpg at scale 1 (224 px in a 224 px tile): each box's left edge, halfway down, in its colour.
    ox, oy = eval_reports.BORDER, eval_reports.LEGEND + eval_reports.BORDER
    for (x0, y0, x1, y1), kind in images[0]["boxes"]:
        assert sheet.getpixel((ox + round(x0), oy + round((y0 + y1) / 2))) == eval_reports.BOX_COLORS[kind], kind
    assert sheet.getpixel((ox + 80, oy + 180)) == (128, 128, 128)  # no box there
    # tile borders: a.jpg's verdict right, d.jpg (an error row) wrong
    assert sheet.getpixel((1, eval_reports.LEGEND + 1)) == eval_reports.RIGHT_COLOR
    assert sheet.getpixel((layout["tile_width"] + 1, eval_reports.LEGEND + 1)) == eval_reports.WRONG_COLOR
    legend = np.asarray(sheet.crop((0, 0, sheet.width, eval_reports.LEGEND))).reshape(-1, 3)
    for color in eval_reports.BOX_COLORS.values():  # every colour has its swatch
        assert (legend == color).all(1).any()


def test_evaluate_detection_reads_coco_and_writes_the_sheet(tmp_path):
    root, out = str(tmp_path / "data"), str(tmp_path / "out")
    _write_images(root)
    truth = _truth(root)
    write_coco(truth.values(), os.path.join(root, "scene.coco.json"), categories=CLASSES)
    assert dr.default_annotations(root, "scene") == os.path.join(root, "scene.coco.json")
    assert dr.default_annotations(root, "test") is None
    paths = [*truth, os.path.join(root, "unannotated.jpg")]
    section = dr.evaluate_detection(_scored(root), dr.default_annotations(root, "scene"), paths, CLASSES,
                                    "no_mask", iou=0.5, max_tiles=8, output=out, split="scene")
    assert (section["matched"], section["faces"], section["scored_images_not_annotated"]) == (3, 5, 1)
    assert section["files"] == ["boxes_scene.png"] and section["contact_sheet"]["tiles"] == 4
    Image.open(os.path.join(out, "boxes_scene.png")).verify()
    md = "\n".join(eval_reports.detection_markdown(section, "scene", "no_mask"))
    assert "| surgical | 1 | 0 | 0.0000 |" in md and "boxes_scene.png" in md
    none = dr.evaluate_detection(_scored(root, faces=False), dr.default_annotations(root, "scene"), paths, CLASSES,
                                 "no_mask", iou=0.5, max_tiles=8, output=str(tmp_path / "o2"), split="scene")
    assert none["available"] is False and not os.path.exists(tmp_path / "o2" / "boxes_scene.png")
    unannotated = dr.evaluate_detection(_scored(root), None, paths, CLASSES, ("no_mask",), iou=0.5, max_tiles=8,
                                        output=out, split="val")
    assert unannotated["available"] is False and unannotated["annotations"] is None


def test_face_options_reach_scoring_only_when_it_has_them(tmp_path):
    import dataclasses

    from maskmodel.score.plan import ScoreConfig
    from maskmodel.study.eval_scoring import score_config
    from maskmodel.study.evaluation import EvalConfig

    base = dict(model=str(tmp_path / "m"), data=str(tmp_path / "d"), output=str(tmp_path / "o"))
    cfg = EvalConfig(**base, faces="none")
    if "faces" in {f.name for f in dataclasses.fields(ScoreConfig)}:  # the face stage is in
        assert score_config(cfg, "m.parquet", "s", "scene").faces == "none"
    else:
        assert score_config(EvalConfig(**base), "m.parquet", "s", "scene").run_id == "scene"
        with pytest.raises(UserError, match="--faces needs scoring with a face stage"):
            score_config(cfg, "m.parquet", "s", "scene")


def test_faces_none_says_there_are_no_face_boxes_to_compare(tmp_path, caplog):
    """Scored whole (--faces none), the annotated faces have nothing to be compared with: the section, the printed
    line and report.md say so instead of 'detection recall 0.0000 (0/N faces found)' (issue 27)."""
    from jobs.evaluate import _detection_lines

    root, out = str(tmp_path / "data"), str(tmp_path / "out")
    _write_images(root)
    truth = _truth(root)
    write_coco(truth.values(), os.path.join(root, "scene.coco.json"), categories=CLASSES)
    whole = _rows([{"path": p, "status": "ok", "label": "mask", "detector": "none", "faces": []} for p in truth])
    section = dr.evaluate_detection(whole, os.path.join(root, "scene.coco.json"), list(truth), CLASSES, "no_mask",
                                    iou=0.5, max_tiles=8, output=out, split="scene", faces="none")
    assert section["available"] is False and section["reason"] == dr.NO_FACE_STAGE and section["images"] == 4
    assert "recall" not in section and not os.path.exists(os.path.join(out, "boxes_scene.png"))
    printed = _detection_lines("scene", section)
    assert printed == [f"scene faces: {dr.NO_FACE_STAGE}"] and "no face boxes to compare" in printed[0]
    md = "\n".join(eval_reports.detection_markdown(section, "scene", "no_mask"))
    assert "no face boxes to compare" in md and "detection recall" not in md


def test_the_logged_headline_is_the_printed_one(tmp_path, caplog):
    """The log line carries the printed figures, rounded alike: 4 decimals, n/a for an undefined one (no detection:
    no precision), never a made-up 0 or pycocotools' -1."""
    from jobs.evaluate import _detection_lines

    root = str(tmp_path / "data")
    _write_images(root)
    truth = _truth(root)
    write_coco(truth.values(), os.path.join(root, "scene.coco.json"), categories=CLASSES)
    nothing_found = _rows([{"path": p, "status": "ok", "label": "mask", "faces": []} for p in truth])
    with caplog.at_level("INFO", logger="maskmodel.study.detection_report"):
        section = dr.evaluate_detection(nothing_found, os.path.join(root, "scene.coco.json"), list(truth), CLASSES,
                                        "no_mask", iou=0.5, max_tiles=8, output=str(tmp_path / "o"), split="scene")
    headline = _detection_lines("scene", section)[0]
    assert "precision n/a" in headline and "recall 0.0000" in headline and "-1" not in headline
    assert f"INFO {headline}" in [f"{r.levelname} {r.getMessage()}" for r in caplog.records]
    empty = dr.detection_section({p: r for p, r in truth.items() if not len(r)}, dr.face_rows(nothing_found),
                                 CLASSES, "no_mask")[0]
    assert empty["ap50"] is None and empty["ap"] is None and empty["recall"] is None  # no annotated face at all


def test_annotations_that_match_no_scored_photo_are_an_error_naming_the_folder(tmp_path, caplog):
    """A VOC folder whose xml name photos next to themselves while the photos are elsewhere matches nothing: one
    sentence naming the folder looked in and the first photo, not a silent '0/0 faces found'; a partial match
    is a warning with the count."""
    root = str(tmp_path / "data")
    _write_images(root)
    truth = _truth(root)
    records = list(truth.values())
    elsewhere = [ImageBoxes(path=os.path.join(root, "annotations", os.path.basename(r.path)), width=r.width,
                            height=r.height, boxes=r.boxes, classes=r.classes, labels=r.labels) for r in records]
    with pytest.raises(UserError, match=r"None of the 4 photo\(s\) annotated in 'x.xml' is among the 4 photo\(s\) "
                                        r"of split\(s\) scene .*the first, '.*/annotations/a.jpg', was looked for in "
                                        r"the folder '.*/data/annotations' \(no such file\)"):
        dr.check_matched("x.xml", elsewhere, set(truth), ["scene"])
    with caplog.at_level("WARNING", logger="maskmodel.study.detection_report"):
        assert dr.check_matched("x.xml", records + elsewhere[:1], set(truth), ["scene"]) == 4
    assert any("1 of the 5 photo(s) annotated in x.xml are not among the photos of split(s) scene" in r.getMessage()
               for r in caplog.records)
    assert dr.check_matched("x.xml", [], set(truth), ["scene"]) == 0  # nothing annotated: nothing to match
