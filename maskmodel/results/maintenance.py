"""Upkeep of a results table: compact small files, then vacuum the files no commit references.

A results table collects files no reader needs: an attempt killed before its
commit leaves orphans, re-running a run id (or compacting) leaves the old
files to readers of older versions. :func:`maintain` removes those older than
the retention and rewrites runs made of many small files into a few large
ones. Neither changes a row: compaction is one commit per run with the same
rows and no run metadata (the ``runs`` view is unchanged), vacuum changes only
which old versions can still be read (``--as-of-version``).

Compaction streams a run's rows through :class:`maskmodel.results.AttemptWriter`
(memory bounded by a row group) and commits on the snapshot it read, guarded
like a scoring commit: if the run is re-scored meanwhile, the compaction is
dropped rather than showing the old rows next to the new ones (it is tried
again by the next maintenance).
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass

from maskmodel import results
from maskmodel.config import field, resolve_paths
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.results import delta
from maskmodel.results.erasure import Erasure, forget, read_entries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaintainConfig:
    """``jobs.maintain``: compact and vacuum the results table of ``jobs.score``."""

    results: str = field(path=True, help="URI of the results table (the --output of jobs.score)")
    retention_hours: int = field(168, help="vacuum only files unreferenced for longer than this: it must exceed "
                                           "the longest scoring run, and --as-of-version reads reach this far back")
    compact: bool = field(True, help="first rewrite each run's small files into fewer large ones")
    vacuum: bool = field(True, help="delete the files no current commit references that this product wrote (killed "
                                    "and replaced runs); other files are left alone and counted")
    dry_run: bool = field(False, help="list what vacuum would delete; compact nothing")
    target_file_mb: int = field(128, help="compaction writes files of about this size; runs whose files are "
                                          "already this large on average are left alone")
    forget: str = field("", path=True, help="instead of compacting and vacuuming, erase the rows of the paths, "
                                            "prefixes or archive#members listed in this file (one a line) from "
                                            "the table and from every older copy; ends time travel before it")

    def __post_init__(self) -> None:
        resolve_paths(self)
        if self.retention_hours < 0 or self.target_file_mb < 1:
            raise ValueError("--retention-hours must be >= 0 and --target-file-mb >= 1")


@dataclass(frozen=True)
class Compaction:
    """What compaction did to one run: its file count before and after, or that it was skipped."""

    run_id: str
    files_before: int
    files_after: int
    committed: bool


@dataclass(frozen=True)
class MaintainResult:
    results: str
    compacted: tuple[Compaction, ...] = ()
    vacuumed: tuple[str, ...] = ()         # paths (relative to the table) deleted, or with dry_run to delete
    dry_run: bool = False
    left_alone: tuple[str, ...] = ()       # unreferenced files this product did not write: never deleted
    erasure: Erasure | None = None         # what --forget did (then nothing else was done)

    def summary_line(self) -> str:
        if self.erasure is not None:
            return self.erasure.summary_line(self.results)
        done = [c for c in self.compacted if c.committed]
        merged = (f"compacted {len(done)} runs ({sum(c.files_before for c in done)} files into "
                  f"{sum(c.files_after for c in done)}); " if done else "")
        skipped = len(self.compacted) - len(done)
        skipped_text = f"{skipped} runs left for next time (a concurrent commit won); " if skipped else ""
        verb = "would vacuum" if self.dry_run else "vacuumed"
        left = (f"; left {len(self.left_alone)} files alone that it did not write (first: {self.left_alone[0]})"
                if self.left_alone else "")
        return f"{self.results}: {merged}{skipped_text}{verb} {len(self.vacuumed)} unreferenced files{left}"


def compact_run(table, uri: str, run_id: str, *, target_bytes: int) -> Compaction | None:
    """Rewrite ``run_id``'s files in ``table``'s snapshot into files of about ``target_bytes``; ``None`` if not worth it.

    The run is rewritten when it has several files smaller than the target on
    average and fewer files would result. The commit is made on ``table``'s
    snapshot: when the run was re-committed since (or delta-rs sees another
    conflict), nothing is committed (``committed=False``) and the new files are
    orphans for vacuum.
    """
    files = delta.active_files(table, results.PARTITION).get(run_id, [])
    rows, size = sum(f.rows for f in files), sum(f.bytes for f in files)
    if len(files) < 2 or size / len(files) >= target_bytes or not rows:
        return None
    per_file = max(1, math.ceil(rows * target_bytes / size))
    if math.ceil(rows / per_file) >= len(files):
        return None
    schema = delta.arrow_schema(table)
    writer = results.AttemptWriter(uri, run_id, schema, rows_per_file=per_file,
                                   attempt=f"{results.utc_now():%Y%m%dT%H%M%SZ}-compact-{uuid.uuid4().hex[:8]}")
    with storage.storage_errors(uri, "compact"):
        dataset = table.to_pyarrow_dataset(file_pruning_predicate=[(results.PARTITION, "=", run_id)])
        for batch in dataset.to_batches():  # streamed, in file order
            writer.write(batch)
    new = writer.close()
    committed = delta.rewrite_partition(table, uri, column=results.PARTITION, value=run_id, files=new,
                                        operation="compact")
    return Compaction(run_id, len(files), len(new), committed)


def maintain(config: MaintainConfig) -> MaintainResult:
    """Compact (unless ``dry_run``) and vacuum the table, or with ``forget`` only erase; raises :class:`UserError`
    when there is no results table."""
    if config.forget:
        return MaintainResult(config.results, erasure=forget(config.results, read_entries(config.forget)))
    table = results.open_results(config.results)  # opened once for the whole command; the old format fails here
    results.check_output(config.results, table=table)  # a folder that is not a results table
    if table is None:
        raise UserError(f"No results table under {config.results!r}; point --results at the --output of jobs.score.")
    compacted: list[Compaction] = []
    if config.compact and not config.dry_run:
        for run_id in sorted(delta.active_files(table, results.PARTITION)):
            # The snapshot brought up to date before each run: delta-rs takes a commit that removed files
            # anywhere in the table since the snapshot (such as the previous run's compaction) for a conflict.
            with storage.storage_errors(config.results, "read the Delta table"):
                table.update_incremental()
            done = compact_run(table, config.results, run_id, target_bytes=config.target_file_mb << 20)
            if done is not None:
                compacted.append(done)
                log.info("compacted run %s: %d files into %d%s", run_id, done.files_before, done.files_after,
                         "" if done.committed else " (not committed: a concurrent commit won; next time)")
    swept = delta.Vacuum((), ())
    if config.vacuum:
        with storage.storage_errors(config.results, "read the Delta table"):
            table.update_incremental()  # the compactions' commits: their replaced files are unreferenced now
        swept = delta.vacuum_files(config.results, retention_hours=config.retention_hours, dry_run=config.dry_run,
                                   table=table)
        log.info("vacuum of %s (retention %d h): %d files%s", config.results, config.retention_hours,
                 len(swept.deleted), " (dry run)" if config.dry_run else "")
    return MaintainResult(config.results, tuple(compacted), swept.deleted, config.dry_run, swept.left_alone)
