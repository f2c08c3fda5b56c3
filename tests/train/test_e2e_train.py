"""End to end: ``ray start --head`` with token auth, ``ray job submit ... -- python -m jobs.train``."""

from __future__ import annotations

import csv
import io
import os

import pytest

from maskmodel.io import storage
from maskmodel.models.classifier import load_model_dir
from tests.conftest import write_tiny_tree

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_token_auth_is_on(ray_cluster):
    # A client without the token is refused: the cluster is not open to anyone on the network.
    env = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH")}
    import subprocess

    res = subprocess.run([ray_cluster._ray, "job", "list", "--address", ray_cluster.address], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert ray_cluster.run("job", "list", "--address", ray_cluster.address).returncode == 0


def test_submit_training_job(ray_cluster, s3_bucket):
    data, out = s3_bucket + "/faces", s3_bucket + "/run"
    write_tiny_tree(data, splits=(("train", 16), ("val", 6)))
    res = ray_cluster.run(
        "job", "submit", "--address", ray_cluster.address, "--working-dir", REPO, "--",
        "python", "-m", "jobs.train", "--data", data, "--output", out, "--arch", "resnet18", "--weights", "none",
        "--epochs", "2", "--image-size", "32", "--batch-size", "16", "--cpus-per-worker", "1",
        timeout=900,
    )
    assert "succeeded" in res.stdout.lower(), res.stdout[-3000:] + res.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(out, "metrics.csv")))))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    _, card = load_model_dir(storage.join(out, "model"))
    assert card.classes == ("mask", "no_mask")
    for name in ("curves.png", "augmented_samples.png", "confusion_matrix.png", "report.json"):
        assert storage.exists(storage.join(out, name))
