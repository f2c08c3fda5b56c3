"""The storage layer: round trips on local, memory and S3; every user-caused error is one sentence."""

from __future__ import annotations

import os
import uuid

import pytest

from maskmodel.errors import UserError
from maskmodel.io import storage


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "memory":
        return f"memory://maskmodel-test-{uuid.uuid4().hex[:8]}"
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip(root):
    storage.write_bytes(storage.join(root, "a/b.bin"), b"\x00\x01")
    storage.write_json(storage.join(root, "meta.json"), {"x": 1})
    storage.write_bytes(storage.join(root, "a/C.JPG"), b"jpg")
    storage.write_bytes(storage.join(root, ".hidden/x.jpg"), b"no")
    assert storage.read_bytes(storage.join(root, "a/b.bin")) == b"\x00\x01"
    assert storage.read_json(storage.join(root, "meta.json")) == {"x": 1}
    assert storage.exists(storage.join(root, "a/b.bin"))
    assert not storage.exists(storage.join(root, "nope"))
    listed = storage.list_files(root)
    assert [os.path.basename(o.uri) for o in listed] == ["C.JPG", "b.bin", "meta.json"]
    assert all(o.version for o in listed)
    jpgs = storage.list_files(root, extensions=("jpg",))
    assert len(jpgs) == 1 and jpgs[0].uri == storage.join(root, "a/C.JPG")
    assert storage.read_bytes(jpgs[0].uri) == b"jpg"  # listed URIs are readable as they are
    assert storage.listdir(root) == sorted(["a", "meta.json", ".hidden"])
    storage.delete(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a/b.bin"))
    storage.check_writable(root)


def test_pyarrow_filesystem_reads_what_fsspec_wrote(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage.ensure_dir(root)
    uri = storage.join(root, "t.parquet")
    fs, path = storage.pyarrow_filesystem(uri)
    pq.write_table(pa.table({"a": [1, 2]}), path, filesystem=fs)
    fs2, path2 = storage.pyarrow_filesystem(uri)
    assert pq.read_table(path2, filesystem=fs2).column("a").to_pylist() == [1, 2]


def _one_sentence(e: UserError) -> str:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_unknown_scheme():
    with pytest.raises(UserError) as e:
        storage.read_bytes("ftp://host/x")
    assert "Unsupported storage scheme 'ftp://'" in _one_sentence(e.value)


def test_missing_bucket(s3_endpoint):
    with pytest.raises(UserError) as e:
        storage.check_writable("s3://no-such-bucket-xyz/out")
    assert "does not exist" in _one_sentence(e.value)
    with pytest.raises(UserError) as e:
        storage.list_files("s3://no-such-bucket-xyz/in")
    assert "does not exist" in _one_sentence(e.value)


def test_missing_local_path(tmp_path):
    with pytest.raises(UserError) as e:
        storage.read_bytes(str(tmp_path / "nope.bin"))
    assert "does not exist" in _one_sentence(e.value)


def test_no_credentials(s3_bucket, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    with pytest.raises(UserError) as e:
        storage.check_writable(s3_bucket + "/out")
    msg = _one_sentence(e.value)
    assert "No credentials" in msg and "AWS_ACCESS_KEY_ID" in msg
    fsspec.filesystem("s3").clear_instance_cache()


def test_permission_denied_local(tmp_path):
    if os.geteuid() == 0:
        # root ignores file modes; a path under a regular file is unwritable for anyone.
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = str(blocker / "sub")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "sub")
    with pytest.raises(UserError) as e:
        storage.check_writable(target)
    _one_sentence(e.value)


def test_secrets_never_in_messages(s3_endpoint):
    with pytest.raises(UserError) as e:
        storage.check_writable("s3://no-such-bucket-xyz/out")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(e.value).replace("testing-", "")
