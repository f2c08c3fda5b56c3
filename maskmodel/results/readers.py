"""Reading committed runs: one snapshot of the table, its runs, and their rows."""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.dataset as pads

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.results import delta, protocol
from maskmodel.results.commit import CommitRecord
from maskmodel.results.schema import PARTITION, log_uri, results_schema

log = logging.getLogger(__name__)

def open_results(output_uri: str, version: int | None = None):
    """The results table (``None`` when nothing was committed yet).

    Raises :class:`UserError` for the old format, or a table with reader features the installed deltalake
    cannot read (:func:`maskmodel.results.delta.check_protocol`).
    """
    table = delta.open_table(output_uri, version)
    if table is None and storage.exists(storage.join(output_uri, "_commits")):
        raise UserError(f"{output_uri!r} holds results in the pre-Delta format (_commits/), which this version "
                        f"does not read; score into a new --output, or re-score these runs.")
    if table is not None:
        protocol.check_protocol(table, output_uri, write=False)  # e.g. deletionVectors set by another writer
    return table


_OPEN = object()  # check_output's default: open the table itself


def check_output(output_uri: str, *, table: Any = _OPEN) -> None:
    """Raise :class:`UserError` unless ``output_uri`` can hold a results table.

    It can when it does not exist, is empty, is a results table whose protocol
    the installed deltalake can read and write, or holds only ``run_id=``
    folders of attempts that never committed (files named as the writer names
    them, :data:`maskmodel.results.delta.WRITER_FILE`). Anything else (foreign
    Parquet in any partition layout, another table's log, a table with a
    feature such as ``deletionVectors`` the installed deltalake cannot honour)
    is refused before any work. ``table``: what :func:`open_results` gave for
    ``output_uri`` (else it is opened here).
    """
    table = open_results(output_uri) if table is _OPEN else table
    if table is not None:
        names = delta.arrow_schema(table).names
        if table.metadata().partition_columns != [PARTITION] or not {"path", "status"} <= set(names):
            raise UserError(f"{output_uri!r} is a Delta table but not a maskmodel results table; choose another "
                            f"--output.")
        protocol.check_protocol(table, output_uri, write=True)
        return
    other = [n for n in storage.listdir(output_uri) if not n.startswith((f"{PARTITION}=", "."))]
    if other:
        raise UserError(f"{output_uri!r} holds other files ({other[0]!r}) and is not a results table; choose an "
                        f"empty or new --output.")
    for name in storage.listdir(output_uri):
        if not name.startswith(f"{PARTITION}="):
            continue
        folder = storage.filesystem(storage.join(output_uri, name))[1]
        for obj in storage.list_files(storage.join(output_uri, name)):
            rel = f"{name}/{posixpath.relpath(storage.filesystem(obj.uri)[1], folder)}"
            if not delta.WRITER_FILE.match(rel):
                raise UserError(f"{output_uri!r} holds files this product did not write ({rel!r}) and is not a "
                                f"results table; choose an empty or new --output.")


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
    with storage.storage_errors(output_uri, "read the Delta log of"):
        history = table.history()  # once, from the latest table (see run_commits)
    commits = delta.run_commits(output_uri, table=table, history=history)
    if version is not None:
        delta.at_version(table, output_uri, version, history=history)
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
