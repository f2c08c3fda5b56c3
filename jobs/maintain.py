"""Maintain a results table: compact each run's small files, then vacuum the files no commit references.

Files of a scoring attempt that was killed before its commit, and the old files of a re-run run id, stay
on storage (invisible to every Delta reader) until a vacuum deletes them; it spares files younger than
--retention-hours, so keep that longer than the longest scoring run. Run it after the nightly scoring::

    python -m jobs.maintain --results s3://bucket/scores
    python -m jobs.maintain --results s3://bucket/scores --dry-run      # list what vacuum would delete

Erasure on request: forget the rows of the paths, prefixes or archive#members listed in a file (one a line),
in the table and in every older copy under it; time travel to the versions before it ends::

    python -m jobs.maintain --results s3://bucket/scores --forget request-2025-17.txt

On a cluster (set RAY_AUTH_MODE=token when the cluster has token auth)::

    ray job submit --working-dir . -- python -m jobs.maintain --results s3://bucket/scores
"""

from __future__ import annotations

from maskmodel.runtime import cli
from maskmodel.config import parse_config
from maskmodel.results.maintenance import MaintainConfig, maintain


def main(argv: list[str] | None = None) -> int:
    config = parse_config(MaintainConfig, argv, prog="python -m jobs.maintain", description=__doc__)
    print(maintain(config).summary_line(), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
