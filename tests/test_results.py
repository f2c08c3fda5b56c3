"""The results contract: the schema constant, the commit protocol and the reader (no Ray needed)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskmodel import results, storage

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
    assert schema.names == ["path", "version", "size", "status", "error", "label", "confidence",
                            "p_mask", "p_no_mask", "p_Without_Mask", "width", "height", "model_id", "run_id",
                            "scored_at"]
    assert all(schema.field(n).type == pa.float32() for n in results.classes_of(schema))
    assert schema.field("scored_at").type == pa.timestamp("us", tz="UTC")
    assert results.RESULTS_SCHEMA.names == [n for n in schema.names if not n.startswith("p_")]
    with pytest.raises(ValueError, match="collide"):
        results.results_schema(["no mask", "no-mask"])


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "x y", ".hidden"])
def test_run_id_must_be_a_safe_name(bad):
    with pytest.raises(ValueError):
        results.validate_run_id(bad)


def test_writer_rolls_files_and_commit_lists_exactly_them(out):
    schema = results.results_schema(["mask", "no_mask"])
    w = results.AttemptWriter(out, "r1", schema, rows_per_file=4, row_group_rows=3)
    for chunk in ([f"s3://in/{i}.jpg" for i in range(3)], [f"s3://in/{i}.jpg" for i in range(3, 10)]):
        w.write(rows(chunk))
    record = results.commit(w, meta={"counts": {"images": 10}})
    assert [f.rows for f in record.files] == [4, 4, 2]
    assert record.raw["counts"] == {"images": 10} and record.raw["columns"] == schema.names
    files = results.committed_files(out)
    assert len(files) == 3 and all(storage.exists(f) for f in files)
    for f in files:  # each listed file is a complete Parquet file of the schema
        fs, path = storage.pyarrow_filesystem(f)
        assert pq.read_schema(path, filesystem=fs).remove_metadata() == schema.remove_metadata()
    table = results.read_results(out)
    assert table.num_rows == 10 and table.schema.remove_metadata() == schema.remove_metadata()
    assert sorted(table.column("path").to_pylist()) == sorted(f"s3://in/{i}.jpg" for i in range(10))


def test_uncommitted_attempts_and_stray_files_are_invisible(out):
    schema = results.results_schema(["mask", "no_mask"])
    w = results.AttemptWriter(out, "r1", schema, rows_per_file=2)
    w.write(rows(["a", "b", "c"]))
    w.close()  # files written, but never committed: a crashed run
    assert results.list_commits(out) == [] and results.committed_files(out) == []
    assert results.read_results(out).num_rows == 0
    good = results.AttemptWriter(out, "r2", schema)
    good.write(rows(["d"], run_id="r2"))
    results.commit(good, meta={})
    # A stray Parquet file next to committed ones, and a leftover temp commit record.
    storage.write_bytes(storage.join(out, "run_id=r2", "stray.parquet"), b"junk")
    storage.write_bytes(storage.join(out, "_commits", "r9.json.tmp-123"), b"{")
    assert results.read_results(out).column("path").to_pylist() == ["d"]
    assert [r.run_id for r in results.list_commits(out)] == ["r2"]


def test_recommit_same_run_id_replaces_and_deletes_old_attempts(out):
    schema = results.results_schema(["mask", "no_mask"])
    crashed = results.AttemptWriter(out, "r1", schema)
    crashed.write(rows(["x"]))
    crashed.close()
    first = results.AttemptWriter(out, "r1", schema)
    first.write(rows(["a", "b"]))
    results.commit(first, meta={})
    second = results.AttemptWriter(out, "r1", schema)
    second.write(rows(["a", "b", "c"]))
    results.commit(second, meta={})
    table = results.read_results(out)
    assert sorted(table.column("path").to_pylist()) == ["a", "b", "c"]
    assert storage.listdir(results.run_dir(out, "r1")) == [f"attempt-{second.attempt}"]


def test_reader_unifies_runs_with_different_classes_and_selects_runs(tmp_path):
    out = str(tmp_path / "r")
    w1 = results.AttemptWriter(out, "a", results.results_schema(["mask", "no_mask"]))
    w1.write(rows(["1"], run_id="a"))
    results.commit(w1, meta={})
    w2 = results.AttemptWriter(out, "b", results.results_schema(["WithMask", "WithoutMask"]))
    w2.write(rows(["2"], run_id="b", classes=("WithMask", "WithoutMask")))
    results.commit(w2, meta={})
    table = results.read_results(out).sort_by("path")
    assert {"p_mask", "p_no_mask", "p_WithMask", "p_WithoutMask"} <= set(table.column_names)
    assert table.column("p_mask").to_pylist() == [0.5, None]
    assert table.column("p_WithMask").to_pylist() == [None, 0.5]
    assert results.read_results(out, ["b"]).column("path").to_pylist() == ["2"]
    with pytest.raises(Exception, match="No committed run 'zzz'"):
        results.read_results(out, ["zzz"])


def test_empty_committed_run_reads_as_zero_rows(tmp_path):
    out = str(tmp_path / "r")
    w = results.AttemptWriter(out, "empty", results.results_schema(["mask", "no_mask"]))
    record = results.commit(w, meta={})
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
    keys = results.committed_keys(out)
    probe = results.object_keys(["ok1", "ok1", "bad", "gone", "new"], ["v1", "v2", "v1", "v1", "v1"])
    assert results.contains(keys, probe).tolist() == [True, False, True, False, False]
    assert len(results.committed_keys(out, exclude_run_id="r1")) == 0
    assert results.contains(results.committed_keys(str(tmp_path / "none")), probe).tolist() == [False] * 5


def test_invalid_commit_record_is_one_sentence(tmp_path):
    out = str(tmp_path / "r")
    storage.write_json(storage.join(out, "_commits", "x.json"), {"format": "something else"})
    with pytest.raises(Exception) as e:
        results.list_commits(out)
    assert "not a valid maskmodel commit record" in str(e.value) and "\n" not in str(e.value)
