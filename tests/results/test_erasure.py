"""Issue 31: erasure on request (jobs.maintain --forget): the rows go from the table and from every copy under it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from maskmodel import results
from maskmodel.errors import UserError
from maskmodel.io.objectkeys import object_keys
from maskmodel.results import incremental
from maskmodel.results.erasure import ERASURE_KEY, matches
from maskmodel.results.maintenance import MaintainConfig, maintain
from tests.results.test_results_folder import _writer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALICE = ["/photos/alice/1.jpg", "/photos/alice/sub/2.jpg", "s3://in/day1.tar#cam/alice-3.jpg"]
OTHERS = ["/photos/alicex.jpg", "/photos/bob/1.jpg", "s3://in/day1.tar#cam/bob.jpg", "/photos/carol.jpg"]


def _holding(root: pathlib.Path, needles: list[str]) -> list[str]:
    """Files under ``root`` whose bytes, or (for Parquet) whose decoded values, hold one of ``needles``."""
    found = []
    for f in root.rglob("*"):
        if not f.is_file():
            continue
        data = f.read_bytes()
        text = data.decode("latin-1")
        if f.suffix == ".parquet" or f.name.endswith(".checkpoint.parquet"):
            text += json.dumps(pq.read_table(f).to_pylist(), default=str)
        if any(n in text for n in needles):
            found.append(str(f.relative_to(root)))
    return found


@pytest.fixture
def history(tmp_path):
    """A table whose history holds Alice's photos everywhere: a replaced run, two runs, a killed attempt, a checkpoint."""
    out = str(tmp_path / "scores")
    results.commit(_writer(out, "night-1", ALICE[:1] + OTHERS[:2]), meta={"input": "/photos/alice/1.jpg"})
    results.commit(_writer(out, "night-1", ALICE + OTHERS[:3], rows_per_file=2), meta={"input": "/photos"})
    DeltaTable(out).create_checkpoint()
    results.commit(_writer(out, "night-2", ALICE[1:2] + OTHERS[3:]), meta={"input": "/photos"})
    results.commit(_writer(out, "night-3", OTHERS[1:2]), meta={"input": "/photos"})
    _writer(out, "night-4", ALICE[:1]).close()  # killed before its commit
    return out


def test_matching_is_by_path_prefix_and_archive():
    paths = pa.array(ALICE + OTHERS)
    got = matches(paths, ["/photos/alice", "s3://in/day1.tar#cam/alice-3.jpg"]).to_pylist()
    assert got == [True] * 3 + [False] * 4


def test_forget_removes_every_copy_and_keeps_a_valid_table(history, tmp_path):
    out = history
    before = results.read_results(out)
    old_version = DeltaTable(out).version()
    forget_file = tmp_path / "forget.txt"
    forget_file.write_text("# Alice, request 2025-17\n/photos/alice/\n\ns3://in/day1.tar#cam/alice-3.jpg\n")
    assert _holding(pathlib.Path(out), ALICE)  # the premise: her paths are all over the folder

    done = maintain(MaintainConfig(results=out, forget=str(forget_file)))
    erasure = done.erasure
    assert (erasure.rows, erasure.runs, erasure.entries) == (4, 2, 2)
    line = done.summary_line()
    assert "forgot 4 rows of 2 runs" in line and "time travel to versions 1-" in line and "has ended" in line

    # No file under the table's folder holds an erased path: data, log, checkpoints, killed attempts.
    assert _holding(pathlib.Path(out), ALICE) == []
    # Other rows untouched, every reader agrees.
    keep = [r for r in before.to_pylist() if r["path"] not in ALICE]
    after = results.read_results(out)
    assert sorted(map(str, after.to_pylist())) == sorted(map(str, keep))
    table = DeltaTable(out)
    assert sorted(table.to_pyarrow_table().column("path").to_pylist()) == sorted(r["path"] for r in keep)
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.register("predictions", table.to_pyarrow_dataset())
    assert con.sql("SELECT count(*) FROM predictions WHERE path LIKE '%alice/%'").fetchall() == [(0,)]
    assert con.sql("SELECT count(*) FROM predictions").fetchall() == [(len(keep),)]
    pl = pytest.importorskip("polars")
    assert pl.read_delta(out).height == len(keep)
    assert sorted(pl.scan_delta(out).select("path").collect()["path"].to_list()) == sorted(r["path"] for r in keep)
    assert [r.run_id for r in results.list_commits(out)] == ["night-1", "night-2", "night-3"]  # metadata kept
    # Time travel before the erasure ends, with one sentence; raw delta-rs cannot return her rows either.
    with pytest.raises(UserError, match="erasure .* ended time travel"):
        results.read_results(out, version=old_version)
    try:
        old = DeltaTable(out, version=old_version).to_pyarrow_table().column("path").to_pylist()
    except Exception:  # noqa: BLE001 - her files are gone: the read fails
        old = []
    assert not set(old) & set(ALICE)
    # The record: counts and keys, never a path.
    [record] = [h[ERASURE_KEY] for h in table.history() if ERASURE_KEY in h]
    assert record["rows"] == 4 and record["purged_versions"] == [1, old_version]
    assert "alice" not in json.dumps(record)
    # The table takes new commits, and a fresh load from the new checkpoint reads the same rows.
    results.commit(_writer(out, "night-5", ["/photos/dave.jpg"]), meta={})
    assert DeltaTable(out).to_pyarrow_table().num_rows == len(keep) + 1


def test_incremental_skips_forgotten_photos_unless_asked(history, tmp_path):
    out = history
    (tmp_path / "f.txt").write_text("/photos/alice\n")
    maintain(MaintainConfig(results=out, forget=str(tmp_path / "f.txt")))
    erased = object_keys(ALICE[:2], ["v", "v"])
    assert np.isin(erased, incremental.committed_keys(out, forgotten=True)).all()
    assert not np.isin(erased, incremental.committed_keys(out)).any()


def test_jobs_maintain_forget_cli(history, tmp_path):
    (tmp_path / "f.txt").write_text("/photos/alice\ns3://in/day1.tar#cam/alice-3.jpg\n")
    run = subprocess.run([sys.executable, "-m", "jobs.maintain", "--results", history, "--forget",
                          str(tmp_path / "f.txt")], cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "forgot 4 rows" in run.stdout and "has ended" in run.stdout and "alice" not in run.stdout
    (tmp_path / "empty.txt").write_text("# nothing\n")
    bad = subprocess.run([sys.executable, "-m", "jobs.maintain", "--results", history, "--forget",
                          str(tmp_path / "empty.txt")], cwd=REPO, env=dict(os.environ), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "lists no paths to forget" in bad.stderr


def test_forget_on_s3(s3_bucket, tmp_path):
    """The same erasure on the real S3 endpoint: the log is rewritten and files deleted through the storage layer."""
    from maskmodel.io import storage

    out = s3_bucket + "/scores"
    results.commit(_writer(out, "night-1", ALICE[:1] + OTHERS[:2]), meta={"input": ALICE[0]})
    results.commit(_writer(out, "night-1", ALICE + OTHERS[:3], rows_per_file=2), meta={})
    results.commit(_writer(out, "night-2", OTHERS[3:]), meta={})
    (tmp_path / "f.txt").write_text("/photos/alice\ns3://in/day1.tar#cam/alice-3.jpg\n")
    done = maintain(MaintainConfig(results=out, forget=str(tmp_path / "f.txt"))).erasure
    assert (done.rows, done.runs) == (3, 1)
    fs, root = storage.filesystem(out)
    for key in fs.find(root):
        data = fs.cat_file(key)
        text = data.decode("latin-1")
        if key.endswith(".parquet"):
            text += json.dumps(pq.read_table(pa.BufferReader(data)).to_pylist(), default=str)
        assert not any(n in text for n in ALICE), key
    assert sorted(results.read_results(out).column("path").to_pylist()) == sorted(OTHERS[:3] + OTHERS[3:])
    with pytest.raises(UserError, match="ended time travel"):
        results.read_results(out, version=1)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_an_incremental_run_does_not_score_forgotten_photos_again_unless_asked(ray_local, tmp_path):
    import dataclasses
    import io

    from PIL import Image

    from maskmodel.score import scoring
    from maskmodel.score.plan import ScoreConfig
    from tests.score.test_scoring import write_model

    photos = tmp_path / "in"
    photos.mkdir()
    for i, name in enumerate(("alice.jpg", "bob.jpg", "carol.jpg")):
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(buf, "JPEG")
        (photos / name).write_bytes(buf.getvalue())
    write_model(str(tmp_path / "model"))
    out = str(tmp_path / "out")
    cfg = ScoreConfig(input=str(photos), model=str(tmp_path / "model"), output=out, run_id="r1", precision="fp32")
    assert scoring.score(cfg).images == 3
    (tmp_path / "f.txt").write_text(f"{photos}/alice.jpg\n")
    assert maintain(MaintainConfig(results=out, forget=str(tmp_path / "f.txt"))).erasure.rows == 1
    again = scoring.score(dataclasses.replace(cfg, run_id="r2", incremental=True))
    assert (again.images, again.skipped) == (0, 3)  # bob and carol scored, alice forgotten: none scored again
    asked = scoring.score(dataclasses.replace(cfg, run_id="r3", incremental=True, rescore_forgotten=True))
    assert asked.images == 1
    assert results.read_results(out, run_ids=["r3"]).column("path").to_pylist() == [f"{photos}/alice.jpg"]
