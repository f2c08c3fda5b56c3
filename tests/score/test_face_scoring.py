"""The face stage of scoring, end to end: real photographs through jobs.score on real Ray and an S3 endpoint.

The photograph is matplotlib's ``sample_data/grace_hopper.jpg`` (one face, its
box drawn by hand in tests/models/test_detect.py). A two-face picture pastes real
faces (Grace Hopper's, and her face mirrored and scaled) into a larger canvas;
a no-face picture is smooth noise. The results table is read back by every
reader the docs show (the package's reader, DuckDB UNNEST, polars explode),
and a table written before the face columns existed is appended to and read.
"""

from __future__ import annotations

import dataclasses
import io
import uuid

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from maskmodel import results
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.io.decode import decode
from maskmodel.results import query
from maskmodel.score import scoring
from maskmodel.score.faces import run_options
from maskmodel.models.detect import DetectOptions
from maskmodel.score.scoring import ScoreConfig
from tests.models.test_detect import HOPPER_FACE, _iou
from tests.score.test_scoring import CLASSES, write_model

# Where the two pasted faces land in the 1280x720 two-face picture (x0, y0, x1, y1 of their face boxes).
PASTE_SCALES = (1.0, 0.6)
PASTE_AT = ((60, 40), (800, 300))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def _hopper() -> Image.Image:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return im.convert("RGB")


def two_faces() -> tuple[bytes, list[tuple[float, ...]]]:
    """A 1280x720 picture with Grace Hopper's face pasted twice (once mirrored and at 0.6 scale); and their boxes."""
    rng = np.random.default_rng(0)
    canvas = Image.fromarray((rng.random((720, 1280, 3)) * 60 + 120).astype(np.uint8))
    hopper, boxes = _hopper(), []
    cx0, cy0, cx1, cy1 = 150, 95, 390, 370  # the head with some margin (tests/models/test_detect.py's crop)
    head = hopper.crop((cx0, cy0, cx1, cy1))
    for k, (scale, (px, py)) in enumerate(zip(PASTE_SCALES, PASTE_AT)):
        im = head if k == 0 else head.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
        canvas.paste(im, (px, py))
        x0, y0, x1, y1 = HOPPER_FACE
        if k:  # mirrored: the face box mirrors inside the head crop
            x0, x1 = cx0 + cx1 - x1, cx0 + cx1 - x0
        boxes.append(tuple([px + (x0 - cx0) * scale, py + (y0 - cy0) * scale,
                            px + (x1 - cx0) * scale, py + (y1 - cy0) * scale]))
    return _jpeg(canvas), boxes


def no_face() -> bytes:
    rng = np.random.default_rng(1)
    small = (rng.random((12, 20, 3)) * 255).astype(np.uint8)
    return _jpeg(Image.fromarray(small).resize((640, 384), Image.BICUBIC))


# ----------------------------------------------------------------------------- no Ray


def test_decode_is_bounded_by_max_pixels_and_keeps_the_original_size():
    data = _jpeg(Image.new("RGB", (4000, 3000), (10, 20, 30)))
    d = decode(data, max_pixels=1_000_000)
    assert (d.width, d.height) == (4000, 3000)
    assert d.image.width * d.image.height <= 1_000_000 and d.image.width / d.image.height == pytest.approx(4 / 3, 0.01)
    assert decode(data).image.size == (4000, 3000)


def test_faces_flags_are_checked_at_the_door(tmp_path):
    base = {"input": str(tmp_path / "in"), "model": str(tmp_path / "m"), "output": str(tmp_path / "o")}
    with pytest.raises(ValueError, match="multiples of 32"):
        ScoreConfig(**base, detector_size="640x380")
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        ScoreConfig(**base, detector_size="big")
    with pytest.raises(ValueError, match="--decode gpu goes with --faces none"):
        ScoreConfig(**base, decode="gpu", num_gpus=1)
    assert ScoreConfig(**base).detect_options() == DetectOptions()
    assert ScoreConfig(**base, faces="rel/dir").faces == str(tmp_path.cwd() / "rel/dir")  # a URI made absolute
    storage.write_bytes(str(tmp_path / "in/a.jpg"), _jpeg(_hopper()))
    write_model(base["model"])
    for over, says in (({"faces": str(tmp_path / "nodir")}, "neither a known detector"),
                       ({"faces": "centerface", "detector_weights": str(tmp_path / "none.onnx")}, "do not exist"),
                       ({"faces": "auto", "detector_weights": base["model"] + "/model.json"}, "not a readable ONNX")):
        with pytest.raises(UserError, match=says):
            scoring.prepare(ScoreConfig(**base, **over))
    assert not storage.exists(base["output"])


def test_a_detector_cards_operating_point_applies_unless_a_flag_changes_it():
    card = DetectOptions(input_size=(320, 320), score_threshold=0.7, nms_iou=0.4)
    assert run_options(DetectOptions(), card) == card
    mine = run_options(DetectOptions(score_threshold=0.3, max_faces=2), card)
    assert (mine.score_threshold, mine.input_size, mine.nms_iou, mine.max_faces) == (0.3, (320, 320), 0.4, 2)


# ----------------------------------------------------------------------------- Ray + S3


@pytest.fixture(scope="module")
def photos(s3_endpoint, ray_local):
    import s3fs

    root = f"s3://faces-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False).mkdir(root[5:])
    images, model, out = f"{root}/images", f"{root}/model", f"{root}/out"
    write_model(model)
    pair, boxes = two_faces()
    storage.write_bytes(f"{images}/hopper.jpg", _jpeg(_hopper()))
    storage.write_bytes(f"{images}/pair.jpg", pair)
    storage.write_bytes(f"{images}/empty.jpg", no_face())
    storage.write_bytes(f"{images}/broken.jpg", b"\xff\xd8\xff not really")
    # A run written before the face columns and the alert verdict existed: the table's schema lacks them.
    old = pa.schema([f for f in results.results_schema(CLASSES)
                     if f.name not in ("faces", "faces_found", "faces_dropped", "detector", "alert")])
    writer = results.AttemptWriter(out, "old", old)
    writer.write(pa.Table.from_pylist([{"path": f"{images}/hopper.jpg", "status": "ok", "label": "mask",
                                        "confidence": 0.9, "p_mask": 0.9, "p_no_mask": 0.1, "model_id": "m0",
                                        "run_id": "old", "scored_at": results.utc_now()}], schema=old))
    results.commit(writer, meta={"counts": {"images": 1, "ok": 1, "errors": 0}, "model_id": "m0"})
    cfg = ScoreConfig(input=images, model=model, output=out, run_id="auto", precision="fp32", read_batch=2,
                      batch_size=4)
    res = scoring.score(cfg)
    explicit = scoring.score(dataclasses.replace(cfg, run_id="cf", faces="centerface"))
    none = scoring.score(dataclasses.replace(cfg, run_id="whole", faces="none"))
    table = results.read_results(out)
    rows = {(r["run_id"], r["path"].rsplit("/", 1)[1]): r for r in table.to_pylist()}
    return {"cfg": cfg, "rows": rows, "boxes": boxes, "results": (res, explicit, none), "table": table}


@pytest.mark.ray
def test_the_real_photograph_gets_its_face(photos):
    row = photos["rows"][("auto", "hopper.jpg")]
    assert row["status"] == "ok" and row["faces_found"] == 1 and row["detector"] == "centerface"
    (f,) = row["faces"]
    assert _iou((f["x0"], f["y0"], f["x1"], f["y1"]), HOPPER_FACE) >= 0.5
    # The row's verdict is its face's, and probs are in the run's class order (the commit's `classes`).
    assert (row["label"], row["confidence"]) == (f["label"], f["confidence"])
    assert [row["p_mask"], row["p_no_mask"]] == f["probs"] and f["label"] == CLASSES[int(np.argmax(f["probs"]))]
    assert (row["width"], row["height"]) == (512, 600)


@pytest.mark.ray
def test_two_pasted_faces_are_one_row_with_two_faces(photos):
    row = photos["rows"][("auto", "pair.jpg")]
    assert row["status"] == "ok" and row["faces_found"] == 2 and row["faces_dropped"] == 0
    found = [(f["x0"], f["y0"], f["x1"], f["y1"]) for f in row["faces"]]
    for box in photos["boxes"]:
        assert max(_iou(box, b) for b in found) >= 0.5, (box, found)
    assert row["faces"][0]["score"] >= row["faces"][1]["score"]
    assert sum(1 for (run, name) in photos["rows"] if run == "auto" and name == "pair.jpg") == 1


@pytest.mark.ray
def test_no_face_is_an_ok_row_whole_image_with_auto_unlabelled_with_a_named_detector(photos):
    rows = photos["rows"]
    auto, cf, whole = rows[("auto", "empty.jpg")], rows[("cf", "empty.jpg")], rows[("whole", "empty.jpg")]
    assert auto["status"] == "ok" and auto["faces"] == [] and auto["faces_found"] == 0 and auto["detector"] == "none"
    # The same whole image, classified as a crop; `none` decodes it at a reduced DCT scale, `auto` whole: close.
    assert auto["label"] is not None and auto["p_mask"] == pytest.approx(whole["p_mask"], abs=0.01)
    assert cf["status"] == "ok" and cf["faces_found"] == 0 and cf["detector"] == "centerface"
    assert cf["label"] is None and cf["confidence"] is None and cf["p_mask"] is None
    assert whole["faces"] == [] and whole["detector"] == "none" and whole["label"] is not None
    assert rows[("cf", "hopper.jpg")]["faces_found"] == 1 and rows[("whole", "hopper.jpg")]["faces_found"] == 0
    for run in ("auto", "cf", "whole"):
        broken = rows[(run, "broken.jpg")]
        assert broken["status"] == "error" and broken["faces"] is None and broken["faces_found"] is None
        assert broken["alert"] is None  # an error row has no verdict
    # The verdict column: alert when the deciding label is an alert class; no face found and no fallback: no alert.
    for (run, _), row in rows.items():
        if run != "old" and row["status"] == "ok":
            assert row["alert"] is (row["label"] == "no_mask"), row
    assert cf["alert"] is False and rows[("old", "hopper.jpg")]["alert"] is None
    assert [r.ok for r in photos["results"]] == [3, 3, 3]


@pytest.mark.ray
def test_an_old_table_is_appended_to_and_every_reader_sees_the_faces(photos):
    import polars as pl

    old = photos["rows"][("old", "hopper.jpg")]
    assert old["faces"] is None and old["detector"] is None and old["label"] == "mask"
    out = photos["cfg"].output
    per_face = query.query(out, "SELECT path, f.label, f.score FROM predictions, UNNEST(faces) AS t(f) "
                                "WHERE run_id = 'auto' ORDER BY path")
    assert per_face.num_rows == 3  # hopper's one face and the pair's two
    counts = query.query(out, "SELECT run_id, count(*) AS n, sum(faces_found) AS faces FROM predictions "
                              "GROUP BY run_id ORDER BY run_id").to_pylist()
    assert {r["run_id"]: r["faces"] for r in counts} == {"auto": 3, "cf": 3, "old": None, "whole": 0}
    df = (pl.from_arrow(photos["table"]).filter(pl.col("run_id") == "auto").select("path", "faces")
          .explode("faces").unnest("faces"))  # the polars query of docs/scoring.md
    assert df.filter(pl.col("score").is_not_null()).height == 3
    meta = {r.run_id: r.raw for r in results.list_commits(out)}
    assert meta["auto"]["classes"] == list(CLASSES) and meta["auto"]["detector"] == "centerface"


@pytest.mark.ray
def test_each_commit_carries_the_profile_folded_while_scoring(photos):
    from maskmodel.results import profile

    records = {r.run_id: r for r in results.list_commits(photos["cfg"].output)}
    for run in ("auto", "cf", "whole"):
        got = records[run].raw["profile"]
        # computed batch by batch while scoring; re-reading the committed rows gives the same counts
        again = profile.batch_profile(results.read_results(photos["cfg"].output, [run]), alert_classes=("no_mask",),
                                      detected=run != "whole")
        for key in ("images", "ok", "errors", "error_reasons", "labels", "no_face", "alerts", "faces",
                    "photos_with_faces", "faces_per_photo", "face_labels", "confidence", "sizes", "pixels", "bytes"):
            assert got[key] == again[key], (run, key)
        assert got["elapsed_s"] > 0 and got["images_per_s"] > 0 and got["cost"]["actors"] >= 1
        assert got["cost"]["cluster_cpu_s"] == pytest.approx(2 * got["elapsed_s"])  # ray_local: 2 CPUs
    auto = records["auto"].raw["profile"]
    assert (auto["images"], auto["errors"], auto["error_reasons"]) == (4, 1, {"truncated image": 1})
    # empty.jpg: no face found; with --faces auto it still gets a verdict from the whole picture
    assert auto["faces_per_photo"][:3] == [1, 1, 1] and auto["no_face"] == 1 and sum(auto["labels"].values()) == 3
    assert records["cf"].raw["profile"]["no_face"] == 1 and sum(records["cf"].raw["profile"]["labels"].values()) == 2
    whole = records["whole"].raw["profile"]  # --faces none: each picture is its own face, no detector looked
    assert (whole["no_face"], whole["photos_with_faces"], sum(whole["labels"].values())) == (0, 0, 3)


@pytest.mark.ray
def test_incremental_does_not_rescore_images_scored_without_faces(photos):
    cfg = dataclasses.replace(photos["cfg"], run_id="again", incremental=True)
    res = scoring.score(cfg)
    assert res.images == 0 and res.skipped == 4  # the policy: a new run id without --incremental rescores


def test_job_exits_2_with_one_sentence_for_a_bad_detector(tmp_path):
    import os
    import subprocess
    import sys

    storage.write_bytes(str(tmp_path / "in/a.jpg"), _jpeg(_hopper()))
    write_model(str(tmp_path / "m"))
    base = ["-m", "jobs.score", "--input", str(tmp_path / "in"), "--model", str(tmp_path / "m"), "--output",
            str(tmp_path / "o")]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for extra, says in ((["--faces", str(tmp_path / "nodir")], "error: "),
                        (["--detector-size", "600x384"], "multiples of 32")):
        res = subprocess.run([sys.executable, *base, *extra], cwd=repo, capture_output=True, text=True, timeout=120)
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and says in last and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o")
