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
  reader sees and :func:`maskmodel.delta.vacuum` deletes.
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
  :func:`read_results`, :func:`maskmodel.incremental.committed_keys`) read one snapshot, the latest or
  ``version=N`` (time travel), and never see uncommitted files.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from maskmodel import delta, storage
from maskmodel.delta import FileEntry
from maskmodel.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "maskmodel.results"
FORMAT_VERSION = 2
PARTITION = "run_id"
DESCRIPTION = f"{FORMAT}/{FORMAT_VERSION}: one row per scored object, partitioned by run_id"
PROB_PREFIX = "p_"
# Read failures say nothing about an object's content, so incremental runs retry them.
RETRIED_ERROR_PREFIX = "unreadable"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: The fixed columns of every results file; :func:`results_schema` inserts one
#: ``p_<class>`` column per class after ``confidence``.
RESULTS_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),      # the object's URI as listed; <archive>#<member> in archives
    pa.field("archive", pa.string()),                    # the archive's URI for its members (and its own error row)
    pa.field("member", pa.string()),                     # the member's path inside the archive; null otherwise
    pa.field("version", pa.string()),                    # ETag, else "<size>-<mtime>"; null if unreadable
    pa.field("size", pa.int64()),                        # bytes; null if unknown
    pa.field("status", pa.string(), nullable=False),    # "ok" | "error"
    pa.field("error", pa.string()),                      # short reason; null when ok
    pa.field("label", pa.string()),                      # argmax class; null on error
    pa.field("confidence", pa.float32()),                # probability of label; null on error
    pa.field("width", pa.int32()),                       # decoded size after EXIF rotation
    pa.field("height", pa.int32()),
    pa.field("model_id", pa.string(), nullable=False),  # content hash of the model weights
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
], metadata={"maskmodel.format": f"{FORMAT}/{FORMAT_VERSION}"})


def prob_column(class_name: str) -> str:
    """The probability column of a class: ``p_`` + the name with anything but ``[A-Za-z0-9_]`` as ``_``."""
    return PROB_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", class_name)


def results_schema(classes: Sequence[str]) -> pa.Schema:
    """:data:`RESULTS_SCHEMA` plus one ``float32`` ``p_<class>`` column per class, in class order.

    Raises :class:`ValueError` when two class names map to the same column.
    """
    cols = [prob_column(c) for c in classes]
    if len(set(cols)) != len(cols):
        raise ValueError(f"class names {list(classes)} collide as columns {cols}")
    at = RESULTS_SCHEMA.get_field_index("confidence") + 1
    schema = RESULTS_SCHEMA
    for i, col in enumerate(cols):
        schema = schema.insert(at + i, pa.field(col, pa.float32()))
    return schema


def classes_of(schema: pa.Schema) -> list[str]:
    """The probability columns of a results schema (``p_...`` names), in order."""
    return [n for n in schema.names if n.startswith(PROB_PREFIX)]


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is safe as a folder and file name, else raise :class:`ValueError`."""
    if not _RUN_ID.match(run_id or ""):
        raise ValueError(f"run id {run_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return run_id


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def run_partition(run_id: str) -> str:
    """``run_id``'s partition folder, relative to the table (as Delta's add actions name it)."""
    return f"{PARTITION}={run_id}"


def run_dir(output_uri: str, run_id: str) -> str:
    """The folder of ``run_id``'s data files (committed or not)."""
    return storage.join(output_uri, run_partition(run_id))


def log_uri(output_uri: str, version: int) -> str:
    """The Delta log entry of commit ``version``."""
    return storage.join(output_uri, delta.LOG_DIR, f"{version:020d}.json")


def file_schema(schema: pa.Schema) -> pa.Schema:
    """The schema of a data file: ``schema`` without ``run_id``, which Delta keeps as the partition value.

    Keeping it out of the files is the Delta convention, and it spares plain
    Parquet readers a ``run_id`` that is both a folder and a column.
    """
    return schema.remove(schema.get_field_index(PARTITION))


# ----------------------------------------------------------------------------- writing

class AttemptWriter:
    """Writes one attempt's Parquet files as ``<output>/run_id=<id>/part-NNNNN-<attempt>.zstd.parquet``.

    :meth:`write` takes tables of ``schema`` (missing nullable columns are added
    as nulls, extra columns dropped; every row's ``run_id`` must be this run's)
    in any chunking; rows are buffered into row groups of ``row_group_rows`` and
    a new file starts every ``rows_per_file`` rows, so file sizes do not depend
    on upstream batch sizes. Memory is bounded by one row group. Nothing is
    visible to readers until :func:`commit` is called with this writer.
    """

    def __init__(self, output_uri: str, run_id: str, schema: pa.Schema, *, rows_per_file: int = 250_000,
                 row_group_rows: int = 65_536, attempt: str | None = None) -> None:
        validate_run_id(run_id)
        if rows_per_file < 1:
            raise ValueError("rows_per_file must be >= 1")
        self.output_uri, self.run_id, self.schema = output_uri, run_id, schema
        self.file_schema = file_schema(schema)
        self.attempt = attempt or f"{utc_now():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        self.rows_per_file = rows_per_file
        self.row_group_rows = max(1, min(row_group_rows, rows_per_file))
        self.files: list[FileEntry] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file = self._writer = None
        self._file_rel: str | None = None
        self._file_rows = 0
        self._stats = delta.FileStats()

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = conform(table, self.schema)
        if table.num_rows and not pc.all(pc.equal(table.column(PARTITION), self.run_id)).as_py():
            raise ValueError(f"rows of another run id than {self.run_id!r} given to its writer")
        table = table.drop_columns([PARTITION])
        while table.num_rows:
            room = self.rows_per_file - self._file_rows - self._pending_rows
            head, table = table.slice(0, room), table.slice(room)
            self._pending.append(head)
            self._pending_rows += head.num_rows
            if self._pending_rows >= self.row_group_rows or self._file_rows + self._pending_rows >= self.rows_per_file:
                self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        if self._writer is None:
            self._file_rel = f"{run_partition(self.run_id)}/part-{len(self.files):05d}-{self.attempt}.zstd.parquet"
            uri = storage.join(self.output_uri, self._file_rel)
            fs, path = storage.filesystem(uri)
            with storage.storage_errors(uri, "write"):
                self._file = fs.open(path, "wb")
                self._writer = pq.ParquetWriter(self._file, self.file_schema, compression="zstd")
        group = pa.concat_tables(self._pending)
        self._writer.write_table(group, row_group_size=self.row_group_rows)
        self._stats.update(group)
        self._file_rows += self._pending_rows
        self._pending, self._pending_rows = [], 0
        if self._file_rows >= self.rows_per_file:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is None:
            return
        uri = storage.join(self.output_uri, self._file_rel)
        with storage.storage_errors(uri, "write"):
            self._writer.close()
            self._file.close()  # on S3 this completes the upload: the object appears whole
        self.files.append(FileEntry(self._file_rel, self._file_rows, storage.info(uri).size,
                                    stats=self._stats.to_json(), modified_ms=int(utc_now().timestamp() * 1000)))
        self._file = self._writer = None
        self._file_rows = 0
        self._stats = delta.FileStats()

    def close(self) -> list[FileEntry]:
        """Flush and close; returns the files written, for :func:`commit`."""
        self._flush()
        self._close_file()
        return list(self.files)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` cast to ``schema``: columns in schema order, missing nullable ones as nulls."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        elif f.nullable:
            cols.append(pa.nulls(table.num_rows, f.type))
        else:
            raise ValueError(f"results table lacks required column {f.name!r}")
    return pa.Table.from_arrays(cols, schema=schema)


def merge_schemas(current: pa.Schema | None, schema: pa.Schema) -> pa.Schema:
    """The table schema after committing a run of ``schema``: ``current`` plus the run's new columns.

    New ``p_<class>`` columns go after the existing ones (other new columns
    last), nullable, since earlier runs have no value for them. No column is
    ever removed. Raises :class:`UserError` when a column changes type.
    """
    if current is None:
        return schema
    out = current
    for f in schema:
        if f.name in out.names:
            if out.field(f.name).type != f.type:
                raise UserError(f"Column {f.name!r} is {out.field(f.name).type} in the results table but {f.type} "
                                f"in this run; write this run to a new --output.")
            continue
        at = len(out.names)
        if f.name.startswith(PROB_PREFIX):
            probs = [i for i, n in enumerate(out.names) if n.startswith(PROB_PREFIX)]
            at = probs[-1] + 1 if probs else out.get_field_index("confidence") + 1
        out = out.insert(at, f.with_nullable(True))
    return out


def commit(writer: AttemptWriter, *, meta: dict[str, Any]) -> "CommitRecord":
    """Make ``writer``'s files the visible content of its run, in one Delta commit that replaces the run's old files.

    ``meta`` (JSON-safe: counts, model id, config, timestamps...) is stored in
    the commit. Until the commit, readers see the run's previous commit, if any.
    Raises :class:`UserError` when a file vanished before the commit (a vacuum
    with a retention shorter than the run) or commits keep conflicting.
    """
    files = writer.close()
    for f in files:
        if not storage.exists(storage.join(writer.output_uri, f.path)):
            raise UserError(f"{f.path!r} vanished before run {writer.run_id!r} was committed (a vacuum with a "
                            f"retention shorter than the run?); run it again and vacuum with a longer retention.")
    rows = sum(f.rows for f in files)
    record = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "run_id": writer.run_id,
              "attempt": writer.attempt, "files": len(files), "rows": rows, "columns": writer.schema.names}
    counts = meta.get("counts") or {}
    summary = (f"maskmodel run {writer.run_id}: {rows} rows ({counts.get('ok', '?')} ok, "
               f"{counts.get('errors', '?')} errors), model {meta.get('model_id', '?')}")
    version = delta.commit_partition(
        writer.output_uri, column=PARTITION, value=writer.run_id, files=files,
        merge_schema=lambda current: merge_schemas(current, writer.schema), metadata=record, summary=summary,
        description=DESCRIPTION)
    uri = log_uri(writer.output_uri, version)
    log.info("committed run %s (%d rows in %d files) as version %d of %s", writer.run_id, rows, len(files),
             version, writer.output_uri)
    return CommitRecord(writer.run_id, writer.attempt, version, tuple(files), tuple(writer.schema.names),
                        utc_now().isoformat(), uri, record)


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class CommitRecord:
    """One committed run: its latest scoring commit and its data files in the snapshot read.

    ``raw`` is the run metadata stored in the commit (``{}`` for rows another
    engine wrote without it, whose ``version`` is ``-1``).
    """

    run_id: str
    attempt: str
    version: int
    files: tuple[FileEntry, ...]
    columns: tuple[str, ...]
    committed_at: str | None
    uri: str
    raw: dict[str, Any]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def open_results(output_uri: str, version: int | None = None):
    """The results table (``None`` when nothing was committed yet); :class:`UserError` for the old format."""
    table = delta.open_table(output_uri, version)
    if table is None and storage.exists(storage.join(output_uri, "_commits")):
        raise UserError(f"{output_uri!r} holds results in the pre-Delta format (_commits/), which this version "
                        f"does not read; score into a new --output, or re-score these runs.")
    return table


_OPEN = object()  # check_output's default: open the table itself


def check_output(output_uri: str, *, table: Any = _OPEN) -> None:
    """Raise :class:`UserError` unless ``output_uri`` can hold a results table.

    It can when it does not exist, is empty, is a results table, or holds only
    ``run_id=`` folders of attempts that never committed. Anything else is
    refused: vacuuming the table would delete files it does not know.
    ``table``: what :func:`open_results` gave for ``output_uri`` (else it is opened here).
    """
    table = open_results(output_uri) if table is _OPEN else table
    if table is not None:
        names = delta.arrow_schema(table).names
        if table.metadata().partition_columns != [PARTITION] or not {"path", "status"} <= set(names):
            raise UserError(f"{output_uri!r} is a Delta table but not a maskmodel results table; choose another "
                            f"--output.")
        return
    other = [n for n in storage.listdir(output_uri) if not n.startswith((f"{PARTITION}=", "."))]
    if other:
        raise UserError(f"{output_uri!r} holds other files ({other[0]!r}) and is not a results table; choose an "
                        f"empty or new --output.")


@dataclass(frozen=True)
class Snapshot:
    """One read of the results table: the Delta table at one version and the runs committed in it.

    ``table`` is ``None`` (and ``records`` empty) when nothing was committed yet.
    """

    uri: str
    table: Any
    records: list[CommitRecord]


def open_snapshot(output_uri: str, *, version: int | None = None) -> Snapshot:
    """The table opened once and its history read once: at ``version`` (time travel), else the latest.

    Raises :class:`UserError` for the old format or a version the table does not have.
    """
    table = open_results(output_uri)
    if table is None:
        return Snapshot(output_uri, None, [])
    commits = delta.run_commits(output_uri, table=table)  # from the latest table (see run_commits)
    if version is not None:
        delta.at_version(table, output_uri, version)
    return Snapshot(output_uri, table, _records(output_uri, table, commits))


def list_commits(output_uri: str, *, version: int | None = None) -> list[CommitRecord]:
    """The committed runs at ``version`` (default: latest), oldest commit first; ``[]`` when there are none.

    One record per run id: its latest scoring commit (an older commit of a
    replaced run never shows), with the run's data files in that snapshot. A run
    whose rows were all deleted by another engine is left out; rows of a run id
    with no scoring commit (written by another engine) show with empty ``raw``.
    """
    return open_snapshot(output_uri, version=version).records


def _records(output_uri: str, table, commits: list[dict[str, Any]]) -> list[CommitRecord]:
    """:func:`list_commits` from an open ``table`` (at the snapshot read) and the commits of :func:`delta.run_commits`."""
    files = delta.active_files(table, PARTITION)
    latest: dict[str, dict[str, Any]] = {}
    for info in (c for c in commits if c["version"] <= table.version()):
        latest[str(info[delta.RUN_KEY].get("run_id"))] = info  # oldest first: a later commit replaces
    records = []
    for run_id, info in latest.items():
        meta, run_files = info[delta.RUN_KEY], tuple(files.pop(run_id, ()))
        if meta.get("rows") and not run_files:
            continue
        when = dt.datetime.fromtimestamp(info["timestamp"] / 1000, dt.timezone.utc).isoformat()
        records.append(CommitRecord(run_id, str(meta.get("attempt", "")), int(info["version"]), run_files,
                                    tuple(meta.get("columns") or ()), when, log_uri(output_uri, info["version"]),
                                    meta))
    for run_id, run_files in files.items():
        log.warning("run %s in %s has rows but no maskmodel commit (written by another engine?)", run_id, output_uri)
        records.append(CommitRecord(run_id, "", -1, tuple(run_files), (), None, "", {}))
    return sorted(records, key=lambda r: (r.committed_at or "", r.run_id))


def _select(records: list[CommitRecord], run_ids: Iterable[str]) -> None:
    unknown = set(run_ids) - {r.run_id for r in records}
    if unknown:
        raise UserError(f"No committed run {sorted(unknown)[0]!r} in the results; "
                        f"committed runs: {', '.join(r.run_id for r in records) or 'none'}.")


def results_dataset(output_uri: str, run_ids: Iterable[str] | None = None, *,
                    version: int | None = None, snapshot: Snapshot | None = None) -> pads.Dataset:
    """A lazy :class:`pyarrow.dataset.Dataset` over the committed rows (scans stream, filters push down).

    The snapshot is the latest, or ``version`` (time travel), or ``snapshot``
    when the caller has one open already (``version`` is then ignored). Runs
    scored with different class sets share the table's schema; a run's missing
    ``p_<class>`` columns read as nulls. Raises :class:`UserError` for a run id
    that is not committed.
    """
    wanted = None if run_ids is None else sorted(set(run_ids))
    if snapshot is None:
        # The commit history is read only when run ids must be checked against it.
        snapshot = (open_snapshot(output_uri, version=version) if wanted is not None else
                    Snapshot(output_uri, open_results(output_uri, version), []))
    table = snapshot.table
    if wanted is not None:
        _select(snapshot.records, wanted)
    if table is None:
        return pads.dataset([], schema=results_schema([]), format="parquet")
    with storage.storage_errors(output_uri, "read"):
        if wanted is None:
            return table.to_pyarrow_dataset()
        return table.to_pyarrow_dataset(file_pruning_predicate=[(PARTITION, "in", wanted)])


def read_results(output_uri: str, run_ids: Iterable[str] | None = None, *,
                 columns: Sequence[str] | None = None, version: int | None = None) -> pa.Table:
    """The committed rows as one in-memory table (for small results; scan :func:`results_dataset` otherwise)."""
    dataset = results_dataset(output_uri, run_ids, version=version)
    with storage.storage_errors(output_uri, "read"):
        return dataset.to_table(columns=list(columns) if columns else None)


__all__ = [
    "RESULTS_SCHEMA", "results_schema", "prob_column", "classes_of", "validate_run_id", "AttemptWriter",
    "FileEntry", "commit", "CommitRecord", "list_commits", "check_output", "results_dataset", "read_results",
    "merge_schemas", "open_results", "open_snapshot", "Snapshot", "log_uri", "run_partition", "run_dir", "file_schema", "conform",
]
