"""Scoring image archives on the real S3 endpoint: one row per image member, bad cases as rows, incremental per archive."""

from __future__ import annotations

import dataclasses
import io
import random
import zipfile

import pytest

from maskmodel import results
from maskmodel.io import storage
from maskmodel.io.archives import member_uri
from maskmodel.score import scoring
from maskmodel.score.scoring import ScoreConfig
from tests.io.test_archives import _tar
from tests.score.test_scoring import encode, face, write_model

pytestmark = pytest.mark.ray


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _encrypt_first_member(zip_bytes: bytes) -> bytes:
    data = bytearray(zip_bytes)
    data[data.find(b"PK\x01\x02") + 8] |= 0x1  # the central directory's "encrypted" flag
    return bytes(data)


@pytest.fixture(scope="module")
def archive_input(s3_endpoint, ray_local):
    import uuid

    import s3fs

    name = f"arch-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False).mkdir(name)
    root = f"s3://{name}"
    jpg = {i: encode(face(i % 2, i), "JPEG", quality=90) for i in range(12)}
    noise = random.Random(0).randbytes(6000)  # incompressible: the member a truncated tar.gz cuts into
    objects = {
        "day1/loose-0.jpg": jpg[0],
        "day1/loose-1.png": encode(face(1, 1), "PNG"),
        "day1/batch.tar": _tar({"cam1/a.jpg": jpg[2], "cam1/b.jpg": jpg[3], "cam1/notes.txt": b"ignored",
                                "cam1/broken.jpg": jpg[4][:200], "../escape.jpg": jpg[5], "/abs.jpg": jpg[6]}),
        "day1/batch.tar.gz": _tar({"x/c.jpg": jpg[7], "x/d.jpg": jpg[8]}, gz=True),
        "day1/batch.zip": _encrypt_first_member(_zip({"secret.jpg": jpg[9], "z/e.jpg": jpg[10],
                                                       "z/bomb.jpg": b"\0" * 400_000, "z/f.JPG": jpg[11]})),
        # Cut inside the second member's data: the first member is scored, then the archive's error row.
        "day2/cut.tar": _tar({"p.jpg": jpg[1], "q.jpg": noise})[:512 + -(-len(jpg[1]) // 512) * 512 + 512 + 3000],
        "day2/cut.tgz": (lambda d: d[:len(d) // 2])(_tar({"r.jpg": jpg[3], "s.jpg": noise}, gz=True)),
    }
    for key, data in objects.items():
        storage.write_bytes(f"{root}/in/{key}", data)
    model = f"{root}/model"
    write_model(model)
    return {"root": root, "input": f"{root}/in", "model": model}


def _rows(output: str, run_id: str | None = None) -> dict[str, dict]:
    table = results.read_results(output, [run_id] if run_id else None)
    return {r["path"]: r for r in table.to_pylist()}


def test_one_row_per_image_member_and_a_reason_for_every_bad_case(archive_input):
    inp, out = archive_input["input"], f"{archive_input['root']}/out"
    res = scoring.score(ScoreConfig(input=inp, model=archive_input["model"], output=out, run_id="r1",
                                    precision="fp32", read_batch=4, batch_size=8))
    rows = _rows(out)
    tar, tgz, zp = f"{inp}/day1/batch.tar", f"{inp}/day1/batch.tar.gz", f"{inp}/day1/batch.zip"
    cut, cut_gz = f"{inp}/day2/cut.tar", f"{inp}/day2/cut.tgz"
    ok = {f"{inp}/day1/loose-0.jpg", f"{inp}/day1/loose-1.png", member_uri(tar, "cam1/a.jpg"),
          member_uri(tar, "cam1/b.jpg"), member_uri(tgz, "x/c.jpg"), member_uri(tgz, "x/d.jpg"),
          member_uri(zp, "z/e.jpg"), member_uri(zp, "z/f.JPG"), member_uri(cut, "p.jpg"), member_uri(cut_gz, "r.jpg")}
    errors = {
        member_uri(tar, "cam1/broken.jpg"): "truncated image",          # a corrupt member: the rest is scored
        member_uri(tar, "../escape.jpg"): "unsafe member path: '..'",
        member_uri(tar, "/abs.jpg"): "unsafe member path: absolute",
        member_uri(zp, "secret.jpg"): "encrypted member",
        member_uri(zp, "z/bomb.jpg"): "compression ratio over 100:1",
        cut: "truncated archive",                                        # members before the damage, then this
        cut_gz: "truncated archive",
    }
    assert set(rows) == ok | set(errors), sorted(set(rows) ^ (ok | set(errors)))
    assert all(rows[p]["status"] == "ok" and rows[p]["label"] for p in ok)
    for path, reason in errors.items():
        assert rows[path]["status"] == "error" and rows[path]["error"].startswith(reason), (path, rows[path]["error"])
    assert (res.images, res.ok, res.errors) == (len(rows), len(ok), len(errors))
    # Archive rows name their archive and member; the archive's own error row has no member; loose ones neither.
    assert (rows[member_uri(tar, "cam1/a.jpg")]["archive"], rows[member_uri(tar, "cam1/a.jpg")]["member"]) == (
        tar, "cam1/a.jpg")
    assert (rows[cut]["archive"], rows[cut]["member"]) == (cut, None)
    assert rows[f"{inp}/day1/loose-0.jpg"]["archive"] is None
    version = storage.info(tar).version
    assert {rows[p]["version"] for p in rows if rows[p]["archive"] == tar} == {version}  # the archive's ETag

    # The docs' query (docs/archives-and-errors.md): no-mask images per archive.
    from maskmodel.results import query

    per_archive = {r["archive"]: r for r in query.query(out, query.EXAMPLES["no-mask images per archive"]).to_pylist()}
    assert per_archive[tar]["images"] == 2 and per_archive[zp]["images"] == 2


def test_rerun_replaces_and_incremental_rescores_only_a_replaced_archive(archive_input):
    inp, out = archive_input["input"], f"{archive_input['root']}/out-inc"
    cfg = ScoreConfig(input=inp, model=archive_input["model"], output=out, run_id="n1", read_batch=4, batch_size=8)
    first = scoring.score(cfg)
    again = scoring.score(cfg)  # the same run id: replaced, never both
    assert again.images == first.images and len(_rows(out)) == first.images
    nothing = scoring.score(dataclasses.replace(cfg, run_id="n2", incremental=True))
    assert nothing.images == 0 and nothing.skipped == 7  # every object, loose or archive, skipped whole
    tar = f"{inp}/day1/batch.tar"
    storage.write_bytes(tar, _tar({"cam1/a.jpg": encode(face(0, 40), "JPEG"), "cam1/new.jpg": encode(face(1, 41), "JPEG")}))
    inc = scoring.score(dataclasses.replace(cfg, run_id="n3", incremental=True))
    assert inc.images == 2 and inc.skipped == 6
    assert set(_rows(out, "n3")) == {member_uri(tar, "cam1/a.jpg"), member_uri(tar, "cam1/new.jpg")}


def test_a_manifest_may_list_archives_and_loose_objects(archive_input):
    root, inp = archive_input["root"], archive_input["input"]
    manifest = f"{root}/tonight.csv"
    storage.write_bytes(manifest, b"path\nin/day1/loose-0.jpg\n" + f"{inp}/day1/batch.tar.gz\n".encode())
    out = f"{root}/out-manifest"
    res = scoring.score(ScoreConfig(input=manifest, model=archive_input["model"], output=out, run_id="m1",
                                    precision="fp32", read_batch=4, batch_size=8))
    tgz = f"{inp}/day1/batch.tar.gz"
    # Relative paths resolve against the manifest's folder.
    rows = _rows(out)
    assert set(rows) == {f"{inp}/day1/loose-0.jpg", member_uri(tgz, "x/c.jpg"), member_uri(tgz, "x/d.jpg")}
    assert res.images == res.ok == 3 and all(r["status"] == "ok" for r in rows.values())
