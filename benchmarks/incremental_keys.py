"""How long `--incremental` takes to collect the (path, version) keys of a large results table.

Writes one committed run of N synthetic rows (paths and versions shaped like an S3 archive's) into a
Delta results table, then times :func:`maskmodel.results.incremental.committed_keys` against a bare scan of the
same two columns (the floor: reading them, nothing else)::

    python benchmarks/incremental_keys.py                 # 2,000,000 rows in a temp folder
    python benchmarks/incremental_keys.py --rows 10000000 --output s3://bucket/bench-keys
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import pyarrow as pa

from maskmodel import results
from maskmodel.io import storage
from maskmodel.results import incremental


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--output", default="", help="results table URI (default: a new temp folder)")
    args = parser.parse_args()
    tmp = None if args.output else tempfile.mkdtemp(prefix="bench-keys-")
    out = args.output or storage.join(tmp, "scores")
    schema, now, step = results.results_schema(["mask", "no_mask"]), results.utc_now(), 100_000
    t0 = time.perf_counter()
    writer = results.AttemptWriter(out, "bench", schema)
    for start in range(0, args.rows, step):
        ids = range(start, min(start + step, args.rows))
        n = len(ids)
        writer.write(pa.table({
            "path": [f"s3://archive/cameras/2025/01/{i % 31 + 1:02d}/{i:010d}.jpg" for i in ids],
            "version": [f"{i * 2654435761 % 2**32:08x}{i:024x}" for i in ids],  # an ETag's 32 hex digits
            "status": ["ok"] * n, "model_id": ["m"] * n, "run_id": ["bench"] * n,
            "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC"))}))
    results.commit(writer, meta={})
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = sum(b.num_rows for b in results.results_dataset(out).to_batches(columns=["path", "version"]))
    scan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = incremental.committed_keys(out)
    keys_s = time.perf_counter() - t0
    print(f"{rows:,} rows in {out} (written and committed in {write_s:.1f} s)")
    print(f"scan of path+version: {scan_s:.2f} s; committed_keys: {keys_s:.2f} s "
          f"({keys_s / rows * 1e6:.2f} us/row, {len(keys):,} keys, {keys.nbytes / 2**20:.0f} MiB)")
    if tmp:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
