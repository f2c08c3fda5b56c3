"""jobs.review: export the faces the model doubts, import reviewers' corrections (Label Studio, CVAT's COCO)."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from maskmodel import results
from maskmodel.data import lineage
from maskmodel.data.annotations import read_coco
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.models.detect.card import DetectorCard
from maskmodel.study.review import COCO, CONFIG, MANIFEST, TASKS, ReviewExportConfig, export_review
from maskmodel.study.review_import import ReviewImportConfig, compare, import_review

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ["mask", "no_mask"]
W, H = 160, 120


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _face(box, p_mask, score=0.9):
    probs = [p_mask, 1 - p_mask]
    best = int(np.argmax(probs))
    return {"x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3], "score": score, "label": CLASSES[best],
            "confidence": probs[best], "probs": probs}


#: photo name -> its faces as the model had them (box in pixels, p(mask))
PHOTOS = {
    "a.jpg": [((10, 10, 50, 60), 0.52), ((80, 20, 120, 70), 0.97)],  # face 0: margin 0.04, the least confident
    "b.jpg": [((30, 30, 90, 100), 0.35)],                             # margin 0.30, an alert (no_mask)
    "c.jpg": [((0, 0, 40, 40), 0.99)],                                # confident
}


def scored_table(root: str) -> tuple[str, str]:
    """Photos under ``root``/photos (and one in a tar), scored by one committed run; returns (results, archive)."""
    rows = []
    for n, (name, faces) in enumerate(PHOTOS.items()):
        uri = storage.join(root, "photos", name)
        storage.write_bytes(uri, _jpeg(n))
        rows.append({"path": uri, "archive": None, "member": None, "version": storage.info(uri).version,
                     "faces": [_face(b, p) for b, p in faces]})
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        data = _jpeg(9)
        info = tarfile.TarInfo("cam1/d.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive = storage.join(root, "shards", "s0.tar")
    storage.write_bytes(archive, tar_buf.getvalue())
    rows.append({"path": archive + "#cam1/d.jpg", "archive": archive, "member": "cam1/d.jpg",
                 "version": storage.info(archive).version, "faces": [_face((60, 40, 100, 90), 0.45)]})
    for r in rows:
        r.update(status="ok", width=W, height=H, faces_found=len(r["faces"]), model_id="model-a", run_id="r1",
                 scored_at=dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc), label="mask", confidence=0.9)
    out = storage.join(root, "scores")
    w = results.AttemptWriter(out, "r1", results.results_schema(CLASSES))
    w.write(pa.Table.from_pylist(rows))
    results.commit(w, meta={"model_id": "model-a", "classes": CLASSES, "counts": {"images": len(rows)}})
    return out, archive


def test_export_orders_by_margin_and_writes_label_studio_coco_and_manifest(tmp_path):
    out, archive = scored_table(str(tmp_path))
    with pytest.raises(UserError, match="archive member.*--review-folder"):
        export_review(ReviewExportConfig(results=out, output=str(tmp_path / "x"), least_confident=10))
    s = export_review(ReviewExportConfig(results=out, output=str(tmp_path / "rev"), least_confident=2,
                                         alerts=True, review_folder=str(tmp_path / "copies")))
    assert (s.photos, s.faces, s.boxes) == (3, 3, 4) and s.by_reason == {"least_confident": 2, "alert": 1}
    tasks = json.loads((tmp_path / "rev" / TASKS).read_text())
    # least confident first: a.jpg face 0 (margin 0.04), then the member (0.10), then b.jpg behind an alert
    assert [t["data"]["path"][len(str(tmp_path)) + 1:] for t in tasks] == [
        "photos/a.jpg", "shards/s0.tar#cam1/d.jpg", "photos/b.jpg"]
    a = tasks[0]
    assert a["data"]["review"] == [{"face": 0, "reason": "least_confident", "margin": pytest.approx(0.04, abs=1e-3)}]
    assert a["data"]["model_id"] == "model-a" and a["data"]["run_id"] == "r1" and a["data"]["version"]
    assert a["data"]["image"] == a["data"]["path"]  # no --presign: the object's own URI
    r0, r1 = a["predictions"][0]["result"]
    assert a["predictions"][0]["model_version"] == "model-a"
    assert r0["id"] == "face0" and r0["type"] == "rectanglelabels"
    assert (r0["original_width"], r0["original_height"]) == (W, H)
    assert r0["value"]["x"] == pytest.approx(100 * 10 / W) and r0["value"]["width"] == pytest.approx(100 * 40 / W)
    assert r0["value"]["y"] == pytest.approx(100 * 10 / H) and r0["value"]["height"] == pytest.approx(100 * 50 / H)
    assert r0["value"]["rectanglelabels"] == ["mask"] and r0["score"] == pytest.approx(0.52)
    assert r1["value"]["rectanglelabels"] == ["mask"]  # the confident face of the photo is pre-annotated too
    # The archive member is a file a labelling tool can open, with the member's bytes.
    member = tasks[1]["data"]["image"]
    assert member.startswith(str(tmp_path / "copies")) and storage.read_bytes(member)[:2] == b"\xff\xd8"
    assert tasks[1]["data"]["version"] == storage.info(archive).version
    config = (tmp_path / "rev" / CONFIG).read_text()
    assert '<RectangleLabels name="label" toName="image">' in config and '<Label value="no_mask"/>' in config
    coco = read_coco(str(tmp_path / "rev" / COCO))
    assert [len(r) for r in coco] == [2, 1, 1] and coco[0].classes == ("mask", "mask")
    assert coco[0].boxes[0].tolist() == [10, 10, 50, 60] and coco[0].attributes[0]["score"] == pytest.approx(0.52)
    assert coco[1].path == member and coco[0].extra["maskmodel_version"] == a["data"]["version"]
    # --random: a seeded sample of the faces not otherwise picked
    r = export_review(ReviewExportConfig(results=out, output=str(tmp_path / "r2"), least_confident=1, random=2,
                                         seed=3, review_folder=str(tmp_path / "copies")))
    again = export_review(ReviewExportConfig(results=out, output=str(tmp_path / "r3"), least_confident=1, random=2,
                                             seed=3, review_folder=str(tmp_path / "copies")))
    assert r.by_reason == {"least_confident": 1, "random": 2}
    assert (tmp_path / "r2" / TASKS).read_text() == (tmp_path / "r3" / TASKS).read_text() and again.faces == 3
    only = export_review(ReviewExportConfig(results=out, output=str(tmp_path / "r5"), least_confident=0, random=1,
                                            where="path NOT LIKE '%.tar#%'"))
    assert only.by_reason == {"random": 1} and only.photos == 1
    with pytest.raises(UserError, match="query failed"):
        export_review(ReviewExportConfig(results=out, output=str(tmp_path / "r4"), where="no_such_column > 1"))


def _rect(rid, box, cls, origin="manual"):
    """One rectangle as Label Studio exports it: percent of the original image (written out here, not through
    maskmodel.data.labelstudio, so that the test checks the conversion instead of repeating it)."""
    x0, y0, x1, y1 = box
    return {"id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image", "origin": origin,
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x0 / W * 100, "y": y0 / H * 100, "width": (x1 - x0) / W * 100,
                      "height": (y1 - y0) / H * 100, "rotation": 0, "rectanglelabels": [cls]}}


def _annotation(aid, result, updated_at, cancelled=False):
    return {"id": aid, "completed_by": 1, "result": result, "was_cancelled": cancelled, "ground_truth": False,
            "created_at": "2025-03-02T08:00:00.000000Z", "updated_at": updated_at, "lead_time": 12.5,
            "prediction": {}, "result_count": 0, "task": None, "project": 1, "parent_prediction": 1,
            "parent_annotation": None, "last_action": None}


def label_studio_export(manifest: dict) -> list[dict]:
    """What Label Studio's JSON export holds after reviewers worked on the exported tasks (its documented format:
    https://labelstud.io/guide/export#Label-Studio-JSON-format-of-annotated-tasks), with these corrections:
    a.jpg face 0 relabelled no_mask, face 1 kept, one face added (an older annotation and a cancelled one do not
    count); the member's face deleted; b.jpg not annotated; c.jpg annotated but replaced since."""
    photos = {p["path"].rsplit("/", 1)[-1]: p for p in manifest["photos"]}
    out = []
    for n, (name, p) in enumerate(photos.items(), start=1):
        task = {"id": n, "data": {"image": p["image"], "path": p["path"], "version": p["version"],
                                  "run_id": "r1", "model_id": "model-a"},
                "annotations": [], "predictions": [n], "meta": {}, "created_at": "2025-03-02T07:00:00Z",
                "updated_at": "2025-03-02T09:00:00Z", "inner_id": n, "total_annotations": 0,
                "cancelled_annotations": 0, "total_predictions": 1, "project": 1, "file_upload": None}
        if name == "a.jpg":
            task["annotations"] = [
                _annotation(11, [_rect("face0", (10, 10, 50, 60), "mask", "prediction")], "2025-03-02T08:05:00Z"),
                _annotation(12, [_rect("face0", (10, 10, 50, 60), "no_mask", "prediction-changed"),
                                 _rect("face1", (80, 20, 120, 70), "mask", "prediction"),
                                 _rect("Xk3a9", (130, 60, 158, 100), "no_mask")], "2025-03-02T08:30:00.123456Z"),
                _annotation(13, [], "2025-03-02T09:00:00Z", cancelled=True)]
        elif name == "d.jpg":
            task["annotations"] = [_annotation(14, [], "2025-03-02T08:40:00Z")]
        elif name == "c.jpg":
            task["annotations"] = [_annotation(15, [_rect("face0", (0, 0, 40, 40), "no_mask")],
                                               "2025-03-02T08:50:00Z")]
        out.append(task)
    return out


@pytest.mark.timeout(120)
def test_round_trip_on_s3_presigned_url_label_studio_export_import_and_train(s3_bucket, tmp_path):
    out, _ = scored_table(s3_bucket)
    exported = s3_bucket + "/review/r1"
    s = export_review(ReviewExportConfig(results=out, output=exported, least_confident=10, presign=600,
                                         review_folder=s3_bucket + "/review/r1/images"))
    assert s.photos == 4 and s.expiry
    tasks = storage.read_json(storage.join(exported, TASKS))
    url = tasks[0]["data"]["image"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert url.startswith("http://127.0.0.1:") and ("Signature" in query or "X-Amz-Signature" in query)
    expires = int(query["X-Amz-Expires"][0]) if "X-Amz-Expires" in query else \
        int(query["Expires"][0]) - int(dt.datetime.now(dt.timezone.utc).timestamp())
    assert 590 <= expires <= 600
    with urllib.request.urlopen(url, timeout=10) as r:  # the moto server, over HTTP, without credentials
        assert r.read() == storage.read_bytes(tasks[0]["data"]["path"])
    manifest = storage.read_json(storage.join(exported, MANIFEST))
    assert "X-Amz" not in json.dumps(manifest)  # the presigned URL is in tasks.json only
    reviewed = label_studio_export(manifest)
    storage.write_bytes(storage.join(s3_bucket, "photos", "c.jpg"), _jpeg(42))  # replaced after the export
    storage.write_json(str(tmp_path / "ls-export.json"), reviewed)
    labels = s3_bucket + "/labels/set1.json"
    got = import_review(ReviewImportConfig(reviewed=str(tmp_path / "ls-export.json"), exported=exported,
                                           output=labels))
    assert (got.faces["relabelled"], got.faces["added"], got.faces["kept"], got.faces["deleted"]) == (1, 1, 1, 1)
    assert got.reviewed == 2 and got.unreviewed == 1 and [p.rsplit("/", 1)[-1] for p in got.skipped] == ["c.jpg"]
    assert "c.jpg" in got.summary_line() and got.photos == 2
    records = {r.extra["maskmodel_path"].rsplit("/", 1)[-1]: r for r in read_coco(labels)}
    assert set(records) == {"a.jpg", "d.jpg"}
    a, d = records["a.jpg"], records["d.jpg"]
    assert a.classes == ("no_mask", "mask", "no_mask") and len(d) == 0  # the deleted face: a negative photo
    np.testing.assert_allclose(a.boxes, [[10, 10, 50, 60], [80, 20, 120, 70], [130, 60, 158, 100]], atol=0.01)
    assert a.extra["updated_at"].startswith("2025-03-02T08:30:00.123456") and a.extra["task_id"] == 1
    assert d.path.startswith(s3_bucket + "/review/r1/images/")  # the member's copy: a file training can read
    assert storage.read_bytes(d.path)[:2] == b"\xff\xd8"
    _train_one_epoch(labels, tmp_path)


def _train_one_epoch(labels: str, tmp_path) -> None:
    """One epoch of the face detector's own training step over the imported set, as jobs.train_detector reads it
    (read_coco, its DecodeBoxes and collate, detector_step); in process, as the Ray Train job costs a minute here."""
    import torch

    from maskmodel.data.boxes import DecodeBoxes
    from maskmodel.models.detect import trainable
    from maskmodel.train import detection
    from maskmodel.train.config import DetectTrainConfig
    from maskmodel.train.detect_loop import collate, detector_step

    records = read_coco(labels)
    prep = DecodeBoxes(size=64)
    parts = [prep.one(storage.read_bytes(r.path), r.boxes) for r in records]
    batch = collate(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
                    np.array([p[2] for p in parts]), centernet=True)
    assert batch["n_boxes"].tolist() == [len(r) for r in records]
    net = trainable.initial("centerface", "none", storage.read_bytes).train()
    before = [p.detach().clone() for p in net.parameters()]
    sums = detector_step(net, batch, torch.optim.AdamW(net.parameters(), lr=1e-3))
    assert torch.isfinite(sums).all() and sums[1] == len(records)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    # Lineage: the detector's card names the annotation set it learnt from, with a hash of its content.
    config = DetectTrainConfig(data=labels, output=str(tmp_path / "det"))
    card = detection._card(config, b"weights", {})
    digest = "sha256:" + hashlib.sha256(storage.read_bytes(labels)).hexdigest()
    assert card.annotation_sets == ({"uri": labels, "sha256": digest},)
    assert DetectorCard.from_dict(card.to_dict(), "card").annotation_sets == card.annotation_sets


def test_model_cards_carry_their_annotation_sets(tmp_path):
    from maskmodel.models.classifier import ModelCard, load_card, save_model_dir

    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text("<annotation/>")
    (tmp_path / "voc" / "a.jpg").write_bytes(b"not hashed")
    sets = lineage.annotation_sets([str(tmp_path / "voc"), str(tmp_path / "voc")])
    assert len(sets) == 1 and sets[0]["sha256"].startswith("sha256:")
    (tmp_path / "voc" / "a.jpg").write_bytes(b"images do not count")
    assert lineage.annotation_sets([str(tmp_path / "voc")]) == sets
    (tmp_path / "voc" / "a.xml").write_text("<annotation><object/></annotation>")
    assert lineage.annotation_sets([str(tmp_path / "voc")]) != sets  # a relabelled set is another set
    assert lineage.label_files([str(tmp_path / "voc")]) == []  # a folder tree is not hashed for the classifier
    card = save_model_dir(str(tmp_path / "m"), b"w", ModelCard(arch="resnet18", classes=("a", "b"), input_size=64,
                                                                resize_size=73, annotation_sets=tuple(sets)))
    assert load_card(str(tmp_path / "m")).annotation_sets == tuple(sets) == card.annotation_sets
    assert json.loads((tmp_path / "m" / "model.json").read_text())["annotation_sets"] == sets


def _exported(tmp_path):
    out, _ = scored_table(str(tmp_path))
    exported = str(tmp_path / "rev")
    export_review(ReviewExportConfig(results=out, output=exported, least_confident=10,
                                     review_folder=str(tmp_path / "copies")))
    return exported, json.loads((tmp_path / "rev" / MANIFEST).read_text())


def _import(tmp_path, exported, doc, output="set.json", merge=""):
    path = tmp_path / f"reviewed-{len(list(tmp_path.glob('reviewed-*')))}.json"
    path.write_text(json.dumps(doc))
    return import_review(ReviewImportConfig(reviewed=str(path), exported=exported, output=str(tmp_path / output),
                                            merge=merge and str(tmp_path / merge)))


def test_malformed_exports_are_refused_in_one_sentence_naming_the_task_or_annotation(tmp_path):
    exported, manifest = _exported(tmp_path)
    good = label_studio_export(manifest)
    cases = []
    bad = copy.deepcopy(good)
    del bad[0]["annotations"][1]["result"][2]["value"]["width"]
    cases.append((bad, "task 1, annotation 12, result 'Xk3a9' is not a usable rectangle (lacks 'width')"))
    bad = copy.deepcopy(good)
    bad[0]["annotations"][1]["result"][0]["value"]["rectanglelabels"] = []
    cases.append((bad, "task 1, annotation 12, result 'face0' is not a usable rectangle (it must carry exactly one"))
    bad = copy.deepcopy(good)
    bad[0]["annotations"][1]["updated_at"] = "yesterday"
    cases.append((bad, "task 1, annotation 12 has updated_at 'yesterday', which is not an ISO 8601 time"))
    bad = copy.deepcopy(good)
    del bad[1]["data"]
    cases.append((bad, "task 2 has no \"data\" object"))
    bad = copy.deepcopy(good)
    bad[0]["annotations"][1]["result"][2]["value"]["rectanglelabels"] = ["hat"]
    cases.append((bad, "task 1, annotation 12, box 'Xk3a9' has class 'hat', which is not one of the exported"))
    bad = copy.deepcopy(good)
    bad[0]["data"]["path"] = "s3://elsewhere/x.jpg"
    cases.append((bad, "task 1 is of 's3://elsewhere/x.jpg', which is not in this export"))
    bad = copy.deepcopy(good)
    bad[0]["annotations"][1]["result"][1]["value"].update(x=120, width=10)
    cases.append((bad, "result 'face1' is not a usable rectangle (it has no area inside the image)"))
    cases.append(({"tasks": []}, "is not a Label Studio JSON export: it must be a list of tasks, got dict"))
    for doc, message in cases:
        with pytest.raises(UserError) as e:
            _import(tmp_path, exported, doc)
        assert message in str(e.value) and str(e.value).count(". ") == 0, str(e.value)
        assert not (tmp_path / "set.json").exists()  # nothing written: no correction half-imported


def test_merge_keeps_every_photo_and_the_later_correction_of_each(tmp_path):
    exported, manifest = _exported(tmp_path)
    first = label_studio_export(manifest)
    s1 = _import(tmp_path, exported, first, output="set1.json")
    assert s1.photos == 3  # a, d, c (nothing replaced here)
    # A second round: a.jpg corrected again later (all mask), c.jpg corrected EARLIER than in round one.
    second = copy.deepcopy(first)
    for t in second:
        t["annotations"] = []
    second[0]["annotations"] = [_annotation(21, [_rect("face0", (10, 10, 50, 60), "mask")], "2025-03-03T10:00:00Z")]
    second[3]["annotations"] = [_annotation(22, [], "2025-03-01T10:00:00Z")]
    s2 = _import(tmp_path, exported, second, output="set2.json", merge="set1.json")
    assert (s2.merged["earlier"], s2.merged["replaced"], s2.merged["superseded"]) == (3, 1, 1)
    got = {r.extra["maskmodel_path"].rsplit("/", 1)[-1]: r for r in read_coco(str(tmp_path / "set2.json"))}
    assert set(got) == {"a.jpg", "c.jpg", "d.jpg"}  # d.jpg only in the earlier set: kept
    assert got["a.jpg"].classes == ("mask",) and got["a.jpg"].extra["updated_at"].startswith("2025-03-03")
    assert got["c.jpg"].classes == ("no_mask",)  # the earlier set's c.jpg correction is the later one
    assert got["d.jpg"].path == read_coco(str(tmp_path / "set1.json"))[1].path and os.path.exists(got["d.jpg"].path)


def test_cvat_coco_matches_photos_by_file_name_and_counts_changes(tmp_path):
    exported, _ = _exported(tmp_path)
    doc = json.loads((tmp_path / "rev" / COCO).read_text())
    for im in doc["images"]:  # CVAT keeps its own file names and drops our extras
        im["file_name"] = im["file_name"].rsplit("/", 1)[-1]
        for k in [k for k in im if k.startswith("maskmodel_")]:
            del im[k]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != 1 or a["bbox"][0] != 80]  # delete one
    doc["annotations"][0]["category_id"] = 2  # relabel one (a.jpg face 0 -> no_mask)
    doc["info"]["date_created"] = "2025-03-04T00:00:00+00:00"
    s = _import(tmp_path, exported, doc)
    assert (s.faces["relabelled"], s.faces["deleted"], s.faces["added"], s.faces["kept"]) == (1, 1, 0, 3)
    assert {r.extra["updated_at"] for r in read_coco(str(tmp_path / "set.json"))} == {"2025-03-04T00:00:00+00:00"}


def test_compare_matches_by_region_id_then_by_overlap():
    model = [{"index": 0, "box": [0, 0, 10, 10], "label": "mask"}, {"index": 1, "box": [20, 20, 40, 40],
                                                                    "label": "mask"}]
    got = compare(model, [("face0", (0, 0, 10, 10), "no_mask"), ("zz", (21, 21, 40, 40), "mask"),
                          ("yy", (50, 50, 60, 60), "mask")])
    assert (got["relabelled"], got["kept"], got["added"], got["deleted"], got["moved"]) == (1, 1, 1, 0, 0)
    assert compare(model, [])["deleted"] == 2


@pytest.mark.timeout(120)
def test_no_secret_in_any_output_and_no_presigned_url_in_logs(s3_bucket, s3_endpoint, tmp_path):
    out, _ = scored_table(s3_bucket)
    secret, token = "PLANTEDsecret0123456789abcdefXYZ", "PLANTEDsessiontoken987"
    ends = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10)
    env = {**os.environ, "PYTHONPATH": REPO, "AWS_ACCESS_KEY_ID": "PLANTEDKEYID", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_SESSION_TOKEN": token, "AWS_CREDENTIAL_EXPIRATION": ends.isoformat()}
    local = tmp_path / "out"

    def run(*args):
        p = subprocess.run([sys.executable, "-m", "jobs.review", "export", "--results", out, *args], env=env,
                           cwd=REPO, capture_output=True, text=True, timeout=100, check=False)
        assert p.returncode == 0, p.stderr
        return p.stdout + p.stderr

    logs = run("--output", str(local / "plain"), "--review-folder", str(local / "copies"))
    logs += run("--output", str(local / "signed"), "--review-folder", s3_bucket + "/copies", "--presign", "3600")
    assert "stop working at" in logs and "when the temporary credentials that signed them end" in logs
    assert "Signature" not in logs and "PLANTEDKEYID" not in logs and token not in logs and secret not in logs
    files = [p for p in local.rglob("*") if p.is_file()]
    assert {f.name for f in files} >= {TASKS, CONFIG, COCO, MANIFEST}
    for f in files:
        text = f.read_bytes().decode("latin-1")
        assert secret not in text, f
        assert (token in text) == (f.parent.name == "signed" and f.name == TASKS), f  # only inside the URLs
    signed = json.loads((local / "signed" / TASKS).read_text())
    assert all("Signature=" in t["data"]["image"] and "PLANTEDKEYID" in t["data"]["image"] for t in signed)
    assert all("Signature" not in t["data"]["image"] for t in json.loads((local / "plain" / TASKS).read_text()))


def test_cli_refuses_a_malformed_export_with_one_line_and_exit_2(tmp_path):
    exported, manifest = _exported(tmp_path)
    bad = label_studio_export(manifest)
    bad[0]["annotations"][1]["result"][0]["original_width"] = "wide"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    p = subprocess.run([sys.executable, "-m", "jobs.review", "import", "--reviewed", str(tmp_path / "bad.json"),
                        "--exported", exported, "--output", str(tmp_path / "set.json")], env={
                            **os.environ, "PYTHONPATH": REPO}, cwd=REPO, capture_output=True, text=True, timeout=100,
                       check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "task 1, annotation 12, result 'face0' is not a usable rectangle" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "set.json").exists()
