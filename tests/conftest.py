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

    from maskmodel import storage

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
    """

    def __init__(self, base_env: dict[str, str], *, head_cpus: int = 2) -> None:
        import secrets
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="mmray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.token_path = os.path.join(self.dir, "auth_token")
        with open(self.token_path, "w") as f:
            f.write(secrets.token_hex(32))
        bin_dir = os.path.dirname(sys.executable)
        self.env = {**base_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path,
                    "PATH": f"{bin_dir}:{base_env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
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

    def _start(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.dir, f"{name}.log"), "w")
        self.procs.append(subprocess.Popen([self._ray, "start", "--block", "--disable-usage-stats", *args],
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def add_worker(self, *, num_cpus: int = 1, resources: str | None = None) -> subprocess.Popen:
        args = [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1"]
        if resources:
            args.append(f"--resources={resources}")
        self._start(f"worker{len(self.procs)}", args)
        self.wait_for_nodes(len(self.procs))
        return self.procs[-1]

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Run a ``ray`` CLI command (e.g. ``job submit``) as a token-holding client."""
        return subprocess.run([self._ray, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited early; see {self.dir}/*.log")
            res = subprocess.run([self._ray, "status", f"--address=127.0.0.1:{self.gcs_port}"], env=self.env,
                                 capture_output=True, text=True, timeout=60)
            if res.returncode == 0 and res.stdout.count("node_") >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray node(s) not up after {timeout}s; see {self.dir}/*.log")

    def kill_node(self, proc: subprocess.Popen) -> None:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        import signal

        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        # Ray's own daemons may have left the group; stop whatever still uses this cluster's temp dir.
        subprocess.run(["pkill", "-9", "-f", f"{self.dir}/t"], check=False)


@pytest.fixture
def ray_cluster(s3_endpoint):
    """A one-node Ray cluster started with ``ray start --head`` (token auth on); stopped even on failure."""
    cluster = RayCluster(dict(os.environ))
    try:
        yield cluster
    finally:
        cluster.stop()
