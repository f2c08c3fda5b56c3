"""Training cannot hang or resume the wrong run: CPU budgets, the stall watchdog, checkpoint compatibility."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.runtime.resources import check_actor_cpus, cpus_per_worker
from maskmodel.train.engine import Watchdog
from maskmodel.train.outputs import CHECKPOINTS, META_FILE, check_resumable, run_meta

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cpu_budget_defaults_leave_a_cpu_for_data(caplog):
    assert cpus_per_worker(0, 1, 4) == 1.0  # room for one CPU each and the data pipeline
    with caplog.at_level(logging.INFO, logger="maskmodel.runtime.resources"):
        assert cpus_per_worker(0, 2, 2) == 0.5  # 2 workers on 2 CPUs: half each, one CPU left for data
    assert "0.5 CPU each" in caplog.text and "leave 1 of 2 CPUs" in caplog.text
    assert cpus_per_worker(0.5, 2, 2) == 0.5
    # Tune trials: the trial's own driver reserves a little too.
    assert cpus_per_worker(0, 1, 2, extra_cpus=0.01) == 0.99


@pytest.mark.parametrize("args, match", [
    ((1.0, 2, 2), r"2 training worker\(s\) x 1 CPU leave 0 of the Ray cluster's 2 CPUs .* pass --cpus-per-worker 0.5"),
    ((0, 30, 2), r"30 training worker\(s\) cannot share the Ray cluster's 2 CPUs"),
    ((1.0, 8, 4), r"pass --cpus-per-worker 0.37 or use fewer --num-workers"),
    ((1.0, 40, 4), r"which needs 1; use fewer --num-workers, or add CPUs"),
])
def test_cpu_budgets_that_starve_the_data_pipeline_are_one_sentence(args, match):
    with pytest.raises(UserError, match=match) as e:
        cpus_per_worker(*args)
    assert "\n" not in str(e.value)


def test_ablation_trials_at_once_must_fit_as_a_whole():
    with pytest.raises(UserError, match=r"--max-concurrent-trials"):
        cpus_per_worker(0.5, 1, 2, groups=3, extra_cpus=0.01, count_flag="--max-concurrent-trials")
    assert cpus_per_worker(0.45, 1, 2, groups=2, extra_cpus=0.01) == 0.45


def test_scoring_actors_must_leave_a_cpu_for_load_tasks():
    check_actor_cpus(2, 2, load_tasks=False)  # the load step runs inside the actors
    with pytest.raises(UserError, match=r"2 predictor actor\(s\) need 2 CPU\(s\) and one for the load step"):
        check_actor_cpus(2, 2, load_tasks=True)


def test_watchdog_says_once_per_stall(caplog):
    now = [0.0]
    dog = Watchdog(300, rank=1, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="maskmodel.train.engine"):
        now[0] = 299
        assert not dog.check()
        now[0] = 301
        assert dog.check() and not dog.check()  # once, not every check
        dog.beat()
        now[0] = 700
        assert dog.check()
    assert len(caplog.records) == 2
    assert "worker rank 1 has had no batch for 5m01s" in caplog.records[0].getMessage()
    assert "--cpus-per-worker" in caplog.records[0].getMessage()


def test_resume_refuses_another_runs_checkpoints(tmp_path):
    out = str(tmp_path / "run")
    check_resumable(out, run_meta("resnet18", ["mask", "no_mask"], 32))  # nothing there yet: fine
    for epoch, meta in ((3, run_meta("resnet18", ["mask", "no_mask"], 32)),
                        (1, run_meta("resnet50", ["a", "b"], 64))):
        storage.write_json(storage.join(out, *CHECKPOINTS, f"epoch_{epoch:04d}", META_FILE), meta)
    check_resumable(out, run_meta("resnet18", ["mask", "no_mask"], 32))  # the newest one matches
    with pytest.raises(UserError, match=r"holds checkpoints of another run \(arch 'resnet18' \(this run: "
                                        r"'resnet34'\)\); resume it with the same settings, or write this run to a "
                                        r"new --output"):
        check_resumable(out, run_meta("resnet34", ["mask", "no_mask"], 32))


@pytest.mark.ray
def test_workers_that_take_every_cpu_stop_in_one_sentence(ray_local, tmp_path):
    from tests.conftest import write_tiny_tree

    data = str(tmp_path / "data")
    write_tiny_tree(data, splits=(("train", 4), ("val", 2)))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}  # a 2-CPU Ray
    res = subprocess.run([sys.executable, "-m", "jobs.train", "--data", data, "--output", str(tmp_path / "out"),
                          "--num-workers", "2", "--cpus-per-worker", "1", "--weights", "none", "--arch", "resnet18"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 training worker(s) x 1 CPU leave 0 of the Ray cluster's 2 CPUs")
    assert "Traceback" not in res.stderr


def test_a_training_batch_of_one_image_is_left_out_of_the_epoch():
    """An epoch whose last batch holds one image (images per worker = k * batch + 1): at 32 px a ResNet's last
    feature map is 1x1, and batch norm over one value per channel raised "Expected more than 1 value per channel"
    and failed the run (an annotated set's hash split made such a remainder). Left out, as drop_last would."""
    import torch

    from maskmodel.data.discovery import SKIPPED_LABEL
    from maskmodel.models.classifier import build_model
    from maskmodel.train.loop import classifier_step

    torch.manual_seed(0)
    model = build_model("resnet18", 3).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    one = {"image": torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([2])}
    sums = classifier_step(model, one, prepare=lambda x: x.float() / 255, optimizer=optimizer, num_classes=3)
    assert sums.tolist() == [0.0, 0.0, 0.0, 0.0]  # no image trained on, none counted
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # weights and statistics as they were
    unreadable = {"image": torch.zeros((1, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([SKIPPED_LABEL])}
    sums = classifier_step(model, unreadable, prepare=lambda x: x.float() / 255, optimizer=optimizer, num_classes=3)
    assert sums.tolist() == [0.0, 0.0, 1.0, 0.0]  # an unreadable image alone: still counted as skipped
    two = {"image": torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([2, 0])}
    sums = classifier_step(model, two, prepare=lambda x: x.float() / 255, optimizer=optimizer, num_classes=3)
    assert sums[1].item() == 2 and not torch.equal(model.fc.weight, state["fc.weight"])  # two images: a real step
