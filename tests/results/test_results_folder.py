"""Issue 31: the results folder is checked before any work, and vacuum deletes only what this product wrote.

R22 (delta-rs #2097): a folder holding someone else's Hive-style Parquet must be refused, and no job may
ever delete that file. A table another writer upgraded (deletionVectors: delta-rs #4079, #3543) is refused
before scoring, naming the feature. No Ray: the door checks and maintenance are plain functions.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskmodel import results
from maskmodel.errors import UserError
from maskmodel.results import delta, incremental, query
from maskmodel.results.maintenance import MaintainConfig, maintain

from tests.results.test_results_delta import CLASSES
from tests.results.test_results_delta import rows as _rows
from tests.results.test_results_delta import writer as _writer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
def _foreign(out: str, rel: str) -> str:
    """A user's own Parquet file (not written by maskmodel) at ``out/rel``."""
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    return path


def test_the_writers_file_names_are_the_ones_vacuum_recognises(tmp_path):
    w = _writer(str(tmp_path / "o"), "night-1", ["a"])
    w.close()
    compact = results.AttemptWriter(str(tmp_path / "o"), "night-1", results.results_schema(CLASSES),
                                    attempt=f"{results.utc_now():%Y%m%dT%H%M%SZ}-compact-0123abcd")
    compact.write(_rows("night-1", ["b"]))
    for f in w.files + compact.close():
        assert delta.WRITER_FILE.match(f.path), f.path
    for name in ("run_id=2025-01-01/part-0.parquet", "run_id=x/part-00000-abc.zstd.parquet", "part-0.parquet",
                 "run_id=x/y/part-00000-20250101T000000Z-0123abcd.zstd.parquet"):
        assert not delta.WRITER_FILE.match(name), name


@pytest.mark.parametrize("rel", ["run_id=2025-01-01/part-0.parquet", "run_id=2025-01-01/sub/part-0.parquet",
                                 "date=2025-01-01/part-0.parquet", "part-0.parquet"])
def test_foreign_parquet_in_any_layout_is_refused_in_one_sentence(tmp_path, rel):
    out = str(tmp_path / "scores")
    _writer(out, "killed", ["a"]).close()  # a killed attempt's own files are fine
    _foreign(out, rel)
    with pytest.raises(UserError) as e:
        results.check_output(out)
    text = str(e.value)
    assert "not a results table" in text and "\n" not in text and text.count(". ") == 0


def test_another_tables_log_is_refused(tmp_path):
    from deltalake import write_deltalake

    out = str(tmp_path / "scores")
    write_deltalake(out, pa.table({"run_id": ["a"], "x": [1]}), partition_by=["run_id"])
    with pytest.raises(UserError, match="is a Delta table but not a maskmodel results table"):
        results.check_output(out)


def test_r22_the_foreign_file_survives_every_job(tmp_path):
    from maskmodel.score import scoring
    from maskmodel.score.plan import ScoreConfig
    from tests.score.test_scoring import write_model

    out = str(tmp_path / "scores")
    foreign = _foreign(out, "run_id=2025-01-01/part-0.parquet")
    with pytest.raises(UserError, match="did not write"):  # jobs.score's door check, before any work
        results.check_output(out)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    write_model(str(tmp_path / "model"))
    with pytest.raises(UserError, match="did not write"):  # the whole job's preparation: before Ray starts
        scoring.prepare(ScoreConfig(input=str(tmp_path / "in"), model=str(tmp_path / "model"), output=out))
    with pytest.raises(UserError):  # jobs.maintain: no results table here
        maintain(MaintainConfig(results=out, retention_hours=0))
    assert incremental.committed_keys(out).tolist() == []  # --incremental reads, deletes nothing
    assert os.path.isfile(foreign)

    # A table made elsewhere first, the user's file dropped into it afterwards: maintenance leaves it alone.
    other = str(tmp_path / "table")
    results.commit(_writer(other, "night-1", [f"s3://in/a{i}.jpg" for i in range(4)], rows_per_file=2), meta={})
    killed = _writer(other, "night-2", ["s3://in/b.jpg"])
    killed.close()
    foreign = _foreign(other, "run_id=2025-01-01/part-0.parquet")
    results.check_output(other)  # a results table: accepted
    dry = maintain(MaintainConfig(results=other, retention_hours=0, dry_run=True))
    assert dry.vacuumed == tuple(f.path for f in killed.files) and dry.left_alone == ("run_id=2025-01-01/part-0.parquet",)
    done = maintain(MaintainConfig(results=other, retention_hours=0))
    assert os.path.isfile(foreign)
    assert [f.path for f in killed.files if os.path.exists(os.path.join(other, f.path))] == []
    assert done.left_alone == ("run_id=2025-01-01/part-0.parquet",)
    assert "left 1 files alone that it did not write" in done.summary_line()
    assert results.read_results(other).num_rows == 4
    cli = subprocess.run([sys.executable, "-m", "jobs.maintain", "--results", other, "--retention-hours", "0"],
                         cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "left 1 files alone" in cli.stdout, cli.stderr
    assert os.path.isfile(foreign)


def test_a_table_with_a_feature_deltalake_cannot_honour_is_refused_naming_it(tmp_path):
    from deltalake import DeltaTable
    from deltalake._internal import TableFeatures

    out = str(tmp_path / "scores")
    results.commit(_writer(out, "night-1", ["a", "b"]), meta={})
    DeltaTable(out).alter.add_feature(TableFeatures.DeletionVectors, allow_protocol_versions_increase=True)
    with pytest.raises(UserError, match="deletionVectors") as e:
        results.check_output(out)  # jobs.score: before scoring
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="deletionVectors"):
        query.query(out, "SELECT count(*) FROM predictions")
    with pytest.raises(UserError, match="deletionVectors"):
        incremental.committed_keys(out)
