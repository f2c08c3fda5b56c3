"""The results contract: one row schema, a Delta Lake table of committed runs, its writer and its readers.

The results folder is a Delta table partitioned by ``run_id`` (any Delta reader
understands it: Spark, Trino, DuckDB, polars, pandas, Ray Data)::

    <output>/_delta_log/00000000000000000007.json            commits; a scoring commit holds its run's metadata
    <output>/run_id=<id>/part-00000-<attempt>.zstd.parquet    data files; ``run_id`` is the partition value, not a column

Promises:

- A scoring run becomes visible in exactly one Delta commit, made last: its
  data files are written first (:class:`AttemptWriter`), then :func:`commit`
  adds them and removes the run id's previous files in one transaction. An
  attempt that dies before that adds nothing: its files are orphans that no
  reader sees and :func:`maskmodel.results.delta.vacuum` deletes.
- Runs with different ids commit concurrently, on local disk and on S3
  (conditional PUTs); two commits of one run id never both show: the later
  replaces the earlier.
- The run's metadata (counts, model, input, config, timings) is stored in its
  commit (``commitInfo["maskmodel.run"]``); :func:`list_commits` shows each
  run's latest scoring commit only, so maintenance commits and replaced runs
  never show.
- Runs scored with different classes share the table: a new ``p_<class>``
  column is added by the run's commit; other runs read it as null.
- Readers (:func:`list_commits`, :func:`results_dataset`,
  :func:`read_results`, :func:`maskmodel.results.incremental.committed_keys`) read one snapshot, the latest or
  ``version=N`` (time travel), and never see uncommitted files.

The results table: one row per scored object, in a Delta Lake table of committed runs.

Owns: the one row schema, the attempt writer and the single commit that makes a run visible (:mod:`.schema`,
:mod:`.writer`, :mod:`.commit`; read back through :mod:`.readers`, all re-exported here), the Delta layer (:mod:`.delta`), the keys incremental runs skip
(:mod:`.incremental`), SQL over the table (:mod:`.query`), its maintenance (:mod:`.maintenance`), erasure on
request (:mod:`.erasure`), the Delta protocol features it accepts (:mod:`.protocol`), each run's profile
folded while scoring and stored in its commit (:mod:`.profile`) and drift checks over profiles (:mod:`.drift`).

May import: :mod:`maskmodel.io` and the shared pieces; it knows nothing of models, Ray or images.
"""

from maskmodel.results.commit import CommitRecord, commit
from maskmodel.results.delta import FileEntry
from maskmodel.results.readers import (
    Snapshot,
    check_output,
    list_commits,
    open_results,
    open_snapshot,
    read_results,
    results_dataset,
)
from maskmodel.results.schema import (
    DESCRIPTION,
    FORMAT,
    FORMAT_VERSION,
    PARTITION,
    PROB_PREFIX,
    FACE_TYPE,
    NO_DETECTOR,
    RESULTS_SCHEMA,
    RETRIED_ERROR_PREFIX,
    classes_of,
    conform,
    file_schema,
    log_uri,
    merge_schemas,
    prob_column,
    results_schema,
    run_dir,
    run_partition,
    utc_now,
    validate_run_id,
)
from maskmodel.results.writer import AttemptWriter

__all__ = [
    "FORMAT", "FORMAT_VERSION", "PARTITION", "DESCRIPTION", "PROB_PREFIX", "RETRIED_ERROR_PREFIX", "RESULTS_SCHEMA", "FACE_TYPE", "NO_DETECTOR", "prob_column", "results_schema", "classes_of", "validate_run_id", "utc_now", "run_partition", "run_dir", "log_uri", "file_schema", "conform", "merge_schemas", "AttemptWriter", "commit", "CommitRecord", "open_results", "check_output", "Snapshot", "open_snapshot", "list_commits", "results_dataset", "read_results", "FileEntry",
]
