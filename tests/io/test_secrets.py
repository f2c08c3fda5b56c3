"""The S3 secret key never leaves the environment: not in outputs, results, metadata, checkpoints or any log."""

from __future__ import annotations

import os
import uuid

import pytest

from maskmodel.io import storage
from tests.conftest import RayCluster, write_tiny_tree

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _files_holding(root: str, needle: bytes) -> list[str]:
    """Local files under ``root`` whose bytes contain ``needle`` (sockets and vanished files skipped)."""
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                if os.path.isfile(path) and needle in open(path, "rb").read():
                    hits.append(path)
            except OSError:
                continue
    return hits


@pytest.mark.timeout(400)
def test_secret_key_appears_nowhere(s3_bucket):
    secret = f"mmSECRET{uuid.uuid4().hex}"
    # Every node, and so every job driver and Ray worker, gets the key from its environment, as on EC2/K8s.
    cluster = RayCluster({**os.environ, "AWS_SECRET_ACCESS_KEY": secret})
    try:
        data, run, scores = (f"{s3_bucket}/{p}" for p in ("faces", "run", "scores"))
        write_tiny_tree(data, splits=(("train", 8), ("val", 4)))
        storage.write_bytes(f"{data}/train/mask/broken.jpg", b"not a jpeg")  # an error row and a warning too
        outputs = []
        for cmd in (["python", "-m", "jobs.train", "--data", data, "--output", run, "--arch", "resnet18",
                     "--weights", "none", "--epochs", "2", "--image-size", "32", "--batch-size", "8",
                     "--max-unreadable", "0.2"],
                    ["python", "-m", "jobs.score", "--input", data, "--model", f"{run}/model", "--output", scores,
                     "--run-id", "s1"],
                    # the run report: its page, PNGs and report.json (contact sheets cut from the S3 photos)
                    ["python", "-m", "jobs.report", "--results", scores, "--out", f"{s3_bucket}/report"]):
            res = cluster.run("job", "submit", "--address", cluster.address, "--working-dir", REPO, "--", *cmd,
                              timeout=900, check=False)
            assert res.returncode == 0 and "succeeded" in res.stdout.lower(), res.stdout[-3000:] + res.stderr[-3000:]
            outputs += [res.stdout, res.stderr]
        jobs = cluster.api("/api/jobs/")
        assert len(jobs) == 3
        outputs += [cluster.job_logs(j["submission_id"]) for j in jobs]

        needle = secret.encode()
        assert not [o for o in outputs if secret in o], "the secret is in a job's output or logs"
        # Everything the jobs wrote: results and run metadata, model.json, train_config.json, checkpoints
        # (state, Ray Train's checkpoint metadata and snapshots), metrics, reports, the run report.
        fs, root = storage.filesystem(s3_bucket)
        written = fs.find(root)  # hidden files (Ray Train's .metadata.json and the like) included
        names = {p.rsplit("/", 1)[-1] for p in written}
        assert {"model.json", "train_config.json", "metrics.csv", "state.pt", "report.html", "alerts.png"} <= names, \
            sorted(names)
        assert any("checkpoint_manager_snapshot" in n for n in names) and any(n.endswith(".parquet") for n in names)
        assert not [p for p in written if needle in fs.cat_file(p)]
        # Every log of every Ray process on every node (drivers, workers, agents, GCS, runtime envs).
        assert not _files_holding(cluster.dir, needle)
    finally:
        cluster.stop()
