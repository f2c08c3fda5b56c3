"""The results contract: the schema constant, the Delta table's commits, readers, time travel and vacuum (no Ray)."""

from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from maskmodel import results
from maskmodel.errors import UserError
from maskmodel.io import objectkeys, storage
from maskmodel.results import delta, incremental

NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def rows(paths, *, run_id="r1", status="ok", error=None, version="v1", classes=("mask", "no_mask")) -> pa.Table:
    n = len(paths)
    cols = {"path": paths, "version": [version] * n, "status": [status] * n, "error": [error] * n,
            "label": [classes[0] if status == "ok" else None] * n, "model_id": ["m1"] * n,
            "run_id": [run_id] * n, "scored_at": [NOW] * n}
    for c in classes:
        cols[results.prob_column(c)] = [0.5 if status == "ok" else None] * n
    return pa.table(cols)


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "results")
    return request.getfixturevalue("s3_bucket") + "/results"


def test_schema_constant_and_class_columns():
    schema = results.results_schema(["mask", "no mask", "Without-Mask"])
    assert schema.names == ["path", "archive", "member", "version", "size", "status", "error", "label", "alert",
                            "confidence",
                            "p_mask", "p_no_mask", "p_Without_Mask", "width", "height", "faces", "faces_found",
                            "faces_dropped", "detector", "model_id", "run_id", "scored_at"]
    face = schema.field("faces").type.value_type
    assert [f.name for f in face] == ["x0", "y0", "x1", "y1", "score", "label", "confidence", "probs"]
    assert face.field("probs").type == pa.list_(pa.float32()) and schema.field("faces_found").type == pa.int32()
    assert all(schema.field(n).type == pa.float32() for n in results.classes_of(schema))
    assert schema.field("scored_at").type == pa.timestamp("us", tz="UTC")
    assert results.RESULTS_SCHEMA.names == [n for n in schema.names if not n.startswith("p_")]
    with pytest.raises(ValueError, match="collide"):
        results.results_schema(["no mask", "no-mask"])


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "x y", ".hidden"])
def test_run_id_must_be_a_safe_name(bad):
    with pytest.raises(ValueError):
        results.validate_run_id(bad)


def _files_under(uri: str) -> list[str]:
    return sorted(f.uri for f in storage.list_files(uri)) if storage.exists(uri) else []


def test_writer_rolls_files_and_commit_adds_exactly_them(out):
    schema = results.results_schema(["mask", "no_mask"])
    w = results.AttemptWriter(out, "r1", schema, rows_per_file=4, row_group_rows=3)
    for chunk in ([f"s3://in/{i}.jpg" for i in range(3)], [f"s3://in/{i}.jpg" for i in range(3, 10)]):
        w.write(rows(chunk))
    record = results.commit(w, meta={"counts": {"images": 10}})
    assert [f.rows for f in record.files] == [4, 4, 2] and record.version == 1  # version 0 created the table
    assert record.raw["counts"] == {"images": 10} and record.raw["columns"] == schema.names
    [listed] = results.list_commits(out)
    assert sorted(f.path for f in listed.files) == sorted(f.path for f in record.files)
    assert listed.raw == record.raw and listed.version == 1 and listed.uri.endswith("_delta_log/" + "0" * 19 + "1.json")
    for f in record.files:  # complete Parquet files without run_id: it is the Delta partition value
        assert f.path.startswith("run_id=r1/part-") and w.attempt in f.path
        fs, path = storage.pyarrow_filesystem(storage.join(out, f.path))
        assert pq.read_schema(path, filesystem=fs).remove_metadata() == results.file_schema(schema).remove_metadata()
        stats = json.loads(f.stats)  # per-file statistics for data skipping, in the Delta log
        assert stats["numRecords"] == f.rows and stats["nullCount"]["confidence"] == f.rows
        assert stats["minValues"]["scored_at"] == "2025-01-02T03:04:05.000Z"
    table = results.read_results(out)
    assert table.num_rows == 10 and table.schema.remove_metadata() == schema.remove_metadata()
    assert sorted(table.column("path").to_pylist()) == sorted(f"s3://in/{i}.jpg" for i in range(10))
    assert set(table.column("run_id").to_pylist()) == {"r1"}
    with pytest.raises(ValueError, match="another run id"):
        results.AttemptWriter(out, "r2", schema).write(rows(["x"], run_id="r1"))


def test_uncommitted_attempts_and_stray_files_are_invisible(out):
    schema = results.results_schema(["mask", "no_mask"])
    w = results.AttemptWriter(out, "r1", schema, rows_per_file=2)
    w.write(rows(["a", "b", "c"]))
    w.close()  # files written, but never committed: a crashed run
    assert len(_files_under(results.run_dir(out, "r1"))) == 2
    assert results.list_commits(out) == [] and results.read_results(out).num_rows == 0
    results.check_output(out)  # a crashed first run's leftovers do not block the re-run
    good = results.AttemptWriter(out, "r2", schema)
    good.write(rows(["d"], run_id="r2"))
    results.commit(good, meta={})
    storage.write_bytes(storage.join(out, "run_id=r2", "stray.parquet"), b"junk")  # a stray file in a partition
    assert results.read_results(out).column("path").to_pylist() == ["d"]
    assert [r.run_id for r in results.list_commits(out)] == ["r2"]
    assert incremental.committed_keys(out).tolist() == objectkeys.object_keys(["d"], ["v1"]).tolist()


def test_recommit_replaces_in_one_commit_and_old_versions_stay_readable_until_vacuumed(out):
    schema = results.results_schema(["mask", "no_mask"])
    crashed = results.AttemptWriter(out, "r1", schema)
    crashed.write(rows(["x"]))
    crashed.close()
    first = results.AttemptWriter(out, "r1", schema)
    first.write(rows(["a", "b"]))
    v1 = results.commit(first, meta={"model_id": "old"}).version
    second = results.AttemptWriter(out, "r1", schema)
    second.write(rows(["a", "b", "c"]))
    v2 = results.commit(second, meta={"model_id": "new"}).version
    assert v2 == v1 + 1  # one commit: the new files added, the old ones removed
    assert sorted(results.read_results(out).column("path").to_pylist()) == ["a", "b", "c"]
    [run] = results.list_commits(out)
    assert (run.attempt, run.raw["model_id"], run.version) == (second.attempt, "new", v2)  # no stale metadata
    # Time travel: the replaced run as it was, metadata included.
    assert sorted(results.read_results(out, version=v1).column("path").to_pylist()) == ["a", "b"]
    assert results.list_commits(out, version=v1)[0].raw["model_id"] == "old"
    with pytest.raises(UserError, match="has no version 99"):
        results.read_results(out, version=99)
    # Orphans (crashed attempt) and replaced files stay until a vacuum past their retention.
    assert len(_files_under(results.run_dir(out, "r1"))) == 3
    assert delta.vacuum(out, retention_hours=24) == []
    gone = delta.vacuum(out, retention_hours=0)
    assert len(gone) == 2 and all(crashed.attempt in p or first.attempt in p for p in gone)
    assert _files_under(results.run_dir(out, "r1")) == [storage.join(out, f.path) for f in run.files]
    assert sorted(results.read_results(out).column("path").to_pylist()) == ["a", "b", "c"]


def test_runs_with_different_classes_evolve_the_schema_and_select_runs(tmp_path):
    out = str(tmp_path / "r")
    w1 = results.AttemptWriter(out, "a", results.results_schema(["mask", "no_mask"]))
    w1.write(rows(["1"], run_id="a"))
    results.commit(w1, meta={})
    w2 = results.AttemptWriter(out, "b", results.results_schema(["WithMask", "WithoutMask"]))
    w2.write(rows(["2"], run_id="b", classes=("WithMask", "WithoutMask")))
    results.commit(w2, meta={})
    table = results.read_results(out).sort_by("path")
    assert table.column_names[9:14] == ["confidence", "p_mask", "p_no_mask", "p_WithMask", "p_WithoutMask"]
    assert table.column("p_mask").to_pylist() == [0.5, None]
    assert table.column("p_WithMask").to_pylist() == [None, 0.5]
    assert results.read_results(out, ["b"]).column("path").to_pylist() == ["2"]
    with pytest.raises(UserError, match="No committed run 'zzz'"):
        results.read_results(out, ["zzz"])
    # A third run with the first class set neither drops nor reorders the others' columns.
    w3 = results.AttemptWriter(out, "c", results.results_schema(["mask", "no_mask"]))
    w3.write(rows(["3"], run_id="c"))
    results.commit(w3, meta={})
    assert results.read_results(out).schema.names == table.schema.names
    with pytest.raises(UserError, match="changes type|is float"):
        results.merge_schemas(table.schema, pa.schema([pa.field("p_mask", pa.string())]))


def test_the_alert_column_appends_to_a_table_written_before_it_and_reads_back_in_duckdb(tmp_path):
    """A table whose runs predate the ``alert`` verdict column takes a run with it: one schema evolution, the
    old rows' verdict null, the new rows' as written, through Delta's reader and DuckDB alike (issue 27)."""
    from maskmodel.results import query

    out = str(tmp_path / "r")
    old_schema = results.results_schema(["mask", "no_mask"])
    old_schema = old_schema.remove(old_schema.get_field_index("alert"))  # the previous version's files
    w1 = results.AttemptWriter(out, "old", old_schema)
    w1.write(rows(["1", "2"], run_id="old"))
    results.commit(w1, meta={})
    assert "alert" not in results.read_results(out).column_names
    classes = ("mask", "mask_incorrect", "no_mask")
    new = rows(["3", "4", "5"], run_id="new", classes=classes)
    new = new.set_column(new.column_names.index("label"), "label", pa.array(["mask_incorrect", "mask", None]))
    new = new.append_column("alert", pa.array([True, False, None]))
    w2 = results.AttemptWriter(out, "new", results.results_schema(classes))
    w2.write(new)
    results.commit(w2, meta={})
    table = results.read_results(out).sort_by("path")
    assert table.schema.field("alert").type == pa.bool_()
    assert table.column("alert").to_pylist() == [None, None, True, False, None]
    got = query.query(out, "SELECT run_id, count(*) FILTER (WHERE alert) AS alerts, count(alert) AS known "
                           "FROM predictions GROUP BY run_id ORDER BY run_id").to_pylist()
    assert got == [{"run_id": "new", "alerts": 1, "known": 2}, {"run_id": "old", "alerts": 0, "known": 0}]


def test_empty_committed_run_reads_as_zero_rows(tmp_path):
    out = str(tmp_path / "r")
    w = results.AttemptWriter(out, "empty", results.results_schema(["mask", "no_mask"]))
    record = results.commit(w, meta={"counts": {"images": 0}})
    assert record.files == () and results.list_commits(out)[0].run_id == "empty"
    assert results.read_results(out).num_rows == 0


def test_committed_keys_skip_scored_pairs_but_retry_read_failures(tmp_path):
    out = str(tmp_path / "r")
    schema = results.results_schema(["mask", "no_mask"])
    w = results.AttemptWriter(out, "r1", schema)
    w.write(rows(["ok1", "ok2"]))
    w.write(rows(["bad"], status="error", error="not an image"))
    w.write(rows(["gone"], status="error", error="unreadable: not found"))
    results.commit(w, meta={})
    keys = incremental.committed_keys(out)
    probe = objectkeys.object_keys(["ok1", "ok1", "bad", "gone", "new"], ["v1", "v2", "v1", "v1", "v1"])
    assert objectkeys.contains(keys, probe).tolist() == [True, False, True, False, False]
    assert len(incremental.committed_keys(out, exclude_run_id="r1")) == 0
    assert objectkeys.contains(incremental.committed_keys(str(tmp_path / "none")), probe).tolist() == [False] * 5


def test_output_that_is_not_a_results_table_is_one_sentence(tmp_path):
    old = str(tmp_path / "old")
    storage.write_json(storage.join(old, "_commits", "x.json"), {"format": "maskmodel.results"})
    for call in (lambda: results.list_commits(old), lambda: results.check_output(old)):
        with pytest.raises(UserError) as e:
            call()
        assert "pre-Delta format" in str(e.value) and "\n" not in str(e.value)
    other = str(tmp_path / "other")
    storage.write_bytes(storage.join(other, "data.csv"), b"a,b\n")
    with pytest.raises(UserError, match="holds other files"):
        results.check_output(other)
    foreign = str(tmp_path / "foreign")
    DeltaTable.create(foreign, pa.schema([("x", pa.int64())]))
    with pytest.raises(UserError, match="not a maskmodel results table"):
        results.check_output(foreign)
    results.check_output(str(tmp_path / "new"))  # absent: fine


def test_nothing_secret_is_written_to_the_table(s3_bucket):
    out = s3_bucket + "/results"
    w = results.AttemptWriter(out, "r1", results.results_schema(["mask", "no_mask"]))
    w.write(rows(["a"]))
    results.commit(w, meta={"config": {"output": out}})
    fs, path = storage.filesystem(storage.join(out, "_delta_log"))
    text = "".join(fs.cat_file(p).decode() for p in fs.find(path))
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text  # "testing" in the moto fixture
    assert "AWS_" not in text and "conditional_put" not in text
