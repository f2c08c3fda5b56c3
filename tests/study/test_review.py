"""jobs.review: export the faces the model doubts, import reviewers' corrections (Label Studio, CVAT's COCO)."""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.request

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from maskmodel import results
from maskmodel.data import labelstudio
from maskmodel.data.annotations import read_coco
from maskmodel.errors import UserError
from maskmodel.io import storage
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
    assert r0["id"] == "face0" and r0["type"] == "rectanglelabels" and (r0["original_width"], r0["original_height"]) == (W, H)
    assert r0["value"]["x"] == pytest.approx(100 * 10 / W) and r0["value"]["width"] == pytest.approx(100 * 40 / W)
    assert r0["value"]["y"] == pytest.approx(100 * 10 / H) and r0["value"]["height"] == pytest.approx(100 * 50 / H)
    assert r0["value"]["rectanglelabels"] == ["mask"] and r0["score"] == pytest.approx(0.52)
    assert r1["value"]["rectanglelabels"] == ["mask"]  # the confident face of the photo is pre-annotated too
    # The archive member is a file a labelling tool can open, with the member's bytes.
    member = tasks[1]["data"]["image"]
    assert member.startswith(str(tmp_path / "copies")) and open(member, "rb").read()[:2] == b"\xff\xd8"
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
    with pytest.raises(UserError, match="query failed"):
        export_review(ReviewExportConfig(results=out, output=str(tmp_path / "r4"), where="no_such_column > 1"))
