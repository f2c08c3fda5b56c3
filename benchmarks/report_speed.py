"""How long ``jobs.report`` takes over many runs: profiles are read from the Delta log, not the rows.

Commits ``--runs`` runs of ``--rows`` result rows each (synthetic rows with a profile folded from them,
the way scoring folds its batches) into a fresh local results table, then times ``jobs.report``'s library
function for the latest run with the default baseline and ``--history`` all runs, without contact sheets
(they read the photos of one run, at most ``--max-tiles`` each, whatever the number of runs), and a
``jobs.query`` of the ``runs`` view for comparison::

    PYTHONPATH=. python benchmarks/report_speed.py                   # 100 runs of 2,000 rows
    PYTHONPATH=. python benchmarks/report_speed.py --runs 300 --rows 10000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa

from maskmodel import results
from maskmodel.results import profile as prof
from maskmodel.results import query
from maskmodel.study.run_report import ReportConfig, write_report

CLASSES = ("mask", "no_mask")


def rows(run_id: str, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    err = rng.random(n) < 0.01
    label = np.where(rng.random(n) < 0.2 + 0.002 * seed, "no_mask", "mask")
    conf = rng.uniform(0.5, 1.0, n).astype(np.float32)
    return pa.table({
        "path": [f"s3://archive/{run_id}/{i:07d}.jpg" for i in range(n)],
        "status": np.where(err, "error", "ok"), "error": pa.array(np.where(err, "truncated image", None)),
        "label": pa.array(np.where(err, None, label)), "confidence": pa.array(conf, mask=err),
        "width": pa.array(np.full(n, 1920, np.int32), mask=err),
        "height": pa.array(np.full(n, 1080, np.int32), mask=err),
        "faces_found": pa.array(rng.integers(0, 4, n).astype(np.int32), mask=err),
        "size": np.full(n, 330_000), "model_id": ["m"] * n, "run_id": [run_id] * n,
        "scored_at": pa.array([results.utc_now()] * n, pa.timestamp("us", tz="UTC"))})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--rows", type=int, default=2000)
    args = p.parse_args()
    schema = results.results_schema(CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/scores"
        t0 = time.perf_counter()
        for k in range(args.runs):
            run_id = f"night-{k:04d}"
            table = rows(run_id, args.rows, k)
            fold = prof.RunProfile(alert_classes=("no_mask",))
            fold.update(table)
            writer = results.AttemptWriter(out, run_id, schema)
            writer.write(table)
            results.commit(writer, meta={"counts": {"images": args.rows}, "model_id": "m",
                                         "profile": fold.finish(elapsed_s=60.0, cost={"cluster_cpu_s": 120.0})})
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = write_report(ReportConfig(results=out, out=f"{tmp}/report", history=args.runs, sheet=False))
        took = time.perf_counter() - t0
        t0 = time.perf_counter()
        runs = query.query(out, "SELECT count(*) AS n, avg(verdict_rate) AS v FROM runs").to_pylist()[0]
        took_sql = time.perf_counter() - t0
    print(f"{args.runs} runs x {args.rows:,} rows committed in {made:.1f} s")
    print(f"jobs.report of {rep.run_id} against {len(rep.baseline)} baseline runs, {args.runs} runs plotted: "
          f"{took:.2f} s (target: seconds)")
    print(f"SELECT over the runs view ({runs['n']} runs, mean verdict rate {runs['v']:.3f}): {took_sql:.2f} s")


if __name__ == "__main__":
    main()
