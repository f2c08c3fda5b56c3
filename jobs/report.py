"""Report a committed scoring run: its figures next to a baseline, plots over the last runs, drift checks.

Writes one self-contained HTML page (``report.html``, pictures inline; opens offline), the same
PNGs beside it and ``report.json``. Figures come from the runs' profiles in the Delta log (no
rows are read for them); the contact sheets cut the run's alert faces and least confident faces
from the source photos now::

    python -m jobs.report --results s3://bucket/scores --out ./report                 # the latest run
    python -m jobs.report --results s3://bucket/scores --out ./report --run-id 2025-01-02 \\
        --baseline 2024-12-30 2024-12-31 --check checks.toml

On a cluster, as its own step after scoring (set RAY_AUTH_MODE=token when the cluster has token auth)::

    ray job submit --working-dir . -- python -m jobs.report --results s3://bucket/scores \\
        --out s3://bucket/reports/latest --check checks.toml

With --check FILE (TOML or JSON thresholds, docs/watching-runs.md): one line per failed check and
exit code 3; the report is written either way.
"""

from __future__ import annotations

from maskmodel.runtime import cli
from maskmodel.config import parse_config
from maskmodel.study.run_report import ReportConfig, write_report


def main(argv: list[str] | None = None) -> int:
    config = parse_config(ReportConfig, argv, prog="python -m jobs.report", description=__doc__)
    result = write_report(config)
    print(f"report of run {result.run_id} (baseline: {', '.join(result.baseline) or 'none'}): {result.html}",
          flush=True)
    if result.check is None:
        return 0
    print("\n".join(result.check.lines()), flush=True)
    return cli.EXIT_CHECK_FAILED if result.check.failed else 0


if __name__ == "__main__":
    cli.run(main)
