"""The results contract: one Parquet schema, an atomic commit protocol, and the reader.

Layout under an output URI::

    <output>/run_id=<id>/attempt-<attempt>/part-00000.parquet   data files of one attempt
    <output>/_commits/<id>.json                                  commit record of run <id>

A run becomes visible only when its commit record is written, last, in one
atomic PUT (a rename on local disk). The record lists the exact data files of
the run (paths relative to ``<output>``, so the folder can be copied), with
the run's counts, model id, resolved config and timestamps — like one Delta
log entry. Readers (:func:`list_commits`, :func:`committed_files`,
:func:`results_dataset`, :func:`read_results`) use committed runs only and
only the files their records list: a crashed or still-running attempt is
never half-visible and stray files are ignored. Committing a run id again
replaces the record, then deletes the run's other attempts.

Known limit: a reader that loaded a run's old record just before it was
replaced can find the old files gone; re-read the commit records and retry.
Two writers committing the same run id at once is not supported.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from maskmodel import storage
from maskmodel.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "maskmodel.results"
FORMAT_VERSION = 1
COMMITS_DIR = "_commits"
PROB_PREFIX = "p_"
# Read failures say nothing about an object's content, so incremental runs retry them.
RETRIED_ERROR_PREFIX = "unreadable"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: The fixed columns of every results file; :func:`results_schema` inserts one
#: ``p_<class>`` column per class after ``confidence``.
RESULTS_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),      # the object's URI as listed
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


def run_dir(output_uri: str, run_id: str) -> str:
    return storage.join(output_uri, f"run_id={run_id}")


def commit_uri(output_uri: str, run_id: str) -> str:
    """Where the commit record of ``run_id`` lives."""
    return storage.join(output_uri, COMMITS_DIR, f"{run_id}.json")


# ----------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class FileEntry:
    """One committed data file: its path relative to the output URI, rows and bytes."""

    path: str
    rows: int
    bytes: int


class AttemptWriter:
    """Writes one attempt's Parquet files under ``<output>/run_id=<id>/attempt-<attempt>/``.

    :meth:`write` takes tables of ``schema`` (missing nullable columns are added
    as nulls, extra columns dropped) in any chunking; rows are buffered into row
    groups of ``row_group_rows`` and a new ``part-NNNNN.parquet`` starts every
    ``rows_per_file`` rows, so file sizes do not depend on upstream batch sizes.
    Memory is bounded by one row group. Nothing is visible to readers until
    :func:`commit` is called with :meth:`close`'s result.
    """

    def __init__(self, output_uri: str, run_id: str, schema: pa.Schema, *, rows_per_file: int = 250_000,
                 row_group_rows: int = 65_536, attempt: str | None = None) -> None:
        validate_run_id(run_id)
        if rows_per_file < 1:
            raise ValueError("rows_per_file must be >= 1")
        self.output_uri, self.run_id, self.schema = output_uri, run_id, schema
        self.attempt = attempt or f"{utc_now():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        self.rows_per_file = rows_per_file
        self.row_group_rows = max(1, min(row_group_rows, rows_per_file))
        self.files: list[FileEntry] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file = self._writer = None
        self._file_rel: str | None = None
        self._file_rows = 0

    @property
    def attempt_rel(self) -> str:
        return f"run_id={self.run_id}/attempt-{self.attempt}"

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = conform(table, self.schema)
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
            self._file_rel = f"{self.attempt_rel}/part-{len(self.files):05d}.parquet"
            uri = storage.join(self.output_uri, self._file_rel)
            fs, path = storage.filesystem(uri)
            with storage.storage_errors(uri, "write"):
                self._file = fs.open(path, "wb")
                self._writer = pq.ParquetWriter(self._file, self.schema, compression="zstd")
        self._writer.write_table(pa.concat_tables(self._pending), row_group_size=self.row_group_rows)
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
        self.files.append(FileEntry(self._file_rel, self._file_rows, storage.info(uri).size))
        self._file = self._writer = None
        self._file_rows = 0

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


def commit(writer: AttemptWriter, *, meta: dict[str, Any]) -> "CommitRecord":
    """Make ``writer``'s attempt the visible content of its run, then delete the run's other attempts.

    ``meta`` (counts, model id, config, timestamps...) is stored in the record.
    The record is written last in a single atomic write; until it is, readers
    see the run's previous commit, if any.
    """
    files = writer.close()
    for f in files:  # a concurrent commit of the same run id deletes other attempts: never list lost files
        if not storage.exists(storage.join(writer.output_uri, f.path)):
            raise UserError(f"{f.path!r} vanished before run {writer.run_id!r} was committed; another job "
                            f"committed the same run id meanwhile. Run it again, once.")
    record = {
        **meta, "format": FORMAT, "format_version": FORMAT_VERSION, "run_id": writer.run_id,
        "attempt": writer.attempt, "committed_at": utc_now().isoformat(),
        "files": [dataclasses.asdict(f) for f in files], "rows": sum(f.rows for f in files),
        "columns": writer.schema.names,
    }
    uri = commit_uri(writer.output_uri, writer.run_id)
    storage.write_json(uri, record)
    log.info("committed run %s (%d rows in %d files) to %s", writer.run_id, record["rows"], len(files), uri)
    keep = f"attempt-{writer.attempt}"
    rdir = run_dir(writer.output_uri, writer.run_id)
    for name in storage.listdir(rdir):
        if name != keep:  # the replaced commit's files and any crashed attempts
            storage.delete(storage.join(rdir, name))
    return CommitRecord.from_json(record, uri)


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class CommitRecord:
    """One committed run as its record describes it; ``raw`` is the whole JSON object."""

    run_id: str
    attempt: str
    files: tuple[FileEntry, ...]
    columns: tuple[str, ...]
    committed_at: str
    uri: str
    raw: dict[str, Any]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @classmethod
    def from_json(cls, d: dict[str, Any], uri: str) -> "CommitRecord":
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}")
            return cls(run_id=str(d["run_id"]), attempt=str(d["attempt"]),
                       files=tuple(FileEntry(str(f["path"]), int(f["rows"]), int(f["bytes"])) for f in d["files"]),
                       columns=tuple(d["columns"]), committed_at=str(d["committed_at"]), uri=uri, raw=d)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{uri!r} is not a valid maskmodel commit record ({e}); "
                            f"remove it or re-run that run id.") from e


def list_commits(output_uri: str) -> list[CommitRecord]:
    """All committed runs under ``output_uri``, oldest commit first; ``[]`` when there are none."""
    cdir = storage.join(output_uri, COMMITS_DIR)
    if not storage.exists(cdir):
        return []
    records = []
    for obj in storage.list_files(cdir, extensions=("json",)):
        try:
            raw = storage.read_json(obj.uri)
        except ValueError as e:
            raise UserError(f"{obj.uri!r} is not valid JSON; remove it or re-run that run id.") from e
        records.append(CommitRecord.from_json(raw, obj.uri))
    return sorted(records, key=lambda r: (r.committed_at, r.run_id))


def _select(records: list[CommitRecord], run_ids: Iterable[str] | None) -> list[CommitRecord]:
    if run_ids is None:
        return records
    wanted = set(run_ids)
    unknown = wanted - {r.run_id for r in records}
    if unknown:
        raise UserError(f"No committed run {sorted(unknown)[0]!r} in the results; "
                        f"committed runs: {', '.join(r.run_id for r in records) or 'none'}.")
    return [r for r in records if r.run_id in wanted]


def committed_files(output_uri: str, run_ids: Iterable[str] | None = None) -> list[str]:
    """URIs of the data files of the committed runs (all, or those in ``run_ids``)."""
    return [storage.join(output_uri, f.path) for r in _select(list_commits(output_uri), run_ids)
            for f in r.files]


def unified_schema(records: Iterable[CommitRecord]) -> pa.Schema:
    """The results schema covering every run: the union of their ``p_<class>`` columns, in first-seen order."""
    probs: list[str] = []
    for r in records:
        probs += [c for c in r.columns if c.startswith(PROB_PREFIX) and c not in probs]
    schema = results_schema([])
    at = schema.get_field_index("confidence") + 1
    for i, col in enumerate(probs):
        schema = schema.insert(at + i, pa.field(col, pa.float32()))
    return schema


def results_dataset(output_uri: str, run_ids: Iterable[str] | None = None) -> pads.Dataset:
    """A lazy :class:`pyarrow.dataset.Dataset` over the committed rows (scans stream, filters push down).

    Runs scored with different class sets share one schema; a run's missing
    ``p_<class>`` columns read as nulls. Works on any storage URI through
    :mod:`maskmodel.storage` (no DuckDB or Arrow S3 extension needed).
    """
    records = _select(list_commits(output_uri), run_ids)
    schema = unified_schema(records)
    fs, _ = storage.pyarrow_filesystem(output_uri)
    paths = [storage.filesystem(storage.join(output_uri, f.path))[1] for r in records for f in r.files]
    return pads.dataset(paths, schema=schema, format="parquet", filesystem=fs)


def read_results(output_uri: str, run_ids: Iterable[str] | None = None, *,
                 columns: Sequence[str] | None = None) -> pa.Table:
    """The committed rows as one in-memory table (for small results; scan :func:`results_dataset` otherwise)."""
    with storage.storage_errors(output_uri, "read"):
        return results_dataset(output_uri, run_ids).to_table(columns=list(columns) if columns else None)


# ----------------------------------------------------------------------------- incremental runs

def object_keys(paths: Sequence[str | None], versions: Sequence[str | None]) -> np.ndarray:
    """64-bit keys of ``(path, version)`` pairs, as used by :func:`committed_keys`."""
    out = np.empty(len(paths), dtype=np.uint64)
    for i, (p, v) in enumerate(zip(paths, versions)):
        digest = hashlib.blake2b(f"{p}\0{v or ''}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


def committed_keys(output_uri: str, *, exclude_run_id: str | None = None) -> np.ndarray:
    """Sorted keys of the ``(path, version)`` pairs already scored by committed runs.

    Rows whose error starts with ``unreadable`` are left out so that read
    failures are retried; ``exclude_run_id`` leaves out the run a re-run is
    about to replace. 8 bytes per scored object, streamed from the files.
    """
    records = [r for r in list_commits(output_uri) if r.run_id != exclude_run_id]
    if not records:
        return np.empty(0, dtype=np.uint64)
    dataset = results_dataset(output_uri, [r.run_id for r in records])
    keep = pc.field("error").is_null() | ~pc.starts_with(pc.field("error"), RETRIED_ERROR_PREFIX)
    parts = [np.empty(0, dtype=np.uint64)]
    with storage.storage_errors(output_uri, "read"):
        for batch in dataset.to_batches(columns=["path", "version"], filter=keep):
            parts.append(object_keys(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
    return np.unique(np.concatenate(parts))


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``keys`` are in ``sorted_keys`` (from :func:`committed_keys`)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    idx = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[idx] == keys


__all__ = [
    "RESULTS_SCHEMA", "results_schema", "prob_column", "classes_of", "validate_run_id", "AttemptWriter",
    "FileEntry", "commit", "CommitRecord", "list_commits", "committed_files", "results_dataset",
    "read_results", "unified_schema", "committed_keys", "object_keys", "contains", "commit_uri", "run_dir",
    "conform",
]
