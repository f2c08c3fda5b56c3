"""Every input object is accounted for, with one identity per row: generated collections, scored twice (issue 20).

Also the training side: an epoch leaves out (and counts) the objects that no longer read or decode.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import tarfile
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from maskmodel import results
from maskmodel.data.discovery import SKIPPED_LABEL, DecodeCrop
from maskmodel.data.transforms import EvalCrop
from maskmodel.io import storage
from maskmodel.io.archives import member_key, member_uri
from maskmodel.score import scoring
from maskmodel.score.scoring import ScoreConfig
from tests.score.test_scoring import write_model


def _image(rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _bad(rng: np.random.Generator) -> bytes:
    """An image member or object that must be an error row: cut, zero-padded, or not an image."""
    good = _image(rng)
    half = good[: len(good) // 2]
    return [half, half + bytes(len(good) - len(half)), b"not a picture"][int(rng.integers(3))]


def _tar_bytes(entries: list[tuple[str, bytes]], *, end: bool = True) -> bytes:
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w")
    for name, data in entries:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    if end:
        tar.close()
    return buf.getvalue()  # without ``end``: the members only, no end-of-archive blocks


def _zip_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
        warnings.simplefilter("ignore", UserWarning)  # duplicate names: wanted here
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def generate(rng: np.random.Generator) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    """A collection (relative key -> bytes) and, per object, the keys of the rows it must give (``""``: its own)."""
    objects, expected = {}, {}
    for i in range(int(rng.integers(6, 10))):
        kind = ["loose", "loose-bad", "tar", "tgz", "zip", "nested", "no-images", "cut-tar"][int(rng.integers(8))]
        if kind in ("loose", "loose-bad"):
            key = f"o{i}.jpg"
            objects[key], expected[key] = _image(rng) if kind == "loose" else _bad(rng), [""]
            continue
        names = [f"m{int(rng.integers(4))}.jpg" for _ in range(int(rng.integers(1, 6)))]  # repeats likely
        entries = [(n, _image(rng) if rng.random() < 0.7 else _bad(rng)) for n in names]
        if rng.random() < 0.5:
            entries.insert(int(rng.integers(len(entries) + 1)), ("notes.txt", b"ignored"))
        seen: dict[str, int] = {}
        keys = []
        for n in names:
            seen[n] = seen.get(n, 0) + 1
            keys.append(member_key(n, seen[n]))
        if kind == "tar":
            key, data = f"a{i}.tar", _tar_bytes(entries)
        elif kind == "tgz":  # several gzip members, as parallel writers make them
            plain = _tar_bytes(entries)
            cut = int(rng.integers(1, len(plain)))
            key, data = f"a{i}.tar.gz", gzip.compress(plain[:cut]) + gzip.compress(plain[cut:])
        elif kind == "zip":
            key, data = f"a{i}.zip", _zip_bytes(entries)
        elif kind == "nested":
            key, data, keys = f"a{i}.tar", _tar_bytes([("inner.tar", _tar_bytes(entries)), ("x.txt", b"x")]), [""]
        elif kind == "no-images":
            key, data, keys = f"a{i}.zip", _zip_bytes([("readme.txt", b"r")]), [""]
        else:  # damaged part-way: every member, then a cut inside the next header: then the archive's own row
            key, data = f"a{i}.tar", _tar_bytes(entries, end=False) + _tar_bytes([("z.jpg", b"z")], end=False)[:100]
            keys = keys + [""]
        objects[key], expected[key] = data, keys
    return objects, expected


def readme_reason_kinds() -> set[str]:
    """The kinds (text before the first ``:``) of the table of error reasons in docs/archives-and-errors.md."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / "docs" / "archives-and-errors.md").read_text()
    section = text.split("## Error reasons", 1)[1].split("\n\n**", 1)[0]
    cells = re.findall(r"^\| (.+?) \| ", section, flags=re.M)
    return {code.split(":")[0] for cell in cells for code in re.findall(r"`([^`]+)`", cell)}


def test_the_readme_table_names_every_reason_the_readers_give():
    from maskmodel.io.archives import iter_tar, iter_zip
    from maskmodel.io.decode import DecodeError, decode

    kinds = readme_reason_kinds()
    rng = np.random.default_rng(0)
    made = set()
    for data in (b"", b"text", _bad(rng), _image(rng)[:40]):
        try:
            decode(data)
        except DecodeError as e:
            made.add(str(e))
    tar = _tar_bytes([("../a.jpg", b"x"), ("b.jpg", b"y" * 50)]) + b"x"
    for item in [*iter_tar(io.BytesIO(tar), extensions=("jpg",), max_bytes=10),
                 *iter_tar(io.BytesIO(_tar_bytes([("t.txt", b"")])), extensions=("jpg",), max_bytes=10),
                 *iter_zip(io.BytesIO(b"PK junk"), extensions=("jpg",), max_bytes=10)]:
        made.add(getattr(item, "error", None) or getattr(item, "reason", None))
    assert {m.split(":")[0] for m in made if m} <= kinds, made
    assert {"empty file", "not an image", "truncated image", "no image members", "unsafe member path",
            "too large", "corrupt archive", "unreadable", "nested archive not read",
            "unsupported compression"} <= kinds


@pytest.mark.ray
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_object_gives_its_rows_once_and_an_incremental_rerun_adds_none(seed, ray_local, tmp_path):
    rng = np.random.default_rng(seed)
    objects, expected = generate(rng)
    root = str(tmp_path / "in")
    for key, data in objects.items():
        storage.write_bytes(f"{root}/{key}", data)
    uris = {o.uri.rsplit("/", 1)[1]: o.uri for o in storage.list_files(root)}
    for key in (".thumbs/t.jpg", "._o0.jpg", "notes.txt"):  # counted skips (issue 31), not rows
        storage.write_bytes(f"{root}/{key}", _image(rng))
    want = sorted(uris[k] if m == "" else member_uri(uris[k], m) for k, ms in expected.items() for m in ms)
    model, out = str(tmp_path / "model"), str(tmp_path / "out")
    write_model(model)
    cfg = ScoreConfig(input=root, model=model, output=out, run_id="r1", precision="fp32", read_batch=4,
                      batch_size=8)
    first = scoring.score(cfg)
    table = results.read_results(out)
    paths = table.column("path").to_pylist()
    kinds = {e.split(":")[0] for e in table.column("error").to_pylist() if e}
    assert kinds <= readme_reason_kinds(), kinds - readme_reason_kinds()
    assert len(paths) == len(set(paths)), "a key appears twice"
    assert sorted(paths) == want, (objects.keys(), sorted(set(paths) ^ set(want)))
    assert first.images == len(want)
    assert (first.left_out.hidden, first.left_out.extension) == (2, 1)
    assert "3 files left out (2 hidden, 1 not of --extensions)" in first.summary_line()
    [run] = results.list_commits(out)
    assert run.raw["counts"]["left_out"] == {"hidden": 2, "extension": 1}
    again = scoring.score(dataclasses.replace(cfg, run_id="r2", incremental=True))
    assert again.images == 0 and again.skipped == len(objects)


# ----------------------------------------------------------------------------- training

def _jpeg(seed: int) -> bytes:
    return _image(np.random.default_rng(seed))


def test_an_epoch_marks_objects_that_no_longer_read_or_decode_with_the_check_pass_reasons(caplog):
    good = [_jpeg(i) for i in range(3)]
    replaced = good[0][: len(good[0]) // 2] + bytes(len(good[0]) - len(good[0]) // 2)  # corrupt since the check
    batch = {"uri": np.array(["a", "b", "c", "d", "e"], dtype=object), "label": np.array([0, 1, 1, 0, 0]),
             "data": np.array([good[0], replaced, good[1], b"", good[2]], dtype=object),
             "error": np.array(["", "", "", "unreadable: not found", ""], dtype=object)}
    with caplog.at_level(logging.WARNING, logger="maskmodel.data.discovery"):
        out = DecodeCrop(EvalCrop(crop_size=16, resize_size=18), reduce_to=18)(batch)
    assert out["label"].tolist() == [0, SKIPPED_LABEL, 1, SKIPPED_LABEL, 0]
    assert out["image"].shape == (5, 3, 16, 16) and out["image"].dtype == np.uint8
    assert "b: truncated image" in caplog.text and "d: unreadable: not found" in caplog.text


@pytest.mark.ray
def test_an_epoch_counts_the_rows_it_left_out_and_learns_only_from_the_rest(ray_local):
    import ray

    from maskmodel.data.transforms import normalize
    from maskmodel.models.classifier import build_model
    from maskmodel.train.loop import _run_epoch

    rng = np.random.default_rng(0)
    labels = [0, 1, SKIPPED_LABEL, SKIPPED_LABEL, 1, SKIPPED_LABEL, 0, 1]  # a batch of 2 all left out
    ds = ray.data.from_items([{"image": rng.integers(0, 255, (3, 16, 16), dtype=np.uint8), "label": lab}
                              for lab in labels])
    torch.manual_seed(0)
    model = build_model("resnet18", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tr = _run_epoch(model, ds, device=torch.device("cpu"), batch_size=2, prepare=normalize, optimizer=opt)
    assert (tr["images"], tr["skipped"]) == (5, 3) and np.isfinite(tr["loss"])
    va = _run_epoch(model, ds, device=torch.device("cpu"), batch_size=3, prepare=normalize)
    assert (va["images"], va["skipped"]) == (5, 3) and [sum(row) for row in va["cm"]] == [2, 3]
