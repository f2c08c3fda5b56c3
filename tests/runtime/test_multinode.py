"""Multi-node: a head and worker nodes started with ``ray start`` on this machine, data and outputs on S3.

One cluster serves the whole module (starting nodes and Ray Train workers is the expensive part):

    head      1 CPU   job drivers, Ray Train's controller (0 CPU), Ray Data tasks
    worker1   2 CPUs  }
    worker2   2 CPUs  } a Ray Train worker needs --cpus-per-worker 2, a whole worker node
    worker3   2 CPUs  }

A training worker cannot fit on the head, and one worker fills a worker node, so
the two workers always run on two different worker nodes; the third is the spare
that lets the run go on when a node is lost. Ray Data's decode and augment tasks
take the CPUs the training workers leave: the head's, and the spare node's.

The node-failure tests SIGKILL a worker node's whole process group (raylet,
agents, workers), a machine that vanished, and check the jobs' contracts: the
training run finishes from its last checkpoint; a scoring run commits exactly one
row per image, and nothing of it is visible before its commit.

The same cluster checks token auth and that the S3 secret key, given to every node as
on EC2/K8s, appears in nothing the jobs wrote or logged (lost nodes' logs included).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest

from maskmodel import results
from maskmodel.runtime import testhooks
from maskmodel.io import storage
from maskmodel.models.classifier import load_model_dir
from tests.conftest import RayCluster, write_tiny_tree

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPUS_PER_WORKER = 2
# The GCS declares a node dead after 5 missed health checks; 1 s apart instead of 3 s,
# so a killed node is noticed in ~5 s. A live node only fails a check that times out (10 s).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000"}
TRAIN = ["python", "-m", "jobs.train", "--arch", "resnet18", "--weights", "none", "--image-size", "32",
         "--batch-size", "16", "--num-workers", "2", "--cpus-per-worker", str(CPUS_PER_WORKER),
         "--torch-threads", "1"]


def _new_bucket(endpoint: str) -> str:
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, use_listings_cache=False).mkdir(name)
    return f"s3://{name}"


def _submit(cluster: RayCluster, name: str, *cmd: str, env: dict[str, str] | None = None) -> str:
    """``ray job submit --no-wait`` a command with this repo as working dir; returns the submission id."""
    sid = f"{name}-{uuid.uuid4().hex[:8]}"
    args = ["job", "submit", "--address", cluster.address, "--working-dir", REPO, "--submission-id", sid,
            "--no-wait"]
    if env:
        args += ["--runtime-env-json", json.dumps({"env_vars": env})]
    res = cluster.run(*args, "--", *cmd, timeout=300, check=False)  # retries "No available agent"
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return sid


def _succeeded(cluster: RayCluster, sid: str, timeout: float = 600) -> None:
    status = cluster.wait_job(sid, timeout=timeout)
    assert status == "SUCCEEDED", f"job {sid} {status}:\n{cluster.job_logs(sid)[-6000:]}"


def _metrics(output: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(storage.read_text(storage.join(output, "metrics.csv")))))


def _wait_for(what: str, check, *, cluster: RayCluster, sid: str, timeout: float = 300, every: float = 0.3):
    """Poll ``check()`` until it returns something truthy; fail early if the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        status = cluster.job(sid)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            pytest.fail(f"job {sid} ended ({status}) before {what}:\n{cluster.job_logs(sid)[-4000:]}")
        time.sleep(every)
    pytest.fail(f"no {what} after {timeout}s")


@pytest.fixture(scope="module")
def mn(s3_endpoint):
    """The module's cluster (head 1 CPU, worker1-3 2 CPUs each) and a bucket with a tiny data set.

    Every node, and so every job driver and Ray worker, gets the S3 secret key ``secret`` from its
    environment, as on EC2/K8s (moto takes any key); :func:`test_secret_key_appears_nowhere` looks for it.
    """
    secret = f"mmSECRET{uuid.uuid4().hex}"
    cluster = RayCluster({**os.environ, "AWS_SECRET_ACCESS_KEY": secret}, head_cpus=1, extra_env=FAST_NODE_DEATH)
    try:
        cluster.add_workers(3, num_cpus=CPUS_PER_WORKER)
        bucket = _new_bucket(s3_endpoint)
        data = storage.join(bucket, "faces")
        counts = write_tiny_tree(data, splits=(("train", 16), ("val", 6)), size=32)
        yield SimpleNamespace(cluster=cluster, bucket=bucket, data=data, images=sum(counts.values()), secret=secret)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def trained(mn):
    """The module's one training job (starting Ray Train workers is slow, so one run serves two tests).

    2 workers land on two of the three worker nodes; once Ray Train has registered the
    first checkpoint, the node of one of them is killed, and the run must finish from
    that checkpoint on the two worker nodes left. Returns the output, the ids, and the
    nodes of the first worker group.
    """
    cluster = mn.cluster
    output, pause = storage.join(mn.bucket, "run"), storage.join(mn.bucket, "pause-train")
    # Rank 0 waits after reporting epoch 0 until the test has killed a node: the run cannot finish first.
    sid = _submit(cluster, "train", *TRAIN, "--data", mn.data, "--output", output, "--epochs", "2",
                  "--max-failures", "1", env=testhooks.env("train-epoch-0", pause))
    job_id = _wait_for("job id", lambda: cluster.job(sid).get("job_id"), cluster=cluster, sid=sid)
    _wait_for("the pause after epoch 0", lambda: storage.exists(storage.join(pause, "train-epoch-0.paused")),
              cluster=cluster, sid=sid)
    first = cluster.actors("RayTrainWorker", job_id=job_id, state="ALIVE")
    assert len(first) == 2, first
    victim = cluster.node_name(first[0]["node_id"])
    # Ray Train writes this snapshot when it registers a checkpoint; the paused run cannot end meanwhile.
    snapshot = storage.join(output, "checkpoints", "train", "checkpoint_manager_snapshot.json")
    _wait_for("first checkpoint", lambda: storage.exists(snapshot) and "epoch_0000" in storage.read_text(snapshot),
              cluster=cluster, sid=sid, every=0.2)
    cluster.kill_node(cluster.names[victim])
    testhooks.release("train-epoch-0", pause)
    _succeeded(cluster, sid)
    return SimpleNamespace(output=output, model=storage.join(output, "model"), sid=sid, job_id=job_id,
                           first_nodes=[w["node_id"] for w in first], first_actors={w["actor_id"] for w in first},
                           victim=victim)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_score_query_across_nodes(mn, trained):
    cluster = mn.cluster

    # Training: the two Ray Train workers ran on two different worker nodes, never on the head.
    assert len(set(trained.first_nodes)) == 2 and cluster.node_id("head") not in trained.first_nodes
    rows = _metrics(trained.output)
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # counted from 1
    assert all(int(r["train_images"]) > 0 and int(r["val_images"]) == 12 for r in rows)
    _, card = load_model_dir(trained.model)
    assert card.classes == ("mask", "no_mask") and card.config["num_workers"] == 2
    for name in ("curves.png", "confusion_matrix.png", "report.json"):
        assert storage.exists(storage.join(trained.output, name))

    # Scoring on the cluster: one committed row per image, every one scored.
    scores = storage.join(mn.bucket, "scores")
    sid = _submit(cluster, "score", "python", "-m", "jobs.score", "--input", mn.data, "--model", trained.model,
                  "--output", scores, "--run-id", "e2e", "--actors", "2", "--threads", "1")
    _succeeded(cluster, sid)
    table = results.read_results(scores)
    listed = sorted(o.uri for o in storage.list_files(mn.data))
    assert len(listed) == mn.images
    assert sorted(table.column("path").to_pylist()) == listed
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("run_id").to_pylist()) == {"e2e"}
    assert set(table.column("model_id").to_pylist()) == {card.model_id}

    # The SQL summary, also as a job on the cluster.
    sid = _submit(cluster, "query", "python", "-m", "jobs.query", "--results", scores, "--summary",
                  "--format", "json")
    _succeeded(cluster, sid)
    summary = [json.loads(line) for line in cluster.job_logs(sid).splitlines() if line.startswith("{")]
    assert [(s["run_id"], s["images"], s["ok"], s["errors"]) for s in summary] == [("e2e", mn.images, mn.images, 0)]
    assert summary[0]["model_id"] == card.model_id


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_resumes_after_losing_a_worker_node(mn, trained):
    cluster = mn.cluster
    # Each epoch once; epoch 1 from the first attempt, the epoch after the lost node from the second (one is
    # all the mechanics need: a checkpoint before the loss, an epoch after it).
    rows = _metrics(trained.output)
    assert [int(r["epoch"]) for r in rows] == [1, 2], rows  # counted from 1
    attempts = [int(r["attempt"]) for r in rows]
    assert attempts[0] == 0 and attempts[-1] == 1 and attempts == sorted(attempts), attempts
    logs = cluster.job_logs(trained.sid)
    # The job's log says it resumed, in one line; Ray Train's own retry report stays in its log files.
    assert "resumed from the checkpoint of epoch" in logs and "TrainingReport(" not in logs
    # The second worker group ran on the two worker nodes left, not on the lost one.
    workers = cluster.actors("RayTrainWorker", job_id=trained.job_id)
    assert len(workers) == 4, workers
    lost = cluster.node_id(trained.victim)
    second = {w["node_id"] for w in workers if w["actor_id"] not in trained.first_actors}
    assert len(second) == 2 and lost not in second and cluster.node_id("head") not in second


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scoring_commits_one_row_per_image_after_losing_a_node(mn, trained):
    cluster = mn.cluster
    scores, pause = storage.join(mn.bucket, "scores-node-lost"), storage.join(mn.bucket, "pause-score")
    run_dir = results.run_dir(scores, "nightly")
    score = ["python", "-m", "jobs.score", "--input", mn.data, "--model", trained.model, "--output", scores,
             "--run-id", "nightly", "--actors", "2", "--threads", "1", "--read-batch", "4", "--batch-size", "4",
             "--rows-per-file", "4"]
    # Each predictor actor waits at its second batch until the test has killed a node, so the job can
    # neither finish nor tear its actors down first: the victim is a node whose actor holds work.
    sid = _submit(cluster, "score-node-lost", *score, env=testhooks.env("score-predict-2", pause))
    job_id = _wait_for("job id", lambda: cluster.job(sid).get("job_id"), cluster=cluster, sid=sid)
    _wait_for("a paused predictor", lambda: storage.exists(storage.join(pause, "score-predict-2.paused")),
              cluster=cluster, sid=sid)

    # Mid-run: the attempt's first file is written (from the actors' first batches), yet readers see nothing.
    _wait_for("first results file", lambda: storage.exists(run_dir) and storage.list_files(run_dir),
              cluster=cluster, sid=sid)
    assert results.list_commits(scores) == []
    assert results.read_results(scores).num_rows == 0

    def predictor_nodes():  # the head has 1 CPU, room for one of the 2 predictor actors at most
        alive = cluster.actors(job_id=job_id, state="ALIVE")
        return sorted({cluster.node_name(a["node_id"]) for a in alive if "MapWorker" in a["class_name"]} - {"head"})

    victim = _wait_for("a predictor actor on a worker node", predictor_nodes, cluster=cluster, sid=sid)[0]
    cluster.kill_node(cluster.names[victim])
    testhooks.release("score-predict-2", pause)

    status = cluster.wait_job(sid, timeout=300)
    if status != "SUCCEEDED":
        # The run failed: it must have left nothing visible; re-running the same run id completes it.
        assert results.list_commits(scores) == [], cluster.job_logs(sid)[-4000:]
        assert results.read_results(scores).num_rows == 0
        _succeeded(cluster, _submit(cluster, "score-rerun", *score))
    table = results.read_results(scores)
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == mn.images, (status, len(paths), len(set(paths)))
    assert sorted(paths) == sorted(o.uri for o in storage.list_files(mn.data))
    assert set(table.column("status").to_pylist()) == {"ok"}
    [record] = results.list_commits(scores)
    assert record.run_id == "nightly" and sum(f.rows for f in record.files) == mn.images


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_scoring_waits_for_an_autoscaler_with_explicit_actors(mn):
    # A cluster with 0 GPUs now (GPU nodes scaled to zero): with --actors the job goes on and its
    # pending GPU actors ask the autoscaler for nodes; without it, the job stops with one sentence.
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from maskmodel.errors import UserError\n"
        "from maskmodel.score.pipeline import ensure_ray as _ensure_ray\nfrom maskmodel.score.plan import ScoreConfig\n"
        "cfg = dict(input='s3://b/in', model='s3://b/m', output='s3://b/out', num_gpus=1)\n"
        "print('explicit', _ensure_ray(ScoreConfig(**cfg, actors=3)))\n"
        "try:\n"
        "    _ensure_ray(ScoreConfig(**cfg))\n"
        "except UserError as e:\n"
        "    print('implicit', e)\n"
    )
    env = {**mn.cluster.env, "RAY_ADDRESS": f"127.0.0.1:{mn.cluster.gcs_port}"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "explicit (3, 'cuda')" in res.stdout
    assert "waiting for the autoscaler" in res.stderr + res.stdout
    assert "implicit --num-gpus 1 but the Ray cluster has 0 GPUs" in res.stdout and "--actors N" in res.stdout


def test_gpu_scoring_on_a_local_ray_without_gpus_fails_clearly(ray_local):
    from maskmodel.errors import UserError
    from maskmodel.score.pipeline import ensure_ray as _ensure_ray
    from maskmodel.score.scoring import ScoreConfig

    if ray_local.cluster_resources().get("GPU"):
        pytest.skip("this machine has GPUs")
    # A Ray instance this process started can never gain a GPU, so --actors does not make it wait.
    with pytest.raises(UserError, match="this machine has 0 GPUs; use --num-gpus 0"):
        _ensure_ray(ScoreConfig(input="x", model="y", output="z", num_gpus=1, actors=2))


@pytest.mark.slow
def test_token_auth_is_on(mn):
    # A client without the token is refused: the cluster is not open to anyone on the network.
    cluster = mn.cluster
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    res = subprocess.run([cluster._ray, "job", "list", "--address", cluster.address], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode != 0
    assert cluster.run("job", "list", "--address", cluster.address).returncode == 0


def _files_holding(root: str, needle: bytes) -> list[str]:
    """Local files under ``root`` whose bytes contain ``needle`` (sockets and vanished files skipped)."""
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        if needle in f.read():
                            hits.append(path)
            except OSError:
                continue
    return hits


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secret_key_appears_nowhere(mn, trained):
    """The S3 secret key never leaves the environment: not in outputs, results, metadata, checkpoints or any log.

    Last in the module: it reads what every job before it on this cluster wrote and logged (the training
    run that lost a node, the scoring runs, the query), and adds a scoring run with an unreadable image
    (an error row and a warning) and the run report (its page, PNGs and contact sheets cut from S3 photos).
    """
    cluster, secret = mn.cluster, mn.secret
    data, scores = storage.join(mn.bucket, "faces-broken"), storage.join(mn.bucket, "scores-secret")
    for name in ("000.jpg", "001.jpg"):
        photo = storage.read_bytes(storage.join(mn.data, "train", "mask", name))
        storage.write_bytes(storage.join(data, "mask", name), photo)
    storage.write_bytes(storage.join(data, "mask", "broken.jpg"), b"not a jpeg")
    outputs = []
    for cmd in (["python", "-m", "jobs.score", "--input", data, "--model", trained.model, "--output", scores,
                 "--run-id", "s1", "--actors", "1", "--threads", "1"],
                ["python", "-m", "jobs.report", "--results", scores, "--out", storage.join(mn.bucket, "report")]):
        res = cluster.run("job", "submit", "--address", cluster.address, "--working-dir", REPO, "--", *cmd,
                          timeout=300, check=False)
        assert res.returncode == 0 and "succeeded" in res.stdout.lower(), res.stdout[-3000:] + res.stderr[-3000:]
        outputs += [res.stdout, res.stderr]
    assert set(results.read_results(scores).column("status").to_pylist()) == {"ok", "error"}
    # The submitted jobs: the training run's, the tests' before this one, and these two (a driver that
    # connected directly, as the autoscaler test's does, has no submission id: its logs are files, read below).
    jobs = [j for j in cluster.api("/api/jobs/") if j.get("submission_id")]
    assert len(jobs) >= 3, jobs
    outputs += [cluster.job_logs(j["submission_id"]) for j in jobs]

    needle = secret.encode()
    assert not [o for o in outputs if secret in o], "the secret is in a job's output or logs"
    # Everything the jobs wrote: results and run metadata, model.json, train_config.json, checkpoints
    # (state, Ray Train's checkpoint metadata and snapshots), metrics, reports, the run report.
    fs, root = storage.filesystem(mn.bucket)
    written = fs.find(root)  # hidden files (Ray Train's .metadata.json and the like) included
    names = {p.rsplit("/", 1)[-1] for p in written}
    assert {"model.json", "train_config.json", "metrics.csv", "state.pt", "report.html", "alerts.png"} <= names, \
        sorted(names)
    assert any("checkpoint_manager_snapshot" in n for n in names) and any(n.endswith(".parquet") for n in names)
    assert not [p for p in written if needle in fs.cat_file(p)]
    # Every log of every Ray process on every node, the lost ones too (drivers, workers, agents, GCS, runtime envs).
    assert not _files_holding(cluster.dir, needle)
