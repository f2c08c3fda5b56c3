"""How long each job's ``--help`` takes, as a new user runs it: ``python -m jobs.<job> --help`` in a fresh process.

Prints the median of ``--repeat`` runs per job, and the modules of torch and Ray the parser imported (none
expected: configs live in modules that import neither). Exits 1 when a job's median is over ``--limit`` s::

    PYTHONPATH=. python benchmarks/help_time.py                 # every job, 3 runs each, limit 1 s
    PYTHONPATH=. python benchmarks/help_time.py --jobs score --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = ("ablation", "demo", "evaluate", "maintain", "make_dataset", "query", "score", "train", "train_detector")
PROBE = ("import runpy, sys\nsys.argv = [{job!r}, '--help']\ntry:\n    runpy.run_module('jobs.' + {job!r}, "
         "run_name='__main__')\nexcept SystemExit:\n    pass\nsys.stderr.write(' '.join(m for m in ('torch', 'ray') "
         "if m in sys.modules))\n")


def seconds(job: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": ROOT})
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", default=JOBS, choices=JOBS)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--limit", type=float, default=1.0, help="seconds a job's median may take")
    args = p.parse_args()
    slow = []
    print(f"{'job':<16}{'median s':>10}{'max s':>8}  heavy imports", flush=True)
    for job in args.jobs:
        times = [seconds(job) for _ in range(args.repeat)]
        heavy = subprocess.run([sys.executable, "-c", PROBE.format(job=job)], cwd=ROOT, capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": ROOT}).stderr.strip()
        print(f"{job:<16}{statistics.median(times):>10.2f}{max(times):>8.2f}  {heavy or 'none'}", flush=True)
        if statistics.median(times) > args.limit or heavy:
            slow.append(job)
    print(f"over {args.limit:g} s or importing torch/Ray: {', '.join(slow)}" if slow else
          f"every job under {args.limit:g} s, none importing torch or Ray")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
