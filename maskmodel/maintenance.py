"""Upkeep of a results table: compact small files, then vacuum the files no commit references.

A results table collects files no reader needs: an attempt killed before its
commit leaves orphans, re-running a run id (or compacting) leaves the old
files to readers of older versions. :func:`maintain` removes those older than
the retention and rewrites runs made of many small files into a few large
ones. Neither changes a row: compaction is one ``OPTIMIZE`` commit with the
same rows and no run metadata (the ``runs`` view is unchanged), vacuum changes
only which old versions can still be read (``--as-of-version``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field as dc_field
from typing import Any

from maskmodel import delta, results
from maskmodel.config import field
from maskmodel.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaintainConfig:
    """``jobs.maintain``: compact and vacuum the results table of ``jobs.score``."""

    results: str = field(help="URI of the results table (the --output of jobs.score)")
    retention_hours: int = field(168, help="vacuum only files unreferenced for longer than this: it must exceed "
                                           "the longest scoring run, and --as-of-version reads reach this far back")
    compact: bool = field(True, help="first rewrite each run's small files into fewer large ones")
    vacuum: bool = field(True, help="delete the files no current commit references (killed and replaced runs)")
    dry_run: bool = field(False, help="list what vacuum would delete; compact nothing")
    target_file_mb: int = field(0, help="compaction's target file size in MB (0: Delta's default, 100 MB)")

    def __post_init__(self) -> None:
        if self.retention_hours < 0 or self.target_file_mb < 0:
            raise ValueError("--retention-hours and --target-file-mb must be >= 0")


@dataclass(frozen=True)
class MaintainResult:
    results: str
    compacted: dict[str, Any] = dc_field(default_factory=dict)   # delta-rs's optimize metrics; {} if not run
    vacuumed: tuple[str, ...] = ()                                 # paths deleted (or, dry run, to delete)
    dry_run: bool = False

    def summary_line(self) -> str:
        merged = (f"compacted {self.compacted.get('numFilesRemoved', 0)} files into "
                  f"{self.compacted.get('numFilesAdded', 0)}; " if self.compacted else "")
        verb = "would vacuum" if self.dry_run else "vacuumed"
        return f"{self.results}: {merged}{verb} {len(self.vacuumed)} unreferenced files"


def maintain(config: MaintainConfig) -> MaintainResult:
    """Compact (unless ``dry_run``) and vacuum the table; raises :class:`UserError` when there is no results table."""
    results.check_output(config.results)  # the old format, or a folder that is not a results table
    if not delta.has_log(config.results):
        raise UserError(f"No results table under {config.results!r}; point --results at the --output of jobs.score.")
    compacted: dict[str, Any] = {}
    if config.compact and not config.dry_run:
        compacted = delta.compact(config.results, target_bytes=config.target_file_mb << 20 or None)
        log.info("compaction of %s: %d files removed, %d added", config.results,
                 compacted.get("numFilesRemoved", 0), compacted.get("numFilesAdded", 0))
    vacuumed: list[str] = []
    if config.vacuum:
        vacuumed = delta.vacuum(config.results, retention_hours=config.retention_hours, dry_run=config.dry_run)
        log.info("vacuum of %s (retention %d h): %d files%s", config.results, config.retention_hours, len(vacuumed),
                 " (dry run)" if config.dry_run else "")
    return MaintainResult(config.results, compacted, tuple(vacuumed), config.dry_run)
