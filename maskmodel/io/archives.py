"""Images inside archives: tar (plain or gzip, WebDataset shards) and zip, read without unpacking to disk.

A member is named ``<archive URI>#<member key>`` (``s3://b/day1/batch-7.tar#cam3/000123.jpg``);
:func:`split_member_uri` parses it back. The key is the member's path, except for a name that
occurs more than once (tar allows it): the k-th member of that name, k >= 2, is ``<name>#k``
(:func:`member_key`, the one identity rule of tar and zip). Zip names are read as written: UTF-8
when they are valid UTF-8 (flag or not), an Info-ZIP Unicode path field first (:func:`zip_name`).

Readers yield one :class:`Member` per image member (its bytes, or the reason it cannot be scored)
and, for the archive's own row, one :class:`Damage`: after the members read before the archive
broke part-way, or alone when it held no image member at all (``no image members``, ``nested
archive not read: <name>``; archives inside archives are not opened), so that every archive is
accounted for by at least one row. Nothing is ever written anywhere, so a member named
``../../etc/passwd`` is only a row with a reason. Pure Python, no Ray.

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

from maskmodel.io.decode import too_large_bytes

# The names and identities of members live in .members (imported from here too, as before).
from maskmodel.io.members import (  # noqa: E402,F401
    ARCHIVE_EXTENSIONS, DEFAULT_MAX_RATIO, SEPARATOR, TAR_SUFFIXES, ZIP_SUFFIXES, archive_kind, member_key, member_uri,
    split_member_uri)


@dataclass(frozen=True)
class Member:
    """One image member: its name in the archive, uncompressed size, bytes or the reason it has none, and its key."""

    name: str
    size: int | None
    data: bytes | None = None
    error: str | None = None
    key: str | None = None  # member_key(name, occurrence); None: the name

    def __post_init__(self) -> None:
        if self.key is None:
            object.__setattr__(self, "key", self.name)


@dataclass(frozen=True)
class Damage:
    """The archive's own row: it broke (truncated, corrupt, a bomb) after the members yielded so far, or it
    yielded none (``no image members``, ``nested archive not read: <name>``); ``reason`` says which."""

    reason: str


class _Accounting:
    """Per archive: the member-identity rule (occurrences of each image member's name) and what it held.

    Memory: one entry per distinct image member name.
    """

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.nested: str | None = None

    def key(self, name: str) -> str:
        k = self.seen[name] = self.seen.get(name, 0) + 1
        return member_key(name, k)

    def note_other(self, name: str) -> None:
        if self.nested is None and archive_kind(name):
            self.nested = name

    def empty(self) -> Damage | None:
        """The archive's row when it held no image member (every object gets at least one row), else None."""
        if self.seen:
            return None
        return Damage(f"nested archive not read: {self.nested}" if self.nested else "no image members")


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


class _Gunzip(io.RawIOBase):
    """A gzip stream expanded, every gzip member of it (bgzip, ``cat a.gz b.gz``, parallel writers), as
    ``gzip -dc`` does: tarfile's own stream mode stops after the first member, and :class:`gzip.GzipFile`
    drops what it expanded of a member cut short. Raises ``EOFError`` only once that much is returned.
    Bytes after the last member that do not start another one (zero padding) are ignored, as gzip does."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.z, self.input = raw, zlib.decompressobj(31), b""
        self.pending, self.at = b"", 0  # expanded bytes not returned yet start at ``at``

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        while self.at >= len(self.pending):
            if self.z.eof:
                rest = self.z.unused_data
                while len(rest) < 2 and (more := self.raw.read(1 << 16)):
                    rest += more
                if rest[:2] != b"\x1f\x8b":
                    return False
                self.z, self.input = zlib.decompressobj(31), rest
            data = self.input or self.raw.read(1 << 16)
            if not data:
                raise EOFError("compressed stream ended before its end-of-stream marker")
            self.pending, self.at = self.z.decompress(data, 1 << 20), 0  # a bomb expands one MB at a time
            self.input = self.z.unconsumed_tail
        return True

    def readinto(self, b) -> int:
        if not self._fill():
            return 0
        n = min(len(b), len(self.pending) - self.at)
        b[:n] = memoryview(self.pending)[self.at:self.at + n]
        self.at += n
        return n


class _Header(tarfile.TarInfo):
    """A tar header that remembers, on its :class:`tarfile.TarFile`, why reading the next one failed.

    :mod:`tarfile` ends the member loop quietly at an invalid header after the
    first (a bad checksum, junk where a header belongs), exactly as it ends at
    the end-of-archive block: this tells the two apart, so a tar that breaks
    half-way gives a row that says so.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            tar.broken_header = str(e) or type(e).__name__  # type: ignore[attr-defined]
            raise


def _tar_stream(raw: BinaryIO) -> tuple[BinaryIO, str]:
    """``(file, tarfile mode)`` for a tar stream, gzip-compressed (every gzip member: :class:`_Gunzip`) or not."""
    buffered = io.BufferedReader(raw, 1 << 20)
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        return _Gunzip(buffered), "r|"
    return buffered, "r|*"


def iter_tar(stream: BinaryIO, *, extensions: Sequence[str], max_bytes: int,
             max_ratio: float = DEFAULT_MAX_RATIO, skip: Callable[[str], bool] = lambda key: False
             ) -> Iterator[Member | Damage]:
    """Image members of a tar (plain or gzip-compressed), read front to back from ``stream`` once.

    Memory is one member at a time. Members whose name lacks one of
    ``extensions`` are passed over, as are those ``skip(key)`` is true for
    (already scored: rows with a reason too); directories are ignored; links
    and devices named like images are rows with a reason.
    """
    counted, account = _Guarded(stream), _Accounting()
    try:
        fileobj, mode = _tar_stream(counted)
        tar = tarfile.open(fileobj=fileobj, mode=mode, tarinfo=_Header)
        for info in tar:
            tar.members = []  # streaming mode keeps every header otherwise: memory must not grow per member
            if info.isdir() or not _wanted(info.name, extensions):
                if info.isfile():
                    account.note_other(info.name)
                continue
            if tar.offset > max_ratio * max(counted.count, 1 << 20):
                yield Damage(f"compression ratio over {max_ratio:g}:1 (a decompression bomb?)")
                return
            key = account.key(info.name)
            if skip(key):
                continue
            if reason := unsafe_name(info.name):
                yield Member(info.name, info.size, error=reason, key=key)
            elif not info.isfile():
                yield Member(info.name, None, error="unsupported member: link or device", key=key)
            elif info.size > max_bytes:
                yield Member(info.name, info.size, error=too_large_bytes(info.size, max_bytes), key=key)
            else:
                f = tar.extractfile(info)
                yield Member(info.name, info.size, data=f.read() if f else b"", key=key)
        # tarfile ends quietly when the stream does, even part-way through a header: a complete
        # archive ends with a whole block of zeros after its last member, so that block was read.
        if getattr(tar.fileobj, "pos", tar.offset + tarfile.BLOCKSIZE) < tar.offset + tarfile.BLOCKSIZE:
            yield Damage("truncated archive")
        elif broken := getattr(tar, "broken_header", None):  # the members after it cannot be reached
            yield Damage(f"corrupt archive: tar header at byte {tar.offset}: {broken}"[:200])
        elif empty := account.empty():
            yield empty
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


UNICODE_PATH_EXTRA = 0x7075  # Info-ZIP Unicode Path extra field
#: Zip compression methods (APPNOTE 4.4.5) that :mod:`zipfile` cannot expand, by the name a row's reason gives.
ZIP_METHODS = {1: "Shrink", 2: "Reduce", 3: "Reduce", 4: "Reduce", 5: "Reduce", 6: "Implode", 9: "Deflate64",
               10: "PKWARE DCL Implode", 18: "IBM TERSE", 19: "IBM LZ77", 20: "zstd", 93: "zstd", 94: "MP3",
               95: "xz", 96: "JPEG variant", 97: "WavPack", 98: "PPMd", 99: "AES encryption"}
UTF8_FLAG = 0x800


_EXPANDABLE = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA,
                         getattr(zipfile, "ZIP_ZSTANDARD", zipfile.ZIP_STORED)})  # Python 3.14 reads zstd


def zip_name(info: zipfile.ZipInfo) -> str:
    """A zip entry's name as written: the Info-ZIP Unicode path field when present and current (its CRC matches
    the header's name), else the header name as UTF-8 when it is valid UTF-8 (Info-ZIP on Linux writes UTF-8
    without setting the flag), else CP437 (as :mod:`zipfile` reads it)."""
    raw = info.orig_filename.encode("utf-8" if info.flag_bits & UTF8_FLAG else "cp437")
    extra, i = info.extra or b"", 0
    while i + 4 <= len(extra):
        tag, size = int.from_bytes(extra[i:i + 2], "little"), int.from_bytes(extra[i + 2:i + 4], "little")
        body = extra[i + 4:i + 4 + size]
        if tag == UNICODE_PATH_EXTRA and len(body) > 5 and body[0] == 1 \
                and int.from_bytes(body[1:5], "little") == zlib.crc32(raw):
            try:
                return body[5:].decode("utf-8").split("\0", 1)[0]
            except UnicodeDecodeError:
                break
        i += 4 + size
    if not info.flag_bits & UTF8_FLAG:
        try:
            return raw.decode("utf-8").split("\0", 1)[0]
        except UnicodeDecodeError:
            pass
    return info.filename


def _zip_open(fileobj: BinaryIO) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The zip and its central directory, names re-read by :func:`zip_name`.

    Only ``filename`` changes (Python 3.10 has no ``metadata_encoding``);
    ``orig_filename`` stays, as :meth:`zipfile.ZipFile.open` checks it
    against the local header.
    """
    archive = zipfile.ZipFile(io.BufferedReader(_Guarded(fileobj), 1 << 16))
    infos = archive.infolist()
    for info in infos:
        info.filename = zip_name(info)
    return archive, infos


def zip_index(fileobj: BinaryIO) -> list[zipfile.ZipInfo]:
    """Every entry of a zip's central directory, in order; raises :class:`Damage`-worthy errors as ``ValueError``."""
    try:
        return _zip_open(fileobj)[1]
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise ValueError(_zip_damage(e)) from e


def _zip_damage(e: BaseException) -> str:
    if isinstance(e, zipfile.BadZipFile) and "not a zip file" in str(e).lower():
        return "corrupt archive: no zip central directory (truncated?)"
    return _damage(e)


def iter_zip(fileobj: BinaryIO, *, extensions: Sequence[str], max_bytes: int,
             max_ratio: float = DEFAULT_MAX_RATIO, first: int = 0, count: int | None = None,
             skip: Callable[[str], bool] = lambda key: False) -> Iterator[Member | Damage]:
    """Image members ``first`` .. ``first + count`` of a zip (central-directory order), by random access.

    ``fileobj`` must be seekable (a ranged reader on object storage). Each
    member's declared sizes are checked before it is expanded, and its expanded
    bytes are capped at ``max_bytes`` whatever the header claims. Keys follow
    the whole directory, whatever the range; the range starting at 0 gives the
    archive's row when the whole archive holds no image member.
    """
    try:
        archive, every = _zip_open(fileobj)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        yield Damage(_zip_damage(e))
        return
    account, infos = _Accounting(), []
    end = len(every) if count is None else first + count
    for index, info in enumerate(every):
        if info.is_dir():
            continue
        if not _wanted(info.filename, extensions):
            account.note_other(info.filename)
            continue
        key = account.key(info.filename)
        if first <= index < end:
            infos.append((info, key))
    if first == 0 and (empty := account.empty()):
        yield empty
    for info, key in infos:
        name, size = info.filename, info.file_size
        if skip(key):
            continue
        if reason := unsafe_name(name):
            yield Member(name, size, error=reason, key=key)
        elif info.flag_bits & 0x1:
            yield Member(name, size, error="encrypted member", key=key)
        elif info.compress_type not in _EXPANDABLE:
            method = ZIP_METHODS.get(info.compress_type, f"method {info.compress_type}")
            yield Member(name, size, error=f"unsupported compression: {method}", key=key)
        elif size > max_bytes:
            yield Member(name, size, error=too_large_bytes(size, max_bytes), key=key)
        elif info.compress_size and size > max_ratio * info.compress_size:
            yield Member(name, size, error=f"compression ratio over {max_ratio:g}:1 (a decompression bomb?)",
                         key=key)
        else:
            try:
                with archive.open(info) as f:
                    data = f.read(max_bytes + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
                yield Member(name, size, key=key,
                             error=f"corrupt member: {str(e).splitlines()[0] if str(e) else type(e).__name__}"[:200])
                continue
            except OSError as e:  # the storage under the archive failed: the rest is unreachable too
                yield Damage(_damage(e))
                return
            if len(data) > max_bytes:  # the header lied about the size
                yield Member(name, size, error=f"too large: over {max_bytes} bytes when expanded", key=key)
            else:
                yield Member(name, size, data=data, key=key)
