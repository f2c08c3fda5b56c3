"""The results contract: the one row schema of every results file, run ids and partition paths."""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Sequence

import pyarrow as pa

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.results import delta

log = logging.getLogger(__name__)

FORMAT = "maskmodel.results"
FORMAT_VERSION = 2
PARTITION = "run_id"
DESCRIPTION = f"{FORMAT}/{FORMAT_VERSION}: one row per scored object, partitioned by run_id"
PROB_PREFIX = "p_"
# Read failures say nothing about an object's content, so incremental runs retry them.
RETRIED_ERROR_PREFIX = "unreadable"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: One face of a photo in the ``faces`` column: its box in pixels of the original image after EXIF rotation
#: (``x1``/``y1`` exclusive edges), the detector's score, and the face's classification. ``probs`` is in the
#: run's class order (the ``classes`` of its commit metadata), so runs of models with other classes share
#: the column without a nested schema change.
FACE_TYPE = pa.struct([
    pa.field("x0", pa.float32()), pa.field("y0", pa.float32()),
    pa.field("x1", pa.float32()), pa.field("y1", pa.float32()),
    pa.field("score", pa.float32()),
    pa.field("label", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("probs", pa.list_(pa.float32())),
])
#: What the ``detector`` column says when no detector decided the row (``--faces none``, or ``auto`` found none).
NO_DETECTOR = "none"

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
    pa.field("label", pa.string()),                      # argmax class (the deciding face's); null on error
    pa.field("alert", pa.bool_()),                       # the photo's verdict: label is an alert class; null on error
    pa.field("confidence", pa.float32()),                # probability of label; null on error
    pa.field("width", pa.int32()),                       # decoded size after EXIF rotation
    pa.field("height", pa.int32()),
    pa.field("faces", pa.list_(FACE_TYPE)),              # faces found, highest detector score first; null on error
    pa.field("faces_found", pa.int32()),                 # len(faces); null on error
    pa.field("faces_dropped", pa.int32()),               # faces found beyond --max-faces; null on error
    pa.field("detector", pa.string()),                   # "none" | "centerface" | a detector model id
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
