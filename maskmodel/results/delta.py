"""Delta Lake plumbing for the results table: open, commit, history, per-file statistics, vacuum.

Everything here goes through the ``deltalake`` package (delta-rs: no JVM, no
catalog) with the locations and storage options of
:func:`maskmodel.io.storage.delta_location`. :mod:`maskmodel.results` owns what
the table holds (schema, run metadata); this module owns how Delta holds it.

Promises kept here:

- A commit adds the given data files and, in the same transaction, removes the
  partition's current files (``overwrite`` with a partition filter): a run is
  replaced whole or not at all.
- Every commit of a partition carries a Delta app transaction (``txn``) named
  after that partition. delta-rs's conflict checker does not see that a
  concurrent commit added files to a partition being overwritten (two commits
  of one run id could both land); two ``txn`` actions with the same app id do
  conflict, so the later commit fails, re-reads the table and replaces the
  earlier one. Commits of different partitions may still fail (delta-rs takes
  any file removed since the snapshot for a conflict); they are retried on the
  new table state, so all of them land. Maintenance rewrites a partition the
  same way (:func:`rewrite_partition`); delta-rs's own ``optimize`` cannot
  carry an app transaction, so it is not used.
- The table keeps its whole log (``delta.enableExpiredLogCleanup = false``,
  a long ``delta.logRetentionDuration``): run metadata lives in the commits'
  ``commitInfo`` and must outlive checkpoints. Data files are still vacuumed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import posixpath
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from maskmodel.errors import UserError
from maskmodel.io import storage

log = logging.getLogger(__name__)

LOG_DIR = "_delta_log"
#: ``commitInfo`` key of a scoring commit's run metadata (a JSON object).
RUN_KEY = "maskmodel.run"
#: ``commitInfo`` key of an erasure commit's record (:mod:`maskmodel.results.erasure`; no path in it).
ERASURE_KEY = "maskmodel.erasure"
TABLE_CONFIGURATION = {
    # Run metadata lives in the commit log: keep every commit file (a few KB per run).
    "delta.enableExpiredLogCleanup": "false",
    "delta.logRetentionDuration": "interval 36500 days",
}
_MAX_STAT_CHARS = 1024  # longer strings get no min/max (a truncated max is not an upper bound)
#: How :class:`maskmodel.results.AttemptWriter` names its data files, relative to the table:
#: ``<partition>=<value>/part-NNNNN-<UTC time>-[compact-|forget-]<8 hex>.zstd.parquet``. Vacuum deletes a file
#: only when the log once referenced it or it has this name (an attempt killed before its commit).
WRITER_FILE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9._-]{1,128}/part-\d{5}-\d{8}T\d{6}Z-"
                         r"(?:compact-|forget-)?[0-9a-f]{8}\.zstd\.parquet$")


@dataclass(frozen=True)
class FileEntry:
    """One data file of the table: its path relative to the table root, rows and bytes.

    ``stats`` (Delta's per-file statistics JSON) and ``modified_ms`` are set for
    files about to be committed; files read back from a snapshot leave them empty.
    """

    path: str
    rows: int
    bytes: int
    stats: str = ""
    modified_ms: int = 0


# ----------------------------------------------------------------------------- statistics

class FileStats:
    """Delta per-file statistics (``numRecords``, ``nullCount``, ``minValues``, ``maxValues``) of the batches written.

    Readers use them to skip files (``WHERE scored_at > ...``) and to count rows
    without reading them. Only ints, floats, strings and timestamps get min/max.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.nulls: dict[str, int] = {}
        self.mins: dict[str, Any] = {}
        self.maxs: dict[str, Any] = {}

    def update(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        for name, col in zip(table.column_names, table.columns):
            self.nulls[name] = self.nulls.get(name, 0) + col.null_count
            t = col.type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t)
                    or pa.types.is_timestamp(t)) or col.null_count == len(col):
                continue
            mm = pc.min_max(col)
            for bound, store, pick in (("min", self.mins, min), ("max", self.maxs, max)):
                value = mm[bound].as_py()
                if value is None or (isinstance(value, float) and not math.isfinite(value)):
                    store[name] = _INVALID
                elif store.get(name) is not _INVALID:
                    store[name] = value if name not in store else pick(store[name], value)

    def to_json(self) -> str:
        out = {"numRecords": self.rows, "nullCount": self.nulls, "minValues": {}, "maxValues": {}}
        for store, key, up in ((self.mins, "minValues", False), (self.maxs, "maxValues", True)):
            for name, value in store.items():
                if value is _INVALID or (isinstance(value, str) and len(value) > _MAX_STAT_CHARS):
                    continue
                out[key][name] = _timestamp_stat(value, round_up=up) if isinstance(value, dt.datetime) else value
        return json.dumps(out, separators=(",", ":"))


_INVALID = object()


def _timestamp_stat(value: dt.datetime, *, round_up: bool) -> str:
    """Delta keeps timestamp statistics in milliseconds: floor the min, ceil the max, so both stay bounds."""
    value = value.astimezone(dt.timezone.utc)
    if round_up and value.microsecond % 1000:
        value += dt.timedelta(microseconds=1000 - value.microsecond % 1000)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


# ----------------------------------------------------------------------------- opening

def has_log(uri: str) -> bool:
    """Whether ``uri`` holds a Delta log; storage problems (no bucket, no credentials) raise :class:`UserError`."""
    return storage.exists(storage.join(uri, LOG_DIR))


def open_table(uri: str, version: int | None = None):
    """The :class:`deltalake.DeltaTable` at ``uri`` (at ``version``, else the latest), or ``None`` when there is none.

    Raises :class:`UserError` for a version the table does not have, or a storage failure.
    """
    from deltalake import DeltaTable

    if not has_log(uri):
        return None
    table_uri, options = storage.delta_location(uri)
    with storage.storage_errors(uri, "read the Delta table"):
        table = DeltaTable(table_uri, storage_options=options)
    return table if version is None else at_version(table, uri, version)


def at_version(table, uri: str, version: int, *, history: list[dict[str, Any]] | None = None):
    """``table`` (loaded at its latest version) moved back to ``version``; :class:`UserError` if it has none such,
    or ``version`` is before an erasure (whose files are gone).

    The same object, moved back: no second load of the log's head. ``history``: ``table.history()`` when the
    caller read it already (else it is read here, for the erasure check).
    """
    if version == table.version():
        return table
    if not 0 <= version <= table.version():
        raise UserError(f"{uri!r} has no version {version}; its versions are 0 to {table.version()}.")
    with storage.storage_errors(uri, "read the Delta log of"):
        erasures = erasure_versions(table.history() if history is None else history)
    later = [(v, when) for v, when in erasures if version < v]
    if later:
        v, when = later[-1]
        raise UserError(f"{uri!r} cannot be read at version {version}: an erasure (jobs.maintain --forget, {when}) "
                        f"ended time travel to the versions before {v}; read version {v} or later.")
    with storage.storage_errors(uri, "read the Delta table"):
        table.load_as_version(version)
    return table


def arrow_schema(table) -> pa.Schema:
    """The table's schema as a :class:`pyarrow.Schema`."""
    return pa.schema(table.schema().to_arrow())


def ensure_table(uri: str, schema: pa.Schema, *, partition_by: Sequence[str], description: str):
    """Open the table at ``uri``, creating it (empty, version 0) when there is none; safe against a concurrent creator."""
    from deltalake import DeltaTable

    table = open_table(uri)
    if table is not None:
        return table
    from deltalake.exceptions import CommitFailedError

    table_uri, options = storage.delta_location(uri)
    with storage.storage_errors(uri, "create the Delta table"):
        try:
            DeltaTable.create(table_uri, schema, mode="ignore", partition_by=list(partition_by),
                              description=description, configuration=TABLE_CONFIGURATION, storage_options=options)
            log.info("created the Delta table %s", uri)
        except CommitFailedError:  # a concurrent creator won version 0: commit on top of its table
            log.info("the Delta table %s was created concurrently", uri)
    return open_table(uri)


# ----------------------------------------------------------------------------- committing

def commit_partition(uri: str, *, column: str, value: str, files: Sequence[FileEntry],
                     merge_schema: Callable[[pa.Schema | None], pa.Schema], metadata: dict[str, Any],
                     summary: str, description: str, max_attempts: int = 20) -> int:
    """Replace partition ``column = value`` with ``files`` in one Delta commit carrying ``metadata``; return its version.

    ``merge_schema(current_table_schema_or_None)`` gives the table schema to
    commit with (columns may be added, never removed). ``metadata`` must hold a
    unique ``attempt``; it is stored under :data:`RUN_KEY` in the commit's
    ``commitInfo``, ``summary`` as its ``userMetadata`` (shown by Spark's
    ``DESCRIBE HISTORY``). A commit that loses a race is retried on the new
    table state; raises :class:`UserError` when it keeps losing.
    """
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, CommitProperties

    adds = [AddAction(f.path, f.bytes, {column: value}, f.modified_ms, True, f.stats) for f in files]
    app_id = _app_id(column, value)
    for attempt in range(1, max_attempts + 1):
        with storage.storage_errors(uri, "commit to"):
            table = ensure_table(uri, merge_schema(None), partition_by=[column], description=description)
            current = arrow_schema(table)
            schema = merge_schema(current)  # equal to ``current`` unless the run brings new columns
            before = table.version()
            props = CommitProperties(custom_metadata={RUN_KEY: metadata, "userMetadata": summary},
                                     app_transactions=[_next_txn(table, app_id)])
            try:
                table.create_write_transaction(adds, "overwrite", schema, partition_by=[column],
                                               partition_filters=[(column, "=", value)], commit_properties=props)
            except CommitFailedError as e:
                if attempt == max_attempts:
                    raise UserError(f"Could not commit {column}={value} to {uri!r}: {max_attempts} tries lost to "
                                    f"concurrent commits ({str(e).splitlines()[0]}); run it again.") from e
                log.info("commit of %s=%s lost a race (%s); retrying on the new table state", column, value,
                         str(e).splitlines()[0])
                time.sleep(random.uniform(0.05, 0.2) * attempt)
                continue
            return _version_of(uri, metadata["attempt"], before)
    raise AssertionError("unreachable")


def rewrite_partition(table, uri: str, *, column: str, value: str, files: Sequence[FileEntry],
                      operation: str) -> bool:
    """Replace partition ``column = value`` of ``table``'s snapshot with ``files`` holding the same rows.

    For maintenance (``operation`` names it in the commit): no run metadata, and
    the commit is made on the snapshot the rows were read from. Returns
    ``False``, committing nothing, when a commit of the same partition landed
    since that snapshot: its rows would otherwise show twice.
    """
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, CommitProperties

    adds = [AddAction(f.path, f.bytes, {column: value}, f.modified_ms, False, f.stats) for f in files]
    props = CommitProperties(custom_metadata={"maskmodel.results.maintenance": operation},
                             app_transactions=[_next_txn(table, _app_id(column, value))])
    with storage.storage_errors(uri, operation):
        try:
            table.create_write_transaction(adds, "overwrite", arrow_schema(table), partition_by=[column],
                                           partition_filters=[(column, "=", value)], commit_properties=props)
        except CommitFailedError as e:
            log.warning("%s of %s=%s in %s skipped: a concurrent commit of it won (%s)", operation, column, value,
                        uri, str(e).splitlines()[0])
            return False
    return True


def partition_transactions(table, column: str, values: Sequence[str]) -> list:
    """The app transactions a commit rewriting partitions ``column = value`` (each of ``values``) must carry."""
    return [_next_txn(table, _app_id(column, v)) for v in values]


def _app_id(column: str, value: str) -> str:
    """The Delta app id that every commit rewriting partition ``column = value`` carries (see the module docstring)."""
    return f"maskmodel:{column}={value}"


def _next_txn(table, app_id: str):
    from deltalake.transaction import Transaction

    return Transaction(app_id, (table.transaction_version(app_id) or 0) + 1)


def _version_of(uri: str, attempt: str, before: int) -> int:
    """The version of the commit whose run metadata has ``attempt`` (committed after version ``before``)."""
    table = open_table(uri)
    with storage.storage_errors(uri, "read the Delta log of"):
        for info in table.history(limit=max(1, table.version() - before)):
            if (info.get(RUN_KEY) or {}).get("attempt") == attempt:
                return int(info["version"])
    raise UserError(f"The commit of attempt {attempt} is missing from {uri!r}'s Delta log; re-run the job.")


def run_commits(uri: str, version: int | None = None, *, table=None,
                history: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The ``commitInfo`` of every commit with run metadata up to ``version`` (default: latest), oldest first.

    Each dict has the commit's ``version`` and ``timestamp`` (ms) and its run
    metadata under :data:`RUN_KEY`. Maintenance commits (compaction, vacuum) carry
    none and are left out. ``table``: the table already open at its latest
    version (else it is opened here); its history is read once (``history``: already read).
    """
    # History is always read from the latest table: delta-rs 1.6 numbers the
    # history of a table loaded at an older version wrongly.
    table = open_table(uri) if table is None else table
    if table is None:
        return []
    if history is None:
        with storage.storage_errors(uri, "read the Delta log of"):
            history = table.history()
    out = [h for h in history if isinstance(h.get(RUN_KEY), dict) and (version is None or h["version"] <= version)]
    return sorted(out, key=lambda h: h["version"])


def active_files(table, column: str) -> dict[str, list[FileEntry]]:
    """The table snapshot's data files by value of partition ``column``."""
    actions = pa.table(table.get_add_actions(flatten=True))
    out: dict[str, list[FileEntry]] = {}
    if not actions.num_rows:
        return out
    for path, size, rows, part in zip(*(actions.column(c).to_pylist() for c in
                                       ("path", "size_bytes", "num_records", f"partition.{column}"))):
        out.setdefault(part, []).append(FileEntry(path, int(rows or 0), int(size)))
    return out


# ----------------------------------------------------------------------------- maintenance

@dataclass(frozen=True)
class Vacuum:
    """Files a vacuum deleted (or would), and unreferenced ones it left alone (not this product's); sorted."""

    deleted: tuple[str, ...]
    left_alone: tuple[str, ...]


def vacuum(uri: str, *, retention_hours: int, dry_run: bool = False, table=None) -> list[str]:
    """:func:`vacuum_files`' deleted paths (relative to the table)."""
    return list(vacuum_files(uri, retention_hours=retention_hours, dry_run=dry_run, table=table).deleted)


def vacuum_files(uri: str, *, retention_hours: int, dry_run: bool = False, table=None) -> Vacuum:
    """Delete the files no current commit references that this product wrote (killed, replaced, compacted runs).

    A file goes only when it is older than ``retention_hours`` (that keeps time
    travel over the period working and spares a still-running attempt's files,
    so the retention must exceed the longest scoring run) and either a commit of
    the log once referenced it or it has the writer's own name
    (:data:`WRITER_FILE`: an attempt killed before its commit). Any other file,
    such as a user's own Parquet dropped into the folder, is never deleted and
    is counted in ``left_alone``. ``table``: the table already open (else it is
    opened here).
    """
    table = open_table(uri) if table is None else table
    if table is None:
        return Vacuum((), ())
    root = storage.delta_location(uri)[0].rstrip("/") + "/"
    with storage.storage_errors(uri, "vacuum"):
        # delta-rs also names removed files it deleted before: consider only the files still there.
        present = {posixpath.relpath(f.uri, uri) if "://" not in uri else f.uri[len(uri.rstrip("/")) + 1:]
                   for f in storage.list_files(uri)}

        def unreferenced(full: bool) -> set[str]:
            # full=True: every file in no current commit (killed attempts are in no log entry); False: the
            # files a commit removed (tombstones), which the log once referenced.
            found = table.vacuum(retention_hours=retention_hours, dry_run=True, enforce_retention_duration=False,
                                 full=full)
            return {p.removeprefix("file://").removeprefix(root) for p in found} & present

        candidates, tombstoned = unreferenced(True), unreferenced(False)
        deleted = sorted(p for p in candidates | tombstoned if p in tombstoned or WRITER_FILE.match(p))
        left = sorted(candidates - set(deleted))
        if not dry_run:
            for rel in deleted:
                storage.delete(storage.join(uri, rel), recursive=False)
    if left:
        log.warning("vacuum of %s left %d files alone that this product did not write (first: %s)", uri, len(left),
                    left[0])
    return Vacuum(tuple(deleted), tuple(left))


def erasure_versions(history: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """``(version, when)`` of each erasure commit in a table's ``history()`` (read at its latest version), oldest
    first."""
    return sorted((int(h["version"]), str(h[ERASURE_KEY].get("at", ""))) for h in history
                  if isinstance(h.get(ERASURE_KEY), dict))


def forgotten_keys(table) -> list[int]:
    """The 64-bit keys (:func:`maskmodel.io.objectkeys.object_keys`) of every ``(path, version)`` an erasure forgot."""
    out: list[int] = []
    for info in table.history():
        record = info.get(ERASURE_KEY)
        if isinstance(record, dict):
            out += [int(k, 16) for k in record.get("forgotten_keys") or ()]
    return out
