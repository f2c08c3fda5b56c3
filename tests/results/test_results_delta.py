"""The results folder as other tools see it: a Delta table that every engine reads alike, concurrent commits, upkeep.

Issue 11's complaint, reproduced: a folder with one committed run (150 rows)
and one run killed mid-way (16 rows written, never committed). Plain Parquet
globs count 166; every Delta reader counts 150.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from deltalake import DeltaTable

from maskmodel import results
from maskmodel.io import storage
from maskmodel.results import delta, query
from maskmodel.results.maintenance import MaintainConfig, compact_run, maintain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ("mask", "no_mask")
WHEN = dt.datetime(2025, 3, 1, 2, 0, tzinfo=dt.timezone.utc)


def rows(run_id: str, paths: list[str]) -> pa.Table:
    n = len(paths)
    return pa.table({"path": paths, "version": ["v"] * n, "status": ["ok"] * n, "label": ["mask"] * n,
                     "confidence": pa.array([0.9] * n, pa.float32()), "p_mask": pa.array([0.9] * n, pa.float32()),
                     "p_no_mask": pa.array([0.1] * n, pa.float32()), "model_id": ["m1"] * n,
                     "run_id": [run_id] * n, "scored_at": pa.array([WHEN] * n, pa.timestamp("us", tz="UTC"))})


def writer(out: str, run_id: str, paths: list[str], **kw) -> results.AttemptWriter:
    w = results.AttemptWriter(out, run_id, results.results_schema(CLASSES), **kw)
    w.write(rows(run_id, paths))
    return w


@pytest.fixture
def crashed_night(tmp_path):
    """One committed run of 150 rows, and a run killed after writing 16 rows (its files exist, no commit)."""
    out = str(tmp_path / "scores")
    results.commit(writer(out, "night-1", [f"s3://in/a{i}.jpg" for i in range(150)], rows_per_file=60),
                   meta={"counts": {"images": 150, "ok": 150, "errors": 0}, "model_id": "m1"})
    writer(out, "night-2", [f"s3://in/b{i}.jpg" for i in range(16)], rows_per_file=8).close()
    return out


def test_every_delta_reader_counts_only_committed_rows(crashed_night):
    out = crashed_night
    # The complaint: anything that globs the Parquet files also counts the killed run.
    assert pads.dataset(out, format="parquet", partitioning="hive").count_rows() == 166
    assert len(pd.read_parquet(out)) == 166  # no longer fails (run_id is only a folder now), but still wrong
    table = DeltaTable(out)
    assert table.to_pyarrow_dataset().count_rows() == 150
    df = table.to_pandas()  # pandas
    assert len(df) == 150 and set(df["run_id"]) == {"night-1"} and df["path"].is_unique
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.register("predictions", table.to_pyarrow_dataset())  # DuckDB, offline: no delta extension
    assert con.sql("SELECT run_id, count(*) FROM predictions GROUP BY run_id").fetchall() == [("night-1", 150)]
    pl = pytest.importorskip("polars")
    assert pl.read_delta(out).height == 150
    assert pl.scan_delta(out).group_by("run_id").len().collect().rows() == [("night-1", 150)]
    # maskmodel's own readers agree, and a data file alone reads cleanly (no run_id column to clash).
    assert results.read_results(out).num_rows == 150
    assert query.query(out, "SELECT count(*) AS n FROM predictions").to_pylist() == [{"n": 150}]
    one = storage.join(out, results.list_commits(out)[0].files[0].path)
    assert len(pd.read_parquet(one)) == 60 and "run_id" not in pd.read_parquet(one).columns


def test_concurrent_commits_on_s3(s3_bucket):
    """Different run ids committing at once all land; one run id committed four times at once shows once."""
    out = s3_bucket + "/scores"
    for i in range(4):  # r0..r3 exist: the concurrent commits replace them (and remove files: a harder race)
        results.commit(writer(out, f"r{i}", [f"s3://in/old-r{i}.jpg"]), meta={})
    writers = [writer(out, f"r{i}", [f"s3://in/r{i}-{j}.jpg" for j in range(3)]) for i in range(4)]
    writers += [writer(out, "same", [f"s3://in/same-w{i}-{j}.jpg" for j in range(i + 1)]) for i in range(4)]
    for w in writers:  # the data files are written; what races is the commit
        w.close()
    start, errors = threading.Barrier(len(writers)), []

    def commit(w: results.AttemptWriter) -> None:
        start.wait()
        try:
            results.commit(w, meta={"attempt_of": w.attempt})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    table = results.read_results(out)
    counts = {r["run_id"]: r["n"] for r in pa.TableGroupBy(table, "run_id").aggregate([("path", "count")])
              .rename_columns(["run_id", "n"]).to_pylist()}
    assert {k: counts[k] for k in ("r0", "r1", "r2", "r3")} == {f"r{i}": 3 for i in range(4)}
    assert not [p for p in table.column("path").to_pylist() if "old-" in p]
    same = sorted(p for p, r in zip(table.column("path").to_pylist(), table.column("run_id").to_pylist())
                  if r == "same")
    winners = {p.split("-")[1] for p in same}
    assert len(winners) == 1, same  # exactly one writer's rows, never a mix
    [run] = [r for r in results.list_commits(out) if r.run_id == "same"]
    w = writers[4 + int(winners.pop()[1])]
    assert run.attempt == w.attempt and len(same) == run.rows  # its metadata is the winner's...
    same_commits = [c for c in delta.run_commits(out) if c[delta.RUN_KEY]["run_id"] == "same"]
    assert len(same_commits) == 4 and run.version == same_commits[-1]["version"]  # ...the last of four commits


def test_maintenance_compacts_and_vacuums_without_changing_rows_or_runs(crashed_night):
    out = crashed_night
    results.commit(writer(out, "night-3", [f"s3://in/c{i}.jpg" for i in range(10)], rows_per_file=2), meta={})
    before = query.query(out, "SELECT * EXCLUDE (files) FROM runs ORDER BY run_id")
    rows_before = query.query(out, "SELECT * FROM predictions ORDER BY path")
    result = maintain(MaintainConfig(results=out, retention_hours=0))
    assert [(c.run_id, c.files_before, c.files_after, c.committed) for c in result.compacted] == [
        ("night-1", 3, 1, True), ("night-3", 5, 1, True)]
    assert len(result.vacuumed) == 2 + 8  # the killed run's files, then the compacted ones (retention 0)
    assert query.query(out, "SELECT * EXCLUDE (files) FROM runs ORDER BY run_id") == before
    assert query.query(out, "SELECT files FROM runs ORDER BY run_id").column("files").to_pylist() == [1, 1]
    assert query.query(out, "SELECT * FROM predictions ORDER BY path") == rows_before
    files = sorted(f.uri for f in storage.list_files(out) if "_delta_log" not in f.uri)
    assert files == sorted(storage.join(out, f.path) for r in results.list_commits(out) for f in r.files)
    again = maintain(MaintainConfig(results=out, retention_hours=0))
    assert again.compacted == () and again.vacuumed == ()


def test_compaction_never_shows_a_run_twice_when_the_run_is_rescored_meanwhile(tmp_path):
    out = str(tmp_path / "scores")
    results.commit(writer(out, "r", [f"old-{i}" for i in range(6)], rows_per_file=2), meta={})
    snapshot = delta.open_table(out)  # compaction reads this snapshot...
    results.commit(writer(out, "r", ["new-0"]), meta={})  # ...the run is re-scored before it commits
    done = compact_run(snapshot, out, "r", target_bytes=1 << 20)
    assert (done.files_before, done.files_after, done.committed) == (3, 1, False)
    assert results.read_results(out).column("path").to_pylist() == ["new-0"]
    # Without a race it commits, and a later re-score replaces the compacted files.
    results.commit(writer(out, "r", [f"old-{i}" for i in range(6)], rows_per_file=2), meta={})
    assert compact_run(delta.open_table(out), out, "r", target_bytes=1 << 20).committed
    assert [len(r.files) for r in results.list_commits(out)] == [1] and results.read_results(out).num_rows == 6
    results.commit(writer(out, "r", ["new-1"]), meta={})
    assert results.read_results(out).column("path").to_pylist() == ["new-1"]


def test_jobs_maintain_cli(crashed_night, tmp_path):
    def job(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jobs.maintain", *args], cwd=REPO, env=dict(os.environ),
                              capture_output=True, text=True, timeout=120)

    dry = job("--results", crashed_night, "--retention-hours", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would vacuum 2 unreferenced files" in dry.stdout
    assert len(delta.vacuum(crashed_night, retention_hours=0, dry_run=True)) == 2  # nothing was deleted
    kept = job("--results", crashed_night)  # default retention: a week; the killed run's files are too young
    assert kept.returncode == 0 and "vacuumed 0 unreferenced files" in kept.stdout, kept.stderr
    missing = job("--results", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: No results table")


class _CountingDataset:
    """A pyarrow dataset that counts its scans (everything else passes through)."""

    def __init__(self, dataset, counts: dict[str, int]) -> None:
        self._dataset, self._counts = dataset, counts

    def __getattr__(self, name):
        if name in ("to_batches", "to_table", "scanner"):
            self._counts["scans"] += 1
        return getattr(self._dataset, name)


@pytest.fixture
def table_reads(monkeypatch):
    """Counts Delta table loads (``open``), history reads and, when ``count_scans`` is set, dataset scans."""
    import deltalake

    counts = {"open": 0, "history": 0, "scans": 0, "count_scans": 0}
    real = deltalake.DeltaTable

    class Counting(real):
        def __init__(self, *a, **kw):
            counts["open"] += 1
            super().__init__(*a, **kw)

        def history(self, *a, **kw):
            counts["history"] += 1
            return super().history(*a, **kw)

        def to_pyarrow_dataset(self, *a, **kw):
            ds = super().to_pyarrow_dataset(*a, **kw)
            return _CountingDataset(ds, counts) if counts["count_scans"] else ds

    monkeypatch.setattr(deltalake, "DeltaTable", Counting)
    return counts


@pytest.mark.parametrize("args", [["--summary", "SELECT count(*) AS n FROM predictions"],
                                  ["--summary", "--run-id", "night-1", "--as-of-version", "1", "SELECT 1 AS one"]])
def test_jobs_query_opens_the_table_once_and_reads_one_snapshot(crashed_night, table_reads, capsys, args):
    from jobs import query as query_job

    results.commit(writer(crashed_night, "night-3", ["s3://in/c0.jpg"]), meta={})
    table_reads.update(open=0, history=0)
    assert query_job.main(["--results", crashed_night, *args]) == 0
    assert (table_reads["open"], table_reads["history"]) == (1, 1)
    out = capsys.readouterr().out
    assert "night-1" in out and ("night-3" in out) == ("--as-of-version" not in args)


def test_jobs_maintain_opens_the_table_once(crashed_night, table_reads):
    results.commit(writer(crashed_night, "night-3", [f"s3://in/c{i}.jpg" for i in range(10)], rows_per_file=2),
                   meta={})
    table_reads["open"] = 0
    result = maintain(MaintainConfig(results=crashed_night, retention_hours=0))
    assert [c.committed for c in result.compacted] == [True, True] and len(result.vacuumed) == 2 + 8
    assert table_reads["open"] == 1


def test_committed_keys_scan_the_table_once(tmp_path, table_reads):
    from maskmodel.io import objectkeys
    from maskmodel.results import incremental

    out = str(tmp_path / "scores")
    table = rows("r1", ["s3://in/a.jpg", "s3://in/b.tar#x.jpg"]).append_column("archive", pa.array([None, "s3://in/b.tar"]))
    w = results.AttemptWriter(out, "r1", results.results_schema(CLASSES))
    w.write(table)
    results.commit(w, meta={})
    table_reads.update(open=0, count_scans=1)
    keys = incremental.committed_keys(out)
    assert (table_reads["open"], table_reads["scans"]) == (1, 1)
    want = objectkeys.object_keys(["s3://in/a.jpg", "s3://in/b.tar#x.jpg", "s3://in/b.tar"], ["v"] * 3)
    assert objectkeys.contains(keys, want).all() and len(keys) == 3
