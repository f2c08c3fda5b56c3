"""One rule for the entries of manifests and annotation files (maskmodel.io.paths), used by every reader.

The same manifest must name the same objects for training (data.discovery), scoring (score.scoring's
driver-side reader and score.pipeline's streamed one) and annotation files (data.annotations).
"""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from PIL import Image

from maskmodel.data import annotations, discovery
from maskmodel.score import pipeline, scoring

NAMES = ("plain.jpg", "my photo.jpg", "café.jpg", "100%.jpg", "a b/c%20d.jpg")


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _collection(tmp_path: pathlib.Path) -> tuple[pathlib.Path, list[str], list[str]]:
    """A folder of photos with awkward names and the entries that name them in every spelling a manifest holds."""
    images = tmp_path / "images"
    (images / "a b").mkdir(parents=True)
    data = _jpeg()
    for name in NAMES:
        (images / name).write_bytes(data)
    entries, expected = [], []
    for name in NAMES:
        path = images / name
        for entry in (f"images/{name}", f"  ./images/{name}\t", str(path), path.as_uri(),
                      "file://localhost" + path.as_uri()[len("file://"):], f"images/x/../{name}"):
            entries.append(entry)
            expected.append(str(path))
    return tmp_path, entries, expected


def test_file_uris_are_percent_decoded_as_rfc_8089_says():
    from maskmodel.io.paths import file_uri_path

    assert file_uri_path("file:///a/my%20photo.jpg") == "/a/my photo.jpg"
    assert file_uri_path("file:///a/caf%C3%A9.jpg") == "/a/café.jpg"
    assert file_uri_path("file:///a/100%25.jpg") == "/a/100%.jpg"
    assert file_uri_path("file://localhost/a/b.jpg") == "/a/b.jpg"
    assert file_uri_path("file:/a/b.jpg") == "/a/b.jpg"
    assert file_uri_path("FILE:///a/b.jpg") == "/a/b.jpg"
    assert file_uri_path("file://otherhost/a/b.jpg") is None
    assert file_uri_path("s3://b/a%20b.jpg") is None


def test_the_rule_for_uris_absolute_and_relative_entries(tmp_path):
    from maskmodel.io.paths import entry_folder, resolve_entry

    base = str(tmp_path)
    assert resolve_entry(base, " a/b.jpg ") == f"{base}/a/b.jpg"
    assert resolve_entry(base, "a/../b.jpg") == f"{base}/b.jpg"
    assert resolve_entry(base, "/x/y.jpg") == "/x/y.jpg"
    assert resolve_entry(base, "file:///x/my%20y.jpg") == "/x/my y.jpg"
    assert resolve_entry("s3://b/m", "a/b.jpg") == "s3://b/m/a/b.jpg"
    assert resolve_entry("s3://b/m", "../a.jpg") == "s3://b/a.jpg"
    assert resolve_entry("s3://b/m", "/x/a.jpg") == "s3://b/x/a.jpg"  # absolute: on the manifest's own filesystem
    assert resolve_entry("s3://b/m", "s3://c/d%20e.jpg ") == "s3://c/d%20e.jpg"  # object keys keep their '%'
    assert resolve_entry(base, "file://otherhost/x.jpg") == "file://otherhost/x.jpg"  # no local object
    assert entry_folder("s3://b/m/list.csv") == "s3://b/m"
    assert entry_folder(f"{base}/list.csv") == base
    assert entry_folder(f"file://{base}/list.csv") == base


def test_one_manifest_names_the_same_objects_for_training_scoring_and_annotations(tmp_path):
    root, entries, expected = _collection(tmp_path)
    n = len(entries)
    manifest = root / "list.csv"
    pacsv.write_csv(pa.table({"path": entries, "label": ["mask", "no_mask"] * (n // 2),
                              "split": ["train"] * n}), str(manifest))
    for path in expected:
        assert pathlib.Path(path).is_file(), path

    training = [p for p, _, _ in discovery._read_manifest(str(manifest))]
    listed = [o.uri for o in scoring._manifest_objects(str(manifest), ("path", "label", "split"))]
    streamed = pipeline._resolve_paths(pacsv.read_csv(str(manifest)),
                                       base=pipeline.manifest_base(str(manifest))).column("path").to_pylist()
    coco = root / "faces.coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": i + 1, "file_name": e, "width": 16, "height": 16} for i, e in enumerate(entries)],
        "annotations": [], "categories": [{"id": 1, "name": "face"}]}))
    annotated = [r.path for r in annotations.read_coco(str(coco))]

    assert training == expected
    assert listed == expected
    assert streamed == expected
    assert annotated == expected
