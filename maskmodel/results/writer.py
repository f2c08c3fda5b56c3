"""An attempt's data files: rolling Parquet files in the run's partition, visible to no reader until committed."""

from __future__ import annotations

import logging
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maskmodel.io import storage
from maskmodel.results import delta
from maskmodel.results.delta import FileEntry
from maskmodel.results.schema import PARTITION, conform, file_schema, run_partition, utc_now, validate_run_id

log = logging.getLogger(__name__)

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
