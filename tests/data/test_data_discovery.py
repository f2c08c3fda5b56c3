"""Finding labelled images: tree and manifest layouts, hash split, every layout error."""

from __future__ import annotations

import pytest

from maskmodel.data.discovery import discover, fetch_and_check, hash_fraction
from maskmodel.errors import UserError
from maskmodel.io import storage
from tests.conftest import write_tiny_tree


def test_tree_layout(tmp_path):
    write_tiny_tree(str(tmp_path), splits=(("Train", 4), ("Validation", 2), ("scene", 1)), size=16)
    data = discover(str(tmp_path))
    assert data.classes == ("mask", "no_mask")
    assert data.counts() == {"train": {"mask": 4, "no_mask": 4}, "val": {"mask": 2, "no_mask": 2},
                             "scene": {"mask": 1, "no_mask": 1}}
    assert not data.val_from_hash


def test_files_skipped_by_extension_are_counted(tmp_path):
    write_tiny_tree(str(tmp_path), splits=(("train", 2), ("val", 1)), size=16)
    for name in ("train/mask/notes.txt", "train/no_mask/README", "val/mask/a.TXT", "train/mask/notes.docx"):
        (tmp_path / name).write_text("not an image")
    (tmp_path / "train/mask/.DS_Store").write_text("hidden: not a file of the data")
    data = discover(str(tmp_path))
    assert data.counts()["train"] == {"mask": 2, "no_mask": 2}
    assert data.skipped_by_extension == {"txt": 2, "": 1, "docx": 1}
    assert data.skipped_line() == "4 file(s) skipped by extension (txt 2, no extension 1, docx 1)"
    only_text = tmp_path / "text"
    (only_text / "train" / "mask").mkdir(parents=True)
    (only_text / "train" / "mask" / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"\(1 other file\(s\) left out by extension\)"):
        discover(str(only_text))


def test_no_val_split_is_split_by_hash_deterministically(tmp_path):
    write_tiny_tree(str(tmp_path), splits=(("train", 30),), size=16)
    a, b = discover(str(tmp_path)), discover(str(tmp_path))
    assert a.val_from_hash and a.splits == b.splits
    for it in a.splits["val"]:
        assert hash_fraction(it.uri) < 0.2


def test_manifest(tmp_path):
    write_tiny_tree(str(tmp_path / "imgs"), splits=(("train", 3), ("val", 2)), size=16)
    lines = ["path,label,split"]
    for split in ("train", "val"):
        for cls in ("mask", "no_mask"):
            for o in storage.list_files(str(tmp_path / "imgs" / split / cls)):
                lines.append(f"{o.uri.replace(str(tmp_path) + '/', '')},{cls},{split}")
    storage.write_text(str(tmp_path / "m.csv"), "\n".join(lines) + "\n")
    data = discover(str(tmp_path / "m.csv"))
    assert data.counts() == {"train": {"mask": 3, "no_mask": 3}, "val": {"mask": 2, "no_mask": 2}}
    assert storage.exists(data.splits["train"][0].uri)


@pytest.mark.parametrize("make,needle", [
    (lambda root: None, "does not exist"),
    (lambda root: write_tiny_tree(root, classes=("mask",), size=16), "single class"),
    (lambda root: write_tiny_tree(root, splits=(("val", 2), ("test", 2)), size=16), "no training images"),
    (lambda root: (write_tiny_tree(root, size=16), storage.write_bytes(storage.join(root, "val", "cat", "x.jpg"),
                   storage.read_bytes(storage.join(root, "val", "mask", "000.jpg")))), "training split lacks"),
    (lambda root: storage.write_text(storage.join(root, "readme.txt"), "hi"), "No images found"),
])
def test_layout_errors(tmp_path, make, needle):
    root = str(tmp_path / "data")
    make(root)
    with pytest.raises(UserError, match=needle):
        discover(root)


def test_fetch_and_check_marks_unreadable(tmp_path):
    write_tiny_tree(str(tmp_path), splits=(("train", 1),), size=16)
    storage.write_bytes(str(tmp_path / "bad.jpg"), b"not an image")
    import numpy as np

    uris = [str(tmp_path / "train/mask/000.jpg"), str(tmp_path / "bad.jpg"), str(tmp_path / "gone.jpg")]
    out = fetch_and_check({"uri": np.array(uris, dtype=object), "label": np.array([0, 0, 1])})
    assert out["error"][0] == "" and len(out["data"][0]) > 0
    assert out["error"][1] == "not an image"
    assert out["error"][2].startswith("unreadable:")
