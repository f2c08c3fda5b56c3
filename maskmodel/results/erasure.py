"""Erasure on request (GDPR Art. 17): forget objects' rows in the table and in every copy of them under its folder.

:func:`forget` takes entries (object paths, archive members ``archive#member``,
or prefixes: an entry also matches every path below it, ``<entry>/...``, and
every member of it, ``<entry>#...``) and, in order:

1. deletes the matching rows in one Delta commit: each affected run's files are
   rewritten without them (the writer's own naming, ``forget-`` attempts), the
   run's old files removed in the same commit;
2. deletes every data file under the table that holds a matching row and that
   this product wrote (older versions' files, replaced runs, killed attempts:
   the file is read to know); a file being written right now cannot be read
   and is left, counted (run ``--forget`` when no scoring run is writing);
3. scrubs the Delta log: a commit's file statistics (``minValues``/``maxValues``
   may be an erased path) are dropped from that action, any other string that
   holds an erased path becomes ``<erased>``; checkpoints (copies of the
   statistics) are deleted and one new checkpoint of the current version is
   written. Every commit file stays, so run metadata and history remain.

Versions before the erasure commit that held erased rows can no longer be read
(their files are gone): readers refuse time travel to any version before it
(:func:`maskmodel.results.delta.at_version`). The erasure commit's ``commitInfo`` holds the record
(:data:`ERASURE_KEY`): when, how many entries and rows, which versions were
purged, and the 64-bit keys of the erased ``(path, version)`` pairs, never a path
(:mod:`maskmodel.io.objectkeys`), so that ``--incremental`` runs do not score
the same photos again unless asked (:func:`maskmodel.results.delta.forgotten_keys`).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.io.objectkeys import object_keys
from maskmodel.io.paths import entry_folder, resolve_entry
from maskmodel.results import delta
from maskmodel.results.readers import check_output, open_results
from maskmodel.results.schema import PARTITION, utc_now
from maskmodel.results.writer import AttemptWriter

log = logging.getLogger(__name__)

ERASURE_KEY = delta.ERASURE_KEY
REDACTED = "<erased>"


@dataclass(frozen=True)
class Erasure:
    """What :func:`forget` did: counts only (see the module docstring)."""

    version: int | None            # the erasure commit (None: no row matched, nothing committed)
    entries: int
    rows: int
    runs: int
    files_deleted: int
    log_files_rewritten: int
    purged_versions: tuple[int, int] | None   # first and last version that can no longer be read
    files_left: int = 0            # files holding a match that could not be read (being written?)

    def summary_line(self, uri: str) -> str:
        if self.version is None:
            head = f"{uri}: no row matched the {self.entries} entries; "
        else:
            head = (f"{uri}: forgot {self.rows} rows of {self.runs} runs ({self.entries} entries) in version "
                    f"{self.version}; ")
        purged = (f"time travel to versions {self.purged_versions[0]}-{self.purged_versions[1]} has ended (files "
                  f"they read are deleted; every version before {self.version} is refused); "
                  if self.purged_versions and self.version is not None else "")
        left = (f"; {self.files_left} files holding a match could not be read and were left (re-run --forget "
                f"when no scoring run is writing)" if self.files_left else "")
        return (f"{head}{purged}deleted {self.files_deleted} data files, rewrote {self.log_files_rewritten} "
                f"log files{left}")


def read_entries(uri: str) -> list[str]:
    """The entries of a ``--forget`` file: one path, prefix or ``archive#member`` per line (blank lines and lines
    starting with ``#`` ignored), resolved by the manifests' rule (:mod:`maskmodel.io.paths`). UserError if empty."""
    folder = entry_folder(uri)
    lines = [line.strip() for line in storage.read_text(uri).splitlines()]
    entries = sorted({resolve_entry(folder, line).rstrip("/") for line in lines if line and not line.startswith("#")})
    if not entries:
        raise UserError(f"{uri!r} lists no paths to forget; give one path, prefix or archive#member per line.")
    return entries


def matches(paths: pa.Array | pa.ChunkedArray, entries: list[str]) -> pa.Array:
    """``bool`` per path: it is an entry, or lies below one (``entry/...``) or inside one (``entry#...``)."""
    mask = pc.is_in(paths, value_set=pa.array(entries, pa.string()))
    for e in entries:
        mask = pc.or_(mask, pc.or_(pc.starts_with(paths, e + "/"), pc.starts_with(paths, e + "#")))
    return pc.fill_null(mask, False)


def forget(uri: str, entries: list[str]) -> Erasure:
    """Forget the rows of ``entries`` at the results table ``uri`` (see the module docstring); returns counts.

    Raises :class:`UserError` when there is no results table there, or it cannot be written.
    """
    table = open_results(uri)
    check_output(uri, table=table)
    if table is None:
        raise UserError(f"No results table under {uri!r}; point --results at the --output of jobs.score.")
    with storage.storage_errors(uri, "read"):
        dataset = table.to_pyarrow_dataset()
        runs: dict[str, int] = {}
        erased_paths: set[str] = set()
        keys = []
        for batch in dataset.to_batches(columns=["path", "version", PARTITION]):
            hit = batch.filter(matches(batch.column("path"), entries))
            if not hit.num_rows:
                continue
            for run in hit.column(PARTITION).to_pylist():
                runs[run] = runs.get(run, 0) + 1
            erased_paths.update(hit.column("path").to_pylist())
            keys.append(object_keys(hit.column("path").to_pylist(), hit.column("version").to_pylist()))
    needles = sorted(set(entries) | erased_paths)
    added_at = _log_adds(uri)
    stale, left = _holding(uri, entries)  # older copies: files no current commit references
    files = delta.active_files(table, PARTITION)
    old = [f.path for run in runs for f in files.get(run, [])]
    versions = [added_at[f] for f in (*stale, *old) if f in added_at]
    version = None
    if runs or stale:
        record = {"at": utc_now().isoformat(), "entries": len(entries), "rows": sum(runs.values()), "runs": len(runs),
                  "purged_versions": [min(versions), table.version()] if versions else None,
                  "forgotten_keys": [f"{int(k):016x}" for k in np.unique(np.concatenate(keys))] if keys else []}
        version = _commit_without(table, uri, runs, entries, record)
    for rel in (*stale, *old):
        storage.delete(storage.join(uri, rel), recursive=False)
    purged = (min(versions), version - 1) if versions and version is not None else None
    rewritten = _scrub_log(uri, needles)
    result = Erasure(version, len(entries), sum(runs.values()), len(runs), len(stale) + len(old), rewritten, purged,
                     left)
    log.info("%s", result.summary_line(uri))
    return result


def _log_adds(uri: str) -> dict[str, int]:
    """The version of the (latest) commit that added each data file, from the log's JSON commits."""
    out: dict[str, int] = {}
    log_dir = storage.join(uri, delta.LOG_DIR)
    for name in storage.listdir(log_dir):
        if not (name.endswith(".json") and name[:-5].isdigit()):
            continue
        for line in storage.read_text(storage.join(log_dir, name)).splitlines():
            if line.strip() and "add" in (action := json.loads(line)):
                out[action["add"]["path"]] = int(name[:-5])
    return out


def _commit_without(table, uri: str, runs: dict[str, int], entries: list[str], record: dict[str, Any]) -> int:
    """Rewrite the runs in ``runs`` without the matching rows, in one commit carrying the erasure ``record``."""
    from deltalake.transaction import AddAction, CommitProperties

    adds = []
    attempt = f"{utc_now():%Y%m%dT%H%M%SZ}-forget-{uuid.uuid4().hex[:8]}"
    schema = delta.arrow_schema(table)
    for run in sorted(runs):
        writer = AttemptWriter(uri, run, schema, attempt=attempt)
        with storage.storage_errors(uri, "rewrite"):
            for batch in table.to_pyarrow_dataset(file_pruning_predicate=[(PARTITION, "=", run)]).to_batches():
                writer.write(batch.filter(pc.invert(matches(batch.column("path"), entries))))
        adds += [AddAction(f.path, f.bytes, {PARTITION: run}, f.modified_ms, True, f.stats) for f in writer.close()]
    props = CommitProperties(custom_metadata={ERASURE_KEY: record},
                             app_transactions=delta.partition_transactions(table, PARTITION, sorted(runs)))
    with storage.storage_errors(uri, "commit the erasure to"):
        if runs:
            table.create_write_transaction(adds, "overwrite", schema, partition_by=[PARTITION],
                                           partition_filters=[(PARTITION, "in", sorted(runs))], commit_properties=props)
        else:  # only older copies held a match: the record alone, so that time travel before it is refused
            table.create_write_transaction([], "append", schema, partition_by=[PARTITION], commit_properties=props)
    return delta.open_table(uri).version()


def _holding(uri: str, entries: list[str]) -> tuple[list[str], int]:
    """The unreferenced files this product wrote that hold a matching row, and how many could not be read."""
    candidates = delta.vacuum_files(uri, retention_hours=0, dry_run=True).deleted
    found, left = [], 0
    for rel in candidates:
        fs, path = storage.filesystem(storage.join(uri, rel))
        try:
            with fs.open(path, "rb") as f:
                paths = pq.read_table(f, columns=["path"]).column("path")
        except Exception:  # noqa: BLE001 - a file still being written (or not Parquet): counted, left
            left += 1
            continue
        if pc.any(matches(paths, entries)).as_py():
            found.append(rel)
    return found, left


def _scrub(value: Any, needles: list[str]) -> Any:
    if isinstance(value, str):
        return REDACTED if any(n in value for n in needles) else value
    if isinstance(value, dict):
        return {k: _scrub(v, needles) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, needles) for v in value]
    return value


def _scrub_log(uri: str, needles: list[str]) -> int:
    """Rewrite the log's JSON commits without ``needles``; replace the checkpoints. Returns log files rewritten."""
    log_dir = storage.join(uri, delta.LOG_DIR)
    raw = [n.encode() for n in needles]
    rewritten = 0
    names = storage.listdir(log_dir)
    for name in names:
        if not name.endswith(".json"):
            continue
        file_uri = storage.join(log_dir, name)
        data = storage.read_bytes(file_uri)
        if not any(n in data for n in raw):
            continue
        lines = []
        for line in data.decode("utf-8").splitlines():
            if not line.strip():
                continue
            action = json.loads(line)
            for kind in ("add", "remove"):
                body = action.get(kind)
                if isinstance(body, dict) and any(n in (body.get("stats") or "") for n in needles):
                    body.pop("stats", None)  # optional in the protocol: readers then do not skip by it
            lines.append(json.dumps(_scrub(action, needles), separators=(",", ":")))
        storage.write_bytes(file_uri, ("\n".join(lines) + "\n").encode("utf-8"))
        rewritten += 1
    checkpoints = [n for n in names if ".checkpoint." in n or n == "_last_checkpoint"]
    if checkpoints:
        for name in checkpoints:
            storage.delete(storage.join(log_dir, name), recursive=False)
        rewritten += len(checkpoints)
        with storage.storage_errors(uri, "write a checkpoint of"):
            delta.open_table(uri).create_checkpoint()
    return rewritten
