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
