"""Score an image collection with a trained model: one Parquet row per image, committed atomically.

Standalone (starts a local Ray instance, or joins RAY_ADDRESS if set)::

    python -m jobs.score --input s3://bucket/archive/2025-01-01/ --model s3://bucket/runs/r1/model \\
        --output s3://bucket/scores --run-id 2025-01-01 --incremental

On a cluster (set RAY_AUTH_MODE=token when the cluster has token auth)::

    ray job submit --working-dir . -- \\
        python -m jobs.score --input s3://bucket/manifests/2025-01-01.parquet \\
        --model s3://bucket/runs/r1/model --output s3://bucket/scores --num-gpus 1

With --check FILE (TOML or JSON thresholds, docs/watching-runs.md) the committed run is then checked
against the runs before it: one line per failed check and exit code 3 (the run stays committed).

--input is a prefix (listed recursively, filtered by --extensions) or a .csv / .parquet manifest with a
`path` column. Re-running a --run-id replaces that run; --incremental skips objects (same path and
version) already in a committed run. Query the results with `python -m jobs.query --results URI`.
"""

from __future__ import annotations

from maskmodel.runtime import timeline

timeline.mark("job module runs")  # preceded by this process's start (the interpreter up)

from maskmodel.runtime import cli  # noqa: E402 - after the first marks, so the timeline shows the imports
from maskmodel.config import parse_config  # noqa: E402
from maskmodel.score.plan import ScoreConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    timeline.mark("imports done")
    config = parse_config(ScoreConfig, argv, prog="python -m jobs.score", description=__doc__)
    from maskmodel.score.scoring import check_scored, score  # after parsing: --help imports neither torch nor Ray

    result = score(config)
    # Exit 0 once the run is committed, even with error rows: they are results, not failures.
    print(result.summary_line(), flush=True)
    code = 0
    if config.check:  # a finding, not an error: the run stays committed
        report = check_scored(config, result)
        print("\n".join(report.lines()), flush=True)
        code = cli.EXIT_CHECK_FAILED if report.failed else 0
    timeline.mark("exit")
    return code


if __name__ == "__main__":
    cli.run(main)
