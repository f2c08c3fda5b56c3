"""Shared fixtures: a real S3 endpoint on loopback, a real local Ray instance, temp dirs.

The S3 endpoint is moto's server mode in a subprocess on a free port of
127.0.0.1 (the pattern of Ray's and s3fs's own tests); everything talks to it
over HTTP through s3fs / pyarrow exactly as production talks to S3 or MinIO.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never let botocore probe the instance-metadata address from a test.
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
}


def _own_ray_token() -> None:
    """Ray 2.60's local ``ray.init`` turns token auth on and keeps the token in ``~/.ray``; tests use their own."""
    import secrets
    import tempfile

    if os.environ.get("RAY_AUTH_TOKEN_PATH") or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = os.path.join(tempfile.mkdtemp(prefix="mm-token-"), "auth_token")
    with open(path, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = path  # inherited by the jobs and Ray processes tests start


_own_ray_token()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; sets the standard AWS variables for this process and its children."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    old = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL_S3"]}
    try:
        _wait_http(f"{endpoint}/moto-api/")
        os.environ.update(S3_ENV)
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; yields its ``s3://name`` URI."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False)
    fs.mkdir(name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A real local Ray instance with 2 CPUs, started after the S3 variables are set so workers inherit them."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in [*S3_ENV, "AWS_ENDPOINT_URL_S3"]}})
    yield ray
    ray.shutdown()


def write_tiny_tree(root: str, *, splits=(("train", 24), ("val", 8)), classes=("mask", "no_mask"),
                    size: int = 40, seed: int = 0) -> dict[str, int]:
    """A small, easily learnable ImageFolder tree written through the storage layer (any URI).

    Class 0 has a bright lower half (a "mask"), class 1 a bright upper half;
    noise and position jitter keep it from being a constant. Returns counts per split.
    """
    import io

    import numpy as np
    from PIL import Image

    from maskmodel.io import storage

    rng = np.random.default_rng(seed)
    counts = {}
    for split, n in splits:
        counts[split] = 0
        for ci, cls in enumerate(classes):
            for i in range(n):
                a = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                cut = size // 2 + int(rng.integers(-3, 4))
                if ci == 0:
                    a[cut:, :, 2] = 200
                else:
                    a[:cut, :, 0] = 200
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="JPEG", quality=90)
                storage.write_bytes(storage.join(root, split, cls, f"{i:03d}.jpg"), buf.getvalue())
                counts[split] += 1
    return counts


class RayCluster:
    """A Ray cluster started with ``ray start`` (head + optional worker nodes), token auth on.

    Each node runs ``ray start --block`` in its own process group, so teardown stops exactly
    the processes this cluster started and never a Ray of anyone else's on the machine.
    The token lives in the cluster's own temp dir (``RAY_AUTH_TOKEN_PATH``), not in ``~/.ray``.
    Every node carries the label ``mm-node=<name>`` (``head``, ``worker1``, ...), which
    :meth:`node_id` maps to Ray's node id; :meth:`api` reads the dashboard's REST API
    (nodes, actors, jobs) with the token, cheaper than a ``ray`` CLI call per poll.
    """

    def __init__(self, base_env: dict[str, str], *, head_cpus: int = 2,
                 extra_env: dict[str, str] | None = None) -> None:
        import secrets
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="mmray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.token_path = os.path.join(self.dir, "auth_token")
        with open(self.token_path, "w") as f:
            f.write(secrets.token_hex(32))
        bin_dir = os.path.dirname(sys.executable)
        self.env = {**base_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path,
                    "PATH": f"{bin_dir}:{base_env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                    **(extra_env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_TOKEN", None)  # it would win over RAY_AUTH_TOKEN_PATH
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
        self.names: dict[str, subprocess.Popen] = {}
        self.killed: list[subprocess.Popen] = []
        self._ray = os.path.join(bin_dir, "ray")
        self._start("head", ["--head", f"--port={self.gcs_port}", f"--num-cpus={head_cpus}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.dir}/t",
                             "--node-ip-address=127.0.0.1"])
        self.wait_for_nodes(1)

    @property
    def address(self) -> str:
        """The job-submission address (the dashboard's HTTP port)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.dir, f"{name}.log"), "w")
        # Each node's agents get free ports: their defaults (e.g. 52365 for the dashboard agent that
        # accepts jobs) are fixed, so a second node on this machine, or a cluster still shutting down,
        # would leave the new node without a job agent ("No available agent to submit job").
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        proc = subprocess.Popen([self._ray, "start", "--block", "--disable-usage-stats", f"--labels=mm-node={name}",
                                 *ports, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.names[name] = proc
        return proc

    def add_worker(self, *, num_cpus: int = 1, resources: str | None = None) -> subprocess.Popen:
        """Start one worker node (label ``mm-node=worker<i>``) and wait until it is alive."""
        return self.add_workers(1, num_cpus=num_cpus, resources=resources)[0]

    def add_workers(self, n: int, *, num_cpus: int = 1, resources: str | None = None) -> list[subprocess.Popen]:
        """Start ``n`` worker nodes at once and wait until all are alive; their ``ray start`` processes."""
        started = []
        for _ in range(n):
            name = f"worker{len(self.procs)}"
            # Its own temp dir, as on a machine of its own: nodes sharing the head's would share one
            # runtime_resources folder, where each node's agent re-extracts a job's working dir while
            # drivers already run in it, and one logs folder, whose every line each node would stream.
            args = [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
                    f"--temp-dir={self.dir}/t-{name}"]
            if resources:
                args.append(f"--resources={resources}")
            started.append(self._start(name, args))
        self.wait_for_nodes(1, names=[self.name_of(p) for p in started])
        return started

    def name_of(self, proc: subprocess.Popen) -> str:
        return next(k for k, v in self.names.items() if v is proc)

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Run a ``ray`` CLI command (e.g. ``job submit``) as a token-holding client.

        A fresh head refuses job commands with "No available agent" until its job agent has
        registered (seen to take over 30 s on a loaded 2-core machine); retried for up to 2 minutes.
        """
        for _ in range(120):
            res = subprocess.run([self._ray, *args], env=self.env, capture_output=True, text=True,
                                 timeout=timeout)
            if "No available agent" not in res.stderr:
                break
            time.sleep(1)
        if check:
            res.check_returncode()
        return res

    def api(self, path: str, *, timeout: float = 30) -> dict:
        """GET a dashboard REST path (e.g. ``/api/v0/nodes``) with the cluster's token; the decoded JSON."""
        import json

        with open(self.token_path) as f:
            token = f.read().strip()
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def _state(self, kind: str, **filters: str) -> list[dict]:
        """Rows of the state API (``nodes``, ``actors``, ...), filtered by equality on the given fields."""
        from urllib.parse import urlencode

        query = [("limit", "10000"), ("detail", "1")]
        for key, value in filters.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        return self.api(f"/api/v0/{kind}?{urlencode(query)}")["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return self._state("nodes", state="ALIVE")

    def node_id(self, name: str) -> str:
        """The Ray node id of node ``name`` (``head``, ``worker1``, ...); alive or dead."""
        for node in self._state("nodes"):
            if node.get("labels", {}).get("mm-node") == name:
                return node["node_id"]
        raise KeyError(f"no Ray node labelled mm-node={name}")

    def node_name(self, node_id: str) -> str:
        """The ``mm-node`` label of a Ray node id."""
        return next(n["labels"]["mm-node"] for n in self._state("nodes") if n["node_id"] == node_id)

    def actors(self, class_name: str | None = None, **filters: str) -> list[dict]:
        """Actors (alive and dead, or as filtered), e.g. ``actors("RayTrainWorker", job_id=..., state="ALIVE")``."""
        return self._state("actors", **({"class_name": class_name} if class_name else {}), **filters)

    def job(self, submission_id: str) -> dict:
        """The job's record from the jobs API: ``status``, ``job_id``, ``message``, ..."""
        return self.api(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def wait_job(self, submission_id: str, timeout: float = 600) -> str:
        """Wait until the job ends; its final status (``SUCCEEDED``, ``FAILED``, ``STOPPED``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.job(submission_id)["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(0.2)
        raise TimeoutError(f"job {submission_id} still running after {timeout}s")

    def wait_for_nodes(self, n: int, timeout: float = 120, *, names: list[str] | None = None) -> None:
        """Wait until ``n`` nodes (and those labelled ``names``) are alive and the dashboard answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None and p not in self.killed:
                    raise RuntimeError(f"ray start exited early; see {self.dir}/*.log")
            try:
                alive = self.alive_nodes()
            except OSError:  # dashboard not up yet
                alive = []
            labels = {node.get("labels", {}).get("mm-node") for node in alive}
            if len(alive) >= n and set(names or ()) <= labels:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{n} Ray node(s) not up after {timeout}s; see {self.dir}/*.log")

    def kill_node(self, proc: subprocess.Popen) -> None:
        """SIGKILL a node's whole process group (raylet, its workers, agents): a machine that vanished."""
        import signal

        self.killed.append(proc)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self, grace: float = 5) -> None:
        """Stop every node this cluster started; only its own process groups and temp dir, never ``ray stop``."""
        import signal

        # SIGTERM to `ray start --block` alone lets it stop an idle node's processes in order (~2 s);
        # SIGTERM to the whole group at once leaves them waiting on each other for ~30 s. A node
        # still draining after `grace` is SIGKILLed: this is a throw-away test cluster.
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever is left of the node's group (a worker mid-task, an agent)
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if p.poll() is None:
                p.wait(timeout=30)
        # Ray's own daemons may have left the group; stop whatever still uses this cluster's temp dir.
        for pid in _pids_with_arg(f"{self.dir}/t"):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _pids_with_arg(text: str) -> list[int]:
    """Ids of this user's processes whose command line contains ``text`` (Linux ``/proc``; else none)."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids
