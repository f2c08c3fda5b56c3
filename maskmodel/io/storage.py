"""The one storage layer: a URI in, a filesystem out.

Every path in maskmodel is a URI that fsspec understands: a local path,
``file://``, ``s3://`` (s3fs), ``gs://`` (gcsfs, if installed) or
``memory://``. S3-compatible endpoints (MinIO, moto, Ceph) are reached
through the standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables
or the explicit ``endpoint_url`` option. Credentials come only from the
environment or the platform's usual chain and never appear in messages.

Errors a user can cause are raised as :class:`~maskmodel.errors.UserError`
with one sentence naming the URI and the likely fix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec

from maskmodel.errors import UserError

log = logging.getLogger(__name__)

SUPPORTED_SCHEMES = ("file", "s3", "gs", "gcs", "memory")
MAX_CONCURRENT_READS = 128  # per process; object stores reward concurrency, not round trips


def split_uri(uri: str) -> tuple[str, str]:
    """Return ``(scheme, path)``; a plain local path has scheme ``file``."""
    if not uri:
        raise UserError("An empty path was given; pass a local path or a URI such as s3://bucket/prefix.")
    if "://" not in uri:
        return "file", os.path.abspath(os.path.expanduser(uri))
    scheme, path = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise UserError(
            f"Unsupported storage scheme '{scheme}://' in {uri!r}; use a local path, file://, s3://, gs:// or memory://."
        )
    if scheme == "file":
        return "file", os.path.abspath(path)
    return scheme, path.rstrip("/") if path != "/" else path


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint to use: explicit option, else the standard AWS variables."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str, *, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``uri`` to ``(fsspec filesystem, path within it)``."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        return fsspec.filesystem("file", auto_mkdir=True), path
    fs = _remote_filesystem(scheme, endpoint_url)
    # Each backend has its own canonical path form (memory:// keeps a leading
    # slash, s3:// does not); listings return that form, so use it throughout.
    return fs, fs._strip_protocol(uri)


def _remote_filesystem(scheme: str, endpoint_url: str | None) -> fsspec.AbstractFileSystem:
    if scheme == "s3":
        try:
            import s3fs  # noqa: F401  (imported lazily: hosts without s3fs still run local jobs)
        except ImportError as e:  # pragma: no cover - s3fs is a dependency
            raise UserError("s3:// URIs need the s3fs package; install it with `pip install s3fs`.") from e
        client_kwargs = {}
        endpoint = s3_endpoint(endpoint_url)
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        # Listings are not cached: an incremental run must see objects that
        # arrived since the last listing in this process. The connection pool
        # is as large as the most reads :func:`read_many` keeps in flight.
        return fsspec.filesystem("s3", client_kwargs=client_kwargs, use_listings_cache=False,
                                 config_kwargs={"max_pool_connections": MAX_CONCURRENT_READS})
    if scheme in ("gs", "gcs"):
        try:
            return fsspec.filesystem("gcs")
        except ImportError as e:
            raise UserError("gs:// URIs need the gcsfs package; install it with `pip install gcsfs`.") from e
    return fsspec.filesystem("memory")


def pyarrow_filesystem(uri: str, *, endpoint_url: str | None = None):
    """Resolve ``uri`` to ``(pyarrow.fs.FileSystem, path)`` for Ray Data, Ray Train and pyarrow readers.

    S3 gets Arrow's native client (C++, multipart uploads in parallel, no Python
    in the data path), which is what Ray Train uploads checkpoints through; the
    endpoint comes from the same variables as everywhere else and credentials
    from the environment or the platform's chain, never from arguments (so
    they are not in the pickled filesystem either). Other schemes wrap fsspec.
    """
    import pyarrow.fs as pafs

    scheme = split_uri(uri)[0]
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    if scheme == "s3":
        from urllib.parse import urlsplit

        endpoint = s3_endpoint(endpoint_url)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        kwargs: dict[str, Any] = {}
        if endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme, region=region or "us-east-1")
        else:
            try:  # the bucket's own region: Arrow's client does not follow a redirect to another one
                kwargs["region"] = pafs.resolve_s3_region(path.split("/", 1)[0])
            except OSError:
                kwargs["region"] = region or "us-east-1"
        return pafs.S3FileSystem(**kwargs), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def delta_location(uri: str) -> tuple[str, dict[str, str]]:
    """``uri`` as the ``deltalake`` package (delta-rs) spells it, with the storage options it needs.

    The options name the S3 endpoint (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
    plain HTTP allowed only when the endpoint says ``http://``) and how a commit
    is made atomic: ``conditional_put`` (``etag``, or ``AWS_CONDITIONAL_PUT`` from
    the environment, e.g. ``dynamo:<table>`` for a store without conditional
    PUTs). They never hold credentials: delta-rs reads those from the environment
    or the platform's chain itself. Raises :class:`UserError` for ``memory://``,
    which delta-rs cannot share with this process's fsspec memory filesystem.
    """
    scheme, path = split_uri(uri)
    if scheme == "file":
        return path, {}
    if scheme == "s3":
        options = {"conditional_put": os.environ.get("AWS_CONDITIONAL_PUT") or "etag"}
        endpoint = s3_endpoint()
        if endpoint:
            options["AWS_ENDPOINT_URL"] = endpoint
            if endpoint.lower().startswith("http://"):
                options["AWS_ALLOW_HTTP"] = "true"
        return f"s3://{path}", options
    if scheme in ("gs", "gcs"):
        return f"gs://{path}", {}
    raise UserError(f"{uri!r}: a results table needs a local path, s3:// or gs://, not {scheme}://.")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (works for local paths too)."""
    parts = tuple(p.strip("/") for p in parts if p)
    if "://" in uri:
        return "/".join([uri.rstrip("/"), *parts])
    return os.path.join(uri, *parts)


def to_uri(uri: str, path: str) -> str:
    """Re-attach ``uri``'s scheme to a filesystem-relative ``path`` returned by a listing."""
    scheme, _ = split_uri(uri)
    if scheme == "file":
        return path
    if scheme in ("gs", "gcs"):
        return f"gs://{path}"
    if scheme == "memory":
        return f"memory://{path.lstrip('/')}"
    return f"{scheme}://{path}"


def _credential_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        return (NoCredentialsError, PartialCredentialsError)
    except ImportError:  # pragma: no cover
        return ()


def _message(uri: str, exc: BaseException, action: str) -> str:
    text = f"{type(exc).__name__}: {exc}"
    scheme = split_uri(uri)[0] if "://" in uri else "file"
    if isinstance(exc, _credential_errors()) or "credential" in text.lower():
        return (f"No credentials found to {action} {uri!r}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                f"(or AWS_PROFILE, or an instance role) in the environment.")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"The bucket of {uri!r} does not exist; create it or check the bucket name."
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "403" in text:
        return f"Permission denied when trying to {action} {uri!r}; check the credentials' access to it."
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return f"{uri!r} does not exist; check the path."
    if isinstance(exc, IsADirectoryError):
        return f"{uri!r} is a directory, not a file; check the path."
    if scheme == "s3" and ("Could not connect" in text or "Connect" in type(exc).__name__ or "EndpointConnection" in text):
        return (f"Cannot reach the S3 endpoint for {uri!r}; check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL "
                f"and the network.")
    if isinstance(exc, OSError) and getattr(exc, "errno", None) in (30,):  # EROFS
        return f"{uri!r} is on a read-only filesystem; choose a writable location."
    return f"Could not {action} {uri!r}: {type(exc).__name__}: {exc}".splitlines()[0]


@contextlib.contextmanager
def storage_errors(uri: str, action: str = "access") -> Iterator[None]:
    """Turn a storage failure inside the block into a one-sentence :class:`UserError`."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything a backend raises is translated once, here
        raise UserError(_message(uri, exc, action)) from exc


def exists(uri: str) -> bool:
    """Whether ``uri`` exists; unlike ``fs.exists`` a credentials or permission problem is raised, not ``False``."""
    fs, path = filesystem(uri)
    with storage_errors(uri, "read"):
        try:
            fs.info(path)
            return True
        except FileNotFoundError:
            return False


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with storage_errors(uri, "read"):
        return fs.cat_file(path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def read_json_object(uri: str, *, missing: str, fix: str) -> dict:
    """The JSON object stored at ``uri`` (a model or detector card).

    Raises :class:`UserError`: ``missing`` when there is no such object; one naming ``uri`` and ending
    with ``fix`` when it is not valid UTF-8 JSON or not a JSON object.
    """
    if not exists(uri):
        raise UserError(missing)
    try:
        raw = read_json(uri)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{uri!r} is not valid JSON ({e}); {fix}") from e
    if not isinstance(raw, dict):
        raise UserError(f"{uri!r} is not a JSON object; {fix}")
    return raw


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``; on local disk via a temp file and rename, so readers never see half a file."""
    fs, path = filesystem(uri)
    with storage_errors(uri, "write"):
        if split_uri(uri)[0] == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            # An object store PUT is atomic: the object appears whole or not at all.
            fs.pipe_file(path, data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def delete(uri: str, *, recursive: bool = True) -> None:
    """Delete ``uri`` (a file or a whole prefix); a missing path is not an error."""
    fs, path = filesystem(uri)
    with storage_errors(uri, "delete"):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)


def ensure_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    with storage_errors(uri, "create"):
        fs.makedirs(path, exist_ok=True)


def check_writable(uri: str) -> None:
    """Prove that ``uri`` accepts writes by writing and removing a small marker object.

    Raises :class:`UserError` (missing bucket, no credentials, permission denied,
    read-only disk) before a job spends any time computing.
    """
    split_uri(uri)  # an unknown scheme is reported against the user's URI, not the marker's
    marker = join(uri, f".maskmodel-write-check-{uuid.uuid4().hex}")
    fs, path = filesystem(marker)
    with storage_errors(uri, "write to"):
        fs.pipe_file(path, b"ok")
        fs.rm(path)


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its URI, size and a version tag (ETag, else size+mtime).

    ``size`` and ``version`` are ``None`` for an entry of a manifest that does not give them (the load
    step takes them from the object's own response).
    """

    uri: str
    size: int | None
    version: str | None


def object_version(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"{info.get('size', 0)}-{mtime}"


@dataclass(frozen=True)
class LeftOut:
    """The files a listing passed over on purpose, counted so that a run summary can say so.

    ``hidden``: a path part (below the listed prefix) starts with ``.``: dotfiles, ``.thumbs/`` or ``.git/``
    folders, macOS ``._IMG_0001.jpg`` AppleDouble files (resource forks, not pictures). ``extension``: the
    name lacks every one of the extensions asked for.
    """

    hidden: int = 0
    extension: int = 0

    @property
    def total(self) -> int:
        return self.hidden + self.extension


def list_objects(uri: str, *, extensions: tuple[str, ...] | None = None) -> tuple[list[ObjectInfo], LeftOut]:
    """Recursively list the files under ``uri``, sorted by URI, and count those passed over.

    ``extensions`` (lower case, without dots) filters by file name suffix in
    any case. Hidden files (a path part starting with ``.``) are skipped. Both
    kinds are counted in the :class:`LeftOut`. Raises :class:`UserError` when
    ``uri`` does not exist.
    """
    fs, root = filesystem(uri)
    with storage_errors(uri, "list"):
        found = fs.find(root, detail=True)
        if not found:
            fs.info(root)  # raises for a missing path / bucket / credentials; an empty folder lists nothing
    exts = tuple(f".{e.lower().lstrip('.')}" for e in extensions) if extensions else None
    out, hidden, other = [], 0, 0
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        rel = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
        if any(part.startswith(".") for part in rel.split("/")):
            hidden += 1
            continue
        if exts and not path.lower().endswith(exts):
            other += 1
            continue
        out.append(ObjectInfo(uri=to_uri(uri, path), size=int(info.get("size") or 0), version=object_version(info)))
    out.sort(key=lambda o: o.uri)
    return out, LeftOut(hidden, other)


def list_files(uri: str, *, extensions: tuple[str, ...] | None = None) -> list[ObjectInfo]:
    """:func:`list_objects`' objects (what was passed over is not counted)."""
    return list_objects(uri, extensions=extensions)[0]


def info(uri: str) -> ObjectInfo:
    """Size and version of one object; :class:`UserError` when it does not exist."""
    fs, path = filesystem(uri)
    with storage_errors(uri, "read"):
        i = fs.info(path)
    return ObjectInfo(uri=uri, size=int(i.get("size") or 0), version=object_version(i))


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the direct children of ``uri``, sorted; ``[]`` if it does not exist."""
    fs, path = filesystem(uri)
    if not exists(uri):
        return []
    with storage_errors(uri, "list"):
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))

