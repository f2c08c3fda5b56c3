"""SQL over committed scoring results with DuckDB (local, S3 or MinIO; offline, no extensions downloaded).

The results folder is a Delta table. Its committed rows are the view `predictions`; one row per committed
run (the metadata stored in the run's Delta commit) is the view `runs`::

    python -m jobs.query --results s3://bucket/scores --summary
    python -m jobs.query --results s3://bucket/scores \\
        "SELECT label, count(*) FROM predictions WHERE status = 'ok' GROUP BY label"
    python -m jobs.query --results s3://bucket/scores --as-of-version 12 --summary   # the table as it was

On a cluster (set RAY_AUTH_MODE=token when the cluster has token auth)::

    ray job submit --working-dir . -- python -m jobs.query --results s3://bucket/scores --summary
"""

from __future__ import annotations

from maskmodel.runtime import cli
from maskmodel.config import parse_config
from maskmodel.errors import UserError
from maskmodel.results.query import SUMMARY_SQL, QueryConfig, connect, format_table, run_sql


def main(argv: list[str] | None = None) -> int:
    config = parse_config(QueryConfig, argv, prog="python -m jobs.query", description=__doc__)
    if not config.sql and not config.summary:
        raise UserError("Nothing to do: pass a SQL query over `predictions`, or --summary.")
    # One connection: the table is opened once, and the summary and the query read the same snapshot.
    con = connect(config.results, run_ids=config.run_id or None, version=config.as_of_version)
    try:
        if config.summary:
            print(format_table(run_sql(con, SUMMARY_SQL), config.format), flush=True)
        if config.sql:
            print(format_table(run_sql(con, config.sql, max_rows=config.max_rows), config.format), flush=True)
    finally:
        con.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
