"""DuckDB over committed results on the real S3 endpoint: summary, arbitrary SQL, the docs examples, the CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from maskmodel import results
from maskmodel.errors import UserError
from maskmodel.results import query

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DAY1 = dt.datetime(2025, 3, 1, 23, 0, tzinfo=dt.timezone.utc)
DAY2 = dt.datetime(2025, 3, 2, 1, 0, tzinfo=dt.timezone.utc)


def _rows(run_id: str, specs: list[tuple], when: dt.datetime) -> pa.Table:
    """``specs``: (path, label or None, confidence or error reason)."""
    out = []
    for path, label, x in specs:
        ok = label is not None
        p_mask = (x if label == "mask" else 1 - x) if ok else None
        out.append({"path": path, "version": "v", "status": "ok" if ok else "error",
                    "error": None if ok else x, "label": label, "confidence": x if ok else None,
                    "p_mask": p_mask, "p_no_mask": None if p_mask is None else 1 - p_mask,
                    "model_id": "model-a", "run_id": run_id, "scored_at": when})
    return pa.Table.from_pylist(out)


def _commit(out: str, run_id: str, table: pa.Table | None) -> None:
    w = results.AttemptWriter(out, run_id, results.results_schema(["mask", "no_mask"]), rows_per_file=3)
    if table is not None:
        w.write(table)
    results.commit(w, meta={"model_id": "model-a", "counts": {"images": table.num_rows if table else 0},
                            "precision": "fp32", "actors": 2, "elapsed_s": 1.23, "config": {"run_id": run_id}})


@pytest.fixture
def s3_results(s3_bucket):
    out = s3_bucket + "/scores"
    _commit(out, "d1", _rows("d1", [("s3://in/1.jpg", "mask", 0.9), ("s3://in/2.jpg", "no_mask", 0.55),
                                    ("s3://in/3.jpg", "no_mask", 0.95), ("s3://in/4.jpg", None, "not an image")], DAY1))
    _commit(out, "d2", _rows("d2", [("s3://in/5.jpg", "mask", 0.8), ("s3://in/6.jpg", None, "truncated image"),
                                    ("s3://in/7.jpg", None, "unreadable: not found")], DAY2))
    _commit(out, "empty", None)  # an --allow-empty run: committed, no files
    # An attempt that never committed: its rows must not be visible.
    crashed = results.AttemptWriter(out, "d3", results.results_schema(["mask", "no_mask"]))
    crashed.write(_rows("d3", [("s3://in/8.jpg", "mask", 0.7)], DAY2))
    crashed.close()
    return out


def test_summary_per_run(s3_results):
    rows = {r["run_id"]: r for r in query.summary(s3_results).to_pylist()}
    assert set(rows) == {"d1", "d2", "empty"}
    d1, d2, empty = rows["d1"], rows["d2"], rows["empty"]
    assert (d1["images"], d1["ok"], d1["errors"]) == (4, 3, 1)
    assert d1["labels"] == "mask: 1, no_mask: 2" and d1["model_id"] == "model-a"
    assert d1["mean_confidence"] == pytest.approx((0.9 + 0.55 + 0.95) / 3, abs=1e-4)
    assert (d2["images"], d2["ok"], d2["errors"], d2["labels"]) == (3, 1, 2, "mask: 1")
    assert (empty["images"], empty["ok"], empty["errors"]) == (0, 0, 0)
    assert (d1["precision"], d1["actors"], d1["elapsed_s"]) == ("fp32", 2, 1.2)  # rounded to 0.1 s
    assert [r["version"] for r in rows.values()] == [1, 2, 3] and d1["committed_at"] <= d2["committed_at"]


def test_arbitrary_sql_and_runs_view(s3_results):
    t = query.query(s3_results, "SELECT label, count(*) AS n FROM predictions WHERE status = 'ok' "
                                "GROUP BY label ORDER BY label")
    assert t.to_pylist() == [{"label": "mask", "n": 2}, {"label": "no_mask", "n": 2}]
    t = query.query(s3_results, "SELECT r.run_id, count(p.path) AS n FROM runs r LEFT JOIN predictions p "
                                "USING (run_id) GROUP BY r.run_id ORDER BY r.run_id")
    assert t.to_pylist() == [{"run_id": "d1", "n": 4}, {"run_id": "d2", "n": 3}, {"run_id": "empty", "n": 0}]
    assert "s3://in/8.jpg" not in query.query(s3_results, "SELECT path FROM predictions").column("path").to_pylist()
    assert query.query(s3_results, "SELECT path FROM predictions", run_ids=["d2"]).num_rows == 3
    assert query.query(s3_results, "SELECT path FROM predictions", max_rows=2).num_rows == 2


def test_readme_examples(s3_results):
    per_day = query.query(s3_results, query.EXAMPLES["no-mask rate per day"]).to_pylist()
    assert [(str(r["day"]), r["images"], r["no_mask_rate"]) for r in per_day] == [
        ("2025-03-01", 3, 0.667), ("2025-03-02", 1, 0.0)]  # days in UTC
    low = query.query(s3_results, query.EXAMPLES["low-confidence images"]).to_pylist()
    assert [r["path"] for r in low] == ["s3://in/2.jpg"]
    reasons = {r["reason"]: r["images"] for r in query.query(s3_results, query.EXAMPLES["errors by reason"]).to_pylist()}
    assert reasons == {"not an image": 1, "truncated image": 1, "unreadable": 1}


def test_no_extension_can_be_downloaded(s3_results):
    con = query.connect(s3_results)
    assert con.sql("SELECT current_setting('autoinstall_known_extensions')").fetchall() == [(False,)]
    assert not con.sql("SELECT * FROM duckdb_extensions() WHERE extension_name = 'httpfs' AND loaded").fetchall()


def test_user_errors(s3_results, s3_bucket):
    with pytest.raises(UserError, match="No committed runs"):
        query.summary(s3_bucket + "/nothing-here")
    with pytest.raises(UserError, match="The query failed"):
        query.query(s3_results, "SELECT nope FROM predictions")
    with pytest.raises(UserError, match="No committed run 'zz'"):
        query.query(s3_results, "SELECT 1", run_ids=["zz"])


def test_formats():
    t = pa.table({"a": [1, 2], "b": ["x", None]})
    assert query.format_table(t, "csv").splitlines() == ['"a","b"', '1,"x"', "2,"]
    assert [json.loads(x) for x in query.format_table(t, "json").splitlines()] == [{"a": 1, "b": "x"},
                                                                                    {"a": 2, "b": None}]
    assert "a" in query.format_table(t) and query.format_table(pa.table({})) == "ok"


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.query", *args], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)


def test_jobs_query_cli_on_s3(s3_results, s3_bucket):
    done = _job("--results", s3_results, "--summary", "--format", "json",
                "SELECT count(*) AS n FROM predictions WHERE status = 'error'")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.strip().splitlines()]
    assert [x["run_id"] for x in lines[:3]] == ["d1", "d2", "empty"] and lines[3] == {"n": 3}
    bad = _job("--results", s3_bucket + "/missing", "--summary")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: No committed runs")
    nothing = _job("--results", s3_results)
    assert nothing.returncode == 2 and "pass a SQL query" in nothing.stderr


def test_time_travel_and_a_replaced_run_in_runs(s3_results):
    before = max(r.version for r in results.list_commits(s3_results))
    _commit(s3_results, "d1", _rows("d1", [("s3://in/9.jpg", "mask", 0.99)], DAY2))  # re-scored: replaces d1
    runs = query.query(s3_results, "SELECT run_id, images, files, rows, version, config FROM runs ORDER BY run_id")
    assert runs.to_pylist()[0] == {"run_id": "d1", "images": 1, "files": 1, "rows": 1, "version": before + 1,
                                   "config": '{"run_id": "d1"}'}  # only the latest commit of d1
    meta = json.loads(query.query(s3_results, "SELECT metadata FROM runs WHERE run_id = 'd1'").column(0)[0].as_py())
    assert meta["elapsed_s"] == 1.23 and meta["counts"] == {"images": 1} and meta["format_version"] == 2
    assert query.query(s3_results, "SELECT count(*) AS n FROM predictions").to_pylist() == [{"n": 4}]
    old = {r["run_id"]: r for r in query.summary(s3_results, version=before).to_pylist()}
    assert (old["d1"]["images"], old["d1"]["version"]) == (4, 1)  # the table as it was: rows and metadata
    done = _job("--results", s3_results, "--as-of-version", str(before), "--format", "json",
                "SELECT count(*) AS n FROM predictions")
    assert done.returncode == 0 and json.loads(done.stdout) == {"n": 7}, done.stderr
    bad = _job("--results", s3_results, "--as-of-version", "99", "--summary")
    assert bad.returncode == 2 and "has no version 99" in bad.stderr.strip().splitlines()[-1]
