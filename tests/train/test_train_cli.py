"""``python -m jobs.train`` with bad input: one sentence, exit code 2, before any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from maskmodel.io import storage
from tests.conftest import free_port, write_tiny_tree


def _train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.train", "--weights", "none", "--arch", "resnet18", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def _assert_one_sentence(res: subprocess.CompletedProcess, needle: str, *, ray_may_start: bool = False) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, res.stderr
    assert "RayTrainWorker" not in res.stderr  # no training worker was ever started
    if not ray_may_start:
        assert "Started a local Ray instance" not in res.stderr


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "data")
    write_tiny_tree(root, splits=(("train", 3), ("val", 1)), size=16)
    return root


def test_data_uri_missing(tmp_path):
    _assert_one_sentence(_train("--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")), "does not exist")


def test_single_class(tmp_path):
    write_tiny_tree(str(tmp_path / "d"), classes=("mask",), size=16)
    _assert_one_sentence(_train("--data", str(tmp_path / "d"), "--output", str(tmp_path / "o")), "single class")


def test_empty_class_folder(tmp_path):
    write_tiny_tree(str(tmp_path / "d"), classes=("mask",), size=16)
    os.makedirs(tmp_path / "d" / "train" / "no_mask")
    _assert_one_sentence(_train("--data", str(tmp_path / "d"), "--output", str(tmp_path / "o")), "single class")


def test_missing_train_split(tmp_path):
    write_tiny_tree(str(tmp_path / "d"), splits=(("val", 2),), size=16)
    _assert_one_sentence(_train("--data", str(tmp_path / "d"), "--output", str(tmp_path / "o")),
                         "no training images")


def test_bad_weights_uri(tree, tmp_path):
    _assert_one_sentence(_train("--data", tree, "--output", str(tmp_path / "o"), "--weights", str(tmp_path / "w.pt")),
                         "does not exist")


def test_unwritable_output(tree, tmp_path):
    (tmp_path / "file").write_text("x")
    _assert_one_sentence(_train("--data", tree, "--output", str(tmp_path / "file" / "out")), "")


def test_missing_bucket(tree, s3_endpoint):
    _assert_one_sentence(_train("--data", tree, "--output", "s3://no-such-bucket-abc/run"), "does not exist")


def test_unreachable_storage(tree):
    port = free_port()  # nothing listens there
    res = _train("--data", "s3://bucket/faces", "--output", "/tmp/unused",
                 env={"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                      "AWS_SECRET_ACCESS_KEY": "y", "AWS_EC2_METADATA_DISABLED": "true",
                      "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"})
    _assert_one_sentence(res, "Cannot reach the S3 endpoint")


def test_unknown_scheme(tree, tmp_path):
    _assert_one_sentence(_train("--data", "ftp://x/y", "--output", str(tmp_path / "o")), "Unsupported storage scheme")


def test_too_many_unreadable_images_stop_the_job(tree, tmp_path):
    for i in range(3):
        storage.write_bytes(storage.join(tree, "train", "mask", f"bad{i}.jpg"), b"junk")
    res = _train("--data", tree, "--output", str(tmp_path / "o"), "--epochs", "1", "--image-size", "16")
    # Finding unreadable images takes one Ray Data pass over the bytes, but no training worker starts.
    _assert_one_sentence(res, "unreadable", ray_may_start=True)
    assert "bad0.jpg" in res.stderr


def test_help_shows_both_ways_to_run():
    res = subprocess.run([sys.executable, "-m", "jobs.train", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ray job submit" in res.stdout and "--num-workers" in res.stdout
