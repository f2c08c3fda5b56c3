"""Reading object data at scale, on top of :mod:`maskmodel.io.storage`: many objects at once, streamed, ranged.

Object stores reward concurrency and punish round trips. :func:`read_many`
keeps many GETs in flight (one per object, its version from the response);
:func:`open_stream` reads an archive front to back through one GET;
:func:`open_ranged` gives random access in large read-ahead blocks (a zip's
central directory, then its members in order).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec

from maskmodel.io.storage import MAX_CONCURRENT_READS, filesystem, object_version, split_uri, storage_errors


@dataclass(frozen=True)
class Fetched:
    """One object read by :func:`read_many`: its bytes (``None`` when over the limit or unreadable), size,
    version (ETag, else size+mtime, as a listing reports it) and the exception that stopped the read, if any."""

    data: bytes | None
    size: int | None
    version: str | None
    error: BaseException | None = None


def read_error_reason(error: BaseException) -> str:
    """The ``unreadable: ...`` reason of a failed read."""
    if isinstance(error, FileNotFoundError):
        return "unreadable: not found"
    if isinstance(error, PermissionError):
        return "unreadable: permission denied"
    return f"unreadable: {type(error).__name__}"


def read_many(uris: list[str], *, max_bytes: int, concurrency: int = 32, head: bool = False) -> list[Fetched]:
    """Read ``uris`` with up to ``concurrency`` requests in flight; one :class:`Fetched` per URI, in order.

    One request per object: on S3 a single GET whose response carries the
    size and ETag (no HEAD first); an object larger than ``max_bytes`` is
    not downloaded (its GET is closed after the headers). ``head``: sizes
    and versions only (a HEAD each), no data. Never raises for one object's
    failure (missing, forbidden, unreachable): it is that object's
    ``error``. All URIs must share one scheme.
    """
    if head:
        max_bytes = -1
    if not uris:
        return []
    concurrency = max(1, min(concurrency, MAX_CONCURRENT_READS, len(uris)))
    scheme = split_uri(uris[0])[0]
    fs, _ = filesystem(uris[0])
    paths = [filesystem(u)[1] for u in uris]
    if scheme == "s3":
        return _read_many_s3(fs, paths, max_bytes, concurrency, head)
    import concurrent.futures

    one = _read_local if scheme == "file" else (lambda p, m: _read_generic(fs, p, m))
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda p: one(p, max_bytes), paths))


def _local_version(f: BinaryIO) -> tuple[int, str]:
    """``(size, version)`` of an open local file: the size + mtime version a listing reports for it."""
    st = os.fstat(f.fileno())
    return st.st_size, object_version({"size": st.st_size, "mtime": st.st_mtime})


def _read_local(path: str, max_bytes: int) -> Fetched:
    try:
        with open(path, "rb") as f:
            size, version = _local_version(f)
            if size > max_bytes:
                return Fetched(None, size, version)
            return Fetched(f.read(), size, version)
    except OSError as e:
        return Fetched(None, None, None, e)


def _read_generic(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int) -> Fetched:
    try:
        i = fs.info(path)
        size, version = int(i.get("size") or 0), object_version(i)
        return Fetched(None if size > max_bytes else fs.cat_file(path), size, version)
    except Exception as e:  # noqa: BLE001 - one object's failure is its own result
        return Fetched(None, None, None, e)


def _read_many_s3(fs: fsspec.AbstractFileSystem, paths: list[str], max_bytes: int, concurrency: int,
                  head: bool) -> list[Fetched]:
    import asyncio

    from fsspec.asyn import sync

    async def one(path: str, gate: asyncio.Semaphore) -> Fetched:
        async with gate:
            try:
                bucket, key, version_id = fs.split_path(path)
                resp = await fs._call_s3("head_object" if head else "get_object", Bucket=bucket, Key=key,
                                         **({"VersionId": version_id} if version_id else {}))
                if head:
                    return Fetched(None, int(resp.get("ContentLength") or 0), object_version(resp))
                body = resp["Body"]
                try:
                    size, version = int(resp.get("ContentLength") or 0), object_version(resp)
                    return Fetched(None if size > max_bytes else await body.read(), size, version)
                finally:
                    body.close()
            except Exception as e:  # noqa: BLE001 - s3fs raises FileNotFoundError / PermissionError / OSError
                return Fetched(None, None, None, e)

    async def every() -> list[Fetched]:
        gate = asyncio.Semaphore(concurrency)
        return list(await asyncio.gather(*(one(p, gate) for p in paths)))

    return sync(fs.loop, every)


class _StreamingBody(io.RawIOBase):
    """A synchronous, read-once view of an async S3 GET body (one request, streamed, nothing buffered beyond reads)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, body: Any) -> None:
        self.fs, self.body = fs, body

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        from fsspec.asyn import sync

        data = sync(self.fs.loop, self.body.read, len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


def open_stream(uri: str, *, buffer: int = 1 << 20) -> tuple[BinaryIO, int, str]:
    """``(file, size, version)`` of ``uri`` read front to back through one request (one GET on S3).

    For archives streamed member by member: memory is ``buffer``, whatever the
    object's size. Raises :class:`UserError` when it cannot be opened.
    """
    fs, path = filesystem(uri)
    scheme = split_uri(uri)[0]
    with storage_errors(uri, "read"):
        if scheme == "file":
            f = open(path, "rb", buffering=buffer)
            return (f, *_local_version(f))
        if scheme == "s3":
            from fsspec.asyn import sync

            bucket, key, version_id = fs.split_path(path)
            resp = sync(fs.loop, fs._call_s3, "get_object", Bucket=bucket, Key=key,
                        **({"VersionId": version_id} if version_id else {}))
            return (io.BufferedReader(_StreamingBody(fs, resp["Body"]), buffer), int(resp.get("ContentLength") or 0),
                    object_version(resp))
        i = fs.info(path)
        return fs.open(path, "rb", block_size=buffer), int(i.get("size") or 0), object_version(i)


def open_ranged(uri: str, *, block_size: int = 32 << 20) -> tuple[BinaryIO, int, str]:
    """``(file, size, version)`` of ``uri`` for random access (zip central directory, then members).

    On object storage each read past the cache is one ranged GET of
    ``block_size`` bytes, read ahead: members read in order cost one request
    per block, not one per member. Raises :class:`UserError` when it cannot be opened.
    """
    fs, path = filesystem(uri)
    with storage_errors(uri, "read"):
        if split_uri(uri)[0] == "file":
            f = open(path, "rb")
            return (f, *_local_version(f))
        f = fs.open(path, "rb", block_size=block_size, cache_type="readahead")
        details = getattr(f, "details", None) or fs.info(path)
        return f, int(details.get("size") or 0), object_version(details)
