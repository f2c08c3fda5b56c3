"""Images inside archives: tar (plain or gzip, WebDataset shards) and zip, read without unpacking to disk.

A member is named ``<archive URI>#<member path>`` (``s3://b/day1/batch-7.tar#cam3/000123.jpg``);
:func:`split_member_uri` parses it back. Readers yield one :class:`Member` per image member (its
bytes, or the reason it cannot be scored) and, when the archive itself breaks part-way, one
:class:`Damage` after the members read before the damage. Nothing is ever written anywhere, so a
member named ``../../etc/passwd`` is only a row with a reason. Pure Python, no Ray.

Limits, per member: ``max_bytes`` expanded bytes, and for compressed data ``max_ratio``
expanded:compressed (JPEGs barely compress, so a 1000:1 member is a bomb, not a photo). A
gzip stream is held to the same ratio as a whole.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Sequence

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ZIP_SUFFIXES = (".zip",)
ARCHIVE_EXTENSIONS = ("tar", "tar.gz", "tgz", "zip")
SEPARATOR = "#"
DEFAULT_MAX_RATIO = 100.0


def archive_kind(uri: str) -> str | None:
    """``tar``, ``zip`` or ``None`` (not an archive), from the name."""
    low = uri.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(ZIP_SUFFIXES):
        return "zip"
    return None


def member_uri(archive: str, member: str) -> str:
    """The ``path`` of a member's row."""
    return f"{archive}{SEPARATOR}{member}"


def split_member_uri(path: str) -> tuple[str, str | None]:
    """``(archive, member)`` of a member's path; ``(path, None)`` for a loose object.

    The archive part ends at the first ``#`` that follows an archive suffix,
    so ``#`` elsewhere in a key or inside a member name does not confuse it.
    """
    low, start = path.lower(), 0
    while (i := path.find(SEPARATOR, start)) != -1:
        if low[:i].endswith(TAR_SUFFIXES + ZIP_SUFFIXES):
            return path[:i], path[i + 1:]
        start = i + 1
    return path, None


@dataclass(frozen=True)
class Member:
    """One image member: its name in the archive, uncompressed size, and bytes or the reason it has none."""

    name: str
    size: int | None
    data: bytes | None = None
    error: str | None = None


@dataclass(frozen=True)
class Damage:
    """The archive broke (truncated, corrupt, a bomb) after the members yielded so far: ``reason`` says how."""

    reason: str


def unsafe_name(name: str) -> str | None:
    """The reason a member name is unsafe (absolute, or climbing out with ``..``), else ``None``."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "unsafe member path: absolute"
    if ".." in name.replace("\\", "/").split("/"):
        return "unsafe member path: '..'"
    return None


def _wanted(name: str, extensions: Sequence[str]) -> bool:
    return posixpath.basename(name).lower().endswith(tuple(f".{e.lower().lstrip('.')}" for e in extensions))


class SourceError(OSError):
    """Reading the archive's bytes from storage failed (not the archive's fault: an incremental run retries it)."""


class _Guarded(io.RawIOBase):
    """The archive's byte source: counts what is read (for the expansion ratio), and tells storage failures apart."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.raw.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return self.raw.seek(offset, whence)
        except Exception as e:  # noqa: BLE001 - any storage failure
            raise SourceError(f"{type(e).__name__}: {e}") from e

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, b) -> int:
        try:
            data = self.raw.read(len(b))
        except Exception as e:  # noqa: BLE001 - any storage failure
            raise SourceError(f"{type(e).__name__}: {e}") from e
        b[:len(data)] = data
        self.count += len(data)
        return len(data)


def iter_tar(stream: BinaryIO, *, extensions: Sequence[str], max_bytes: int,
             max_ratio: float = DEFAULT_MAX_RATIO, skip: Callable[[str], bool] = lambda name: False
             ) -> Iterator[Member | Damage]:
    """Image members of a tar (plain or gzip-compressed), read front to back from ``stream`` once.

    Memory is one member at a time. Members whose name lacks one of
    ``extensions`` are passed over, as are those ``skip(name)`` is true for
    (already scored); directories are ignored; links and devices named like
    images are rows with a reason.
    """
    counted = _Guarded(stream)
    try:
        tar = tarfile.open(fileobj=io.BufferedReader(counted, 1 << 20), mode="r|*")
        for info in tar:
            tar.members = []  # streaming mode keeps every header otherwise: memory must not grow per member
            if info.isdir() or not _wanted(info.name, extensions):
                continue
            if tar.offset > max_ratio * max(counted.count, 1 << 20):
                yield Damage(f"compression ratio over {max_ratio:g}:1 (a decompression bomb?)")
                return
            if reason := unsafe_name(info.name):
                yield Member(info.name, info.size, error=reason)
            elif not info.isfile():
                yield Member(info.name, None, error="unsupported member: link or device")
            elif info.size > max_bytes:
                yield Member(info.name, info.size, error=f"too large: {info.size} bytes > {max_bytes}")
            elif not skip(info.name):
                f = tar.extractfile(info)
                yield Member(info.name, info.size, data=f.read() if f else b"")
        # tarfile ends quietly when the stream does, even part-way through a header: a complete
        # archive ends with a whole block of zeros after its last member, so that block was read.
        if getattr(tar.fileobj, "pos", tar.offset + tarfile.BLOCKSIZE) < tar.offset + tarfile.BLOCKSIZE:
            yield Damage("truncated archive")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        yield Damage(_damage(e))


def _damage(e: BaseException) -> str:
    source = e if isinstance(e, SourceError) else e.__context__
    if isinstance(source, SourceError):  # storage, not the archive: say so, so that it is retried
        return f"unreadable: {str(source).split(':', 1)[0]}"
    text = str(e).lower()
    if isinstance(e, EOFError) or "unexpected end" in text or "truncated" in text or "end of data" in text:
        return "truncated archive"
    return f"corrupt archive: {str(e).splitlines()[0] if str(e) else type(e).__name__}"[:200]


def zip_index(fileobj: BinaryIO) -> list[zipfile.ZipInfo]:
    """Every entry of a zip's central directory, in order; raises :class:`Damage`-worthy errors as ``ValueError``."""
    try:
        return zipfile.ZipFile(io.BufferedReader(_Guarded(fileobj), 1 << 16)).infolist()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise ValueError(_zip_damage(e)) from e


def _zip_damage(e: BaseException) -> str:
    if isinstance(e, zipfile.BadZipFile) and "not a zip file" in str(e).lower():
        return "corrupt archive: no zip central directory (truncated?)"
    return _damage(e)


def iter_zip(fileobj: BinaryIO, *, extensions: Sequence[str], max_bytes: int,
             max_ratio: float = DEFAULT_MAX_RATIO, first: int = 0, count: int | None = None,
             skip: Callable[[str], bool] = lambda name: False) -> Iterator[Member | Damage]:
    """Image members ``first`` .. ``first + count`` of a zip (central-directory order), by random access.

    ``fileobj`` must be seekable (a ranged reader on object storage). Each
    member's declared sizes are checked before it is expanded, and its expanded
    bytes are capped at ``max_bytes`` whatever the header claims.
    """
    try:
        archive = zipfile.ZipFile(io.BufferedReader(_Guarded(fileobj), 1 << 16))
        infos = archive.infolist()[first:None if count is None else first + count]
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        yield Damage(_zip_damage(e))
        return
    for info in infos:
        if info.is_dir() or not _wanted(info.filename, extensions):
            continue
        name, size = info.filename, info.file_size
        if reason := unsafe_name(name):
            yield Member(name, size, error=reason)
        elif info.flag_bits & 0x1:
            yield Member(name, size, error="encrypted member")
        elif size > max_bytes:
            yield Member(name, size, error=f"too large: {size} bytes > {max_bytes}")
        elif info.compress_size and size > max_ratio * info.compress_size:
            yield Member(name, size, error=f"compression ratio over {max_ratio:g}:1 (a decompression bomb?)")
        elif not skip(name):
            try:
                with archive.open(info) as f:
                    data = f.read(max_bytes + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
                yield Member(name, size, error=f"corrupt member: {str(e).splitlines()[0] if str(e) else type(e).__name__}"[:200])
                continue
            except OSError as e:  # the storage under the archive failed: the rest is unreachable too
                yield Damage(_damage(e))
                return
            if len(data) > max_bytes:  # the header lied about the size
                yield Member(name, size, error=f"too large: over {max_bytes} bytes when expanded")
            else:
                yield Member(name, size, data=data)
