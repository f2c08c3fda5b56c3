"""Two local Ray instances on one machine: each job joins the instance it started, by its address, and stays quiet.

With another local Ray running (here: this test process's own, ``ray_local``), Ray's state API in a
job's worker looked for "the" local instance and found several: Ray Train's placement group cleaner
printed a 30-line ``ConnectionError: Found multiple active Ray instances`` traceback into a job that
succeeded. Ray's own token-auth WARNING came on every run too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import write_tiny_tree

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_training_and_a_scoring_job_at_once_beside_another_local_ray(ray_local, tmp_path):
    from maskmodel.models.classifier import ModelCard, build_model, save_model_dir, state_dict_bytes

    assert ray_local.is_initialized()  # the other local instance, alive for the whole test
    data, model = str(tmp_path / "data"), str(tmp_path / "model")
    write_tiny_tree(data, splits=(("train", 8), ("val", 4)), size=32)
    save_model_dir(model, state_dict_bytes(build_model("resnet18", 2)),
                   ModelCard(arch="resnet18", classes=("mask", "no_mask"), input_size=32, resize_size=37))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = ROOT
    jobs = {
        "train": [sys.executable, "-m", "jobs.train", "--data", data, "--output", str(tmp_path / "run"), "--epochs",
                  "1", "--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8"],
        "score": [sys.executable, "-m", "jobs.score", "--input", os.path.join(data, "val"), "--model", model,
                  "--output", str(tmp_path / "scores"), "--faces", "none", "--run-id", "r1"],
    }
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in jobs.items()}
    try:
        outs = {name: p.communicate(timeout=800) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for name, p in procs.items():
        err = outs[name][1]
        assert p.returncode == 0, (name, err[-4000:])
        assert "Traceback" not in err and "Found multiple active Ray instances" not in err, (name, err[-4000:])
        assert "Token authentication" not in err, (name, err[-2000:])
    assert "best val accuracy" in outs["train"][1] and "at epoch 1 of 1" in outs["train"][1]
    assert "8 images: 8 ok, 0 errors" in outs["score"][0], outs["score"][0]
