"""SQL over committed results with DuckDB, on any storage, offline.

:func:`connect` exposes two views of one snapshot of the results Delta table
(the latest, or ``version=N`` for an audit) to DuckDB:

- ``predictions``: the committed rows (:data:`maskmodel.results.RESULTS_SCHEMA`
  plus ``p_<class>`` columns), scanned lazily through the pyarrow dataset that
  ``deltalake`` builds over the snapshot's files. S3 and MinIO therefore work
  without DuckDB's httpfs or delta extensions, and nothing is downloaded or
  installed at run time.
- ``runs``: one row per committed run, from the metadata stored in its Delta
  commit (counts, model, input, precision, actors, timings, config) and its
  profile (:mod:`maskmodel.results.profile`: alert, error and no-face rates, mean
  confidence, throughput, cost inputs; the whole profile as JSON in ``profile``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Iterable

import duckdb
import pyarrow as pa

from maskmodel import results
from maskmodel.config import field, resolve_paths
from maskmodel.errors import UserError
from maskmodel.results.profile import figures

log = logging.getLogger(__name__)

SUMMARY_SQL = """
WITH agg AS (
    SELECT run_id, count(*) AS images,
           count(*) FILTER (WHERE status = 'ok') AS ok,
           count(*) FILTER (WHERE status = 'error') AS errors,
           avg(confidence) AS mean_confidence
    FROM predictions GROUP BY run_id),
per_label AS (
    SELECT run_id, label, count(*) AS n FROM predictions WHERE status = 'ok' GROUP BY run_id, label),
labels AS (
    SELECT run_id, string_agg(label || ': ' || n, ', ' ORDER BY label) AS labels FROM per_label GROUP BY run_id)
SELECT r.run_id, coalesce(a.images, 0) AS images, coalesce(a.ok, 0) AS ok, coalesce(a.errors, 0) AS errors,
       r.skipped, coalesce(l.labels, '') AS labels, r.alerts, round(a.mean_confidence, 4) AS mean_confidence,
       r.model_id, r.precision, r.actors, round(r.elapsed_s, 1) AS elapsed_s, r.committed_at, r.version
FROM runs r LEFT JOIN agg a USING (run_id) LEFT JOIN labels l USING (run_id)
ORDER BY r.committed_at, r.run_id
"""

#: The docs' example queries (docs/results-table.md), kept here so the tests prove they run.
EXAMPLES = {
    "no-mask rate per day": """
        SELECT CAST(timezone('UTC', scored_at) AS DATE) AS day, count(*) AS images,
               round(avg(CASE WHEN label = 'no_mask' THEN 1 ELSE 0 END), 3) AS no_mask_rate
        FROM predictions WHERE status = 'ok' GROUP BY day ORDER BY day""",
    "low-confidence images": """
        SELECT path, label, round(confidence, 3) AS confidence, run_id
        FROM predictions WHERE status = 'ok' AND confidence < 0.6 ORDER BY confidence LIMIT 20""",
    "no-mask images per archive": """
        SELECT archive, count(*) AS images, count(*) FILTER (WHERE label = 'no_mask') AS no_mask
        FROM predictions WHERE status = 'ok' AND archive IS NOT NULL GROUP BY archive ORDER BY archive""",
    "errors by reason": """
        SELECT split_part(error, ':', 1) AS reason, count(*) AS images, min(path) AS example
        FROM predictions WHERE status = 'error' GROUP BY reason ORDER BY images DESC""",
}


@dataclass(frozen=True)
class QueryConfig:
    """``jobs.query``: SQL or a summary over the committed results of ``jobs.score``."""

    results: str = field(path=True, help="URI of the results folder (the --output of jobs.score)")
    sql: str = field("", positional=True, help="SQL over the views `predictions` and `runs`")
    summary: bool = field(False, help="print per run: images, ok, errors, skipped, per-label counts, alerts (photos "
                                      "whose verdict is an alert class, from the run's profile), mean "
                                      "confidence, model, precision, actors, elapsed seconds, commit time and version")
    run_id: tuple[str, ...] = field((), help="only these committed runs (default: all)")
    as_of_version: int | None = field(None, help="read the table as of this Delta version, for audits "
                                                 "(default: the latest)")
    format: str = field("table", choices=("table", "csv", "json"), help="output format")
    max_rows: int = field(1000, help="print at most this many rows")

    def __post_init__(self) -> None:
        resolve_paths(self)


RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("model_id", pa.string()), ("model", pa.string()), ("input", pa.string()),
    ("images", pa.int64()), ("ok", pa.int64()), ("errors", pa.int64()), ("skipped", pa.int64()),
    ("files", pa.int64()), ("rows", pa.int64()), ("precision", pa.string()), ("actors", pa.int64()),
    ("elapsed_s", pa.float64()), ("started_at", pa.timestamp("us", tz="UTC")),
    ("finished_at", pa.timestamp("us", tz="UTC")), ("committed_at", pa.timestamp("us", tz="UTC")),
    ("version", pa.int64()), ("attempt", pa.string()), ("config", pa.string()), ("metadata", pa.string()),
    # From the run's profile (maskmodel.results.profile; null for runs committed before profiles existed).
    ("alerts", pa.int64()), ("no_face", pa.int64()), ("faces", pa.int64()), ("verdict_rate", pa.float64()),
    ("error_rate", pa.float64()), ("no_face_rate", pa.float64()), ("mean_confidence", pa.float64()),
    ("images_per_s", pa.float64()), ("gpus", pa.float64()), ("actor_cpu_s", pa.float64()),
    ("actor_gpu_s", pa.float64()), ("cluster_cpu_s", pa.float64()), ("cluster_gpu_s", pa.float64()),
    ("driver_cpu_s", pa.float64()), ("profile", pa.string()),
])


def runs_table(records: Iterable[results.CommitRecord]) -> pa.Table:
    """One row per committed run (:data:`RUNS_SCHEMA`), from the metadata of its Delta commit.

    ``files`` and ``rows`` are the run's data in the snapshot read (compaction
    changes ``files``); ``config`` is the run's resolved config and ``metadata``
    everything its commit holds (timings such as ``first_batch_s`` included), as JSON.
    """
    rows = []
    for r in records:
        m, counts = r.raw, r.raw.get("counts") or {}
        rows.append({"run_id": r.run_id, "model_id": m.get("model_id"), "model": m.get("model"),
                     "input": m.get("input"), "images": counts.get("images", r.rows), "ok": counts.get("ok"),
                     "errors": counts.get("errors"), "skipped": counts.get("skipped"), "files": len(r.files),
                     "rows": r.rows, "precision": m.get("precision"), "actors": m.get("actors"),
                     "elapsed_s": m.get("elapsed_s"), "started_at": _ts(m.get("started_at")),
                     "finished_at": _ts(m.get("finished_at")), "committed_at": _ts(r.committed_at),
                     "version": r.version, "attempt": r.attempt,
                     "config": json.dumps(m["config"], sort_keys=True) if "config" in m else None,
                     "metadata": json.dumps(m, sort_keys=True, default=str), **_profile_columns(m.get("profile"))})
    return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)


def _profile_columns(p: dict | None) -> dict:
    """The ``runs`` view's profile columns of one run (all null without a profile)."""
    if not p:
        return {}
    cost = p.get("cost") or {}
    return {"alerts": p.get("alerts"), "no_face": p.get("no_face"), "faces": p.get("faces"),
            **{k: v for k, v in figures(p).items() if k in ("verdict_rate", "error_rate", "no_face_rate",
                                                             "mean_confidence", "images_per_s")},
            **{k: cost.get(k) for k in ("gpus", "actor_cpu_s", "actor_gpu_s", "cluster_cpu_s", "cluster_gpu_s",
                                        "driver_cpu_s")},
            "profile": json.dumps(p, sort_keys=True)}


def _ts(value: str | None) -> dt.datetime | None:
    return None if not value else dt.datetime.fromisoformat(value)


def connect(results_uri: str, *, run_ids: Iterable[str] | None = None,
            version: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views ``predictions`` and ``runs`` over committed results.

    Both views read one snapshot, the table opened once: the latest, or Delta
    ``version`` (time travel). Raises :class:`UserError` when ``results_uri``
    holds no committed run.
    """
    snapshot = results.open_snapshot(results_uri, version=version)
    if not snapshot.records:
        raise UserError(f"No committed runs under {results_uri!r}; point --results at the --output of jobs.score.")
    run_ids = list(run_ids) if run_ids else None
    dataset = results.results_dataset(results_uri, run_ids, snapshot=snapshot)
    # No extension may be fetched from the network: everything needed is built in.
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.register("predictions", dataset)
    selected = [r for r in snapshot.records if run_ids is None or r.run_id in run_ids]
    con.register("runs", runs_table(selected))
    return con


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int | None = None) -> pa.Table:
    """``sql`` on a :func:`connect` connection; at most ``max_rows`` rows. A bad statement: :class:`UserError`."""
    try:
        rel = con.sql(sql)
        if rel is None:  # a statement without a result (COPY ... TO, CREATE ...)
            return pa.table({})
        if max_rows is not None:
            rel = rel.limit(max_rows)
        return rel.to_arrow_table()
    except duckdb.Error as e:
        raise UserError(f"The query failed: {str(e).splitlines()[0]}") from e


def query(results_uri: str, sql: str, *, run_ids: Iterable[str] | None = None,
          max_rows: int | None = None, version: int | None = None) -> pa.Table:
    """Run ``sql`` over the committed results (at Delta ``version``, else the latest); returns at most ``max_rows`` rows.

    A bad statement raises :class:`UserError` with DuckDB's one-line message.
    """
    con = connect(results_uri, run_ids=run_ids, version=version)
    try:
        return run_sql(con, sql, max_rows=max_rows)
    finally:
        con.close()


def summary(results_uri: str, *, run_ids: Iterable[str] | None = None, version: int | None = None) -> pa.Table:
    """Per committed run: images, ok, errors, skipped, per-label counts, alerts, mean confidence, model id, precision,
    actors, elapsed seconds, commit time and Delta version."""
    return query(results_uri, SUMMARY_SQL, run_ids=run_ids, version=version)


def format_table(table: pa.Table, fmt: str = "table") -> str:
    """Render a result for a terminal (``table``), or as ``csv`` / ``json`` lines."""
    if fmt == "csv":
        import pyarrow.csv as pacsv

        sink = pa.BufferOutputStream()
        pacsv.write_csv(table, sink)
        return sink.getvalue().to_pybytes().decode().rstrip("\n")
    if fmt == "json":
        import json

        return "\n".join(json.dumps(row, default=str) for row in table.to_pylist())
    if not table.num_columns:
        return "ok"
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 80):
        return table.to_pandas().to_string(index=False)
