"""The one Delta commit that makes a scoring run visible, and the record it leaves."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.results import delta
from maskmodel.results.delta import FileEntry
from maskmodel.results.schema import DESCRIPTION, FORMAT, FORMAT_VERSION, PARTITION, log_uri, merge_schemas, utc_now
from maskmodel.results.writer import AttemptWriter

log = logging.getLogger(__name__)

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
