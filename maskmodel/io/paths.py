"""The one rule that turns an entry of a manifest or an annotation file into the URI of an object.

Training (:mod:`maskmodel.data.discovery`), scoring (:mod:`maskmodel.score.scoring`,
:mod:`maskmodel.score.pipeline`) and annotation files (:mod:`maskmodel.data.annotations`) all resolve
their entries here, so the same row names the same object everywhere. The rule:

- Surrounding whitespace (spaces, tabs, a CSV's stray ``\\r``) is not part of an entry.
- ``file:`` URIs are local paths as RFC 8089 writes them: ``file:///a/my%20photo.jpg`` (what
  :meth:`pathlib.Path.as_uri` writes), ``file://localhost/a/b.jpg`` and ``file:/a/b.jpg`` are
  ``/a/my photo.jpg`` and ``/a/b.jpg``; percent escapes are decoded as UTF-8 (``caf%C3%A9`` is
  ``café``, ``100%25`` is ``100%``). A ``file://`` URI naming another host is kept as written (it
  names no local object: its row says it cannot be read).
- Other URIs (``s3://``, ``gs://``, ``memory://``) are kept as written, percent signs included: an
  object key may hold them.
- An absolute path (``/data/x.jpg``) is a path on the manifest's own filesystem: a local path for a
  local manifest, ``s3://<bucket>/data/x.jpg`` for one in that bucket (RFC 3986's reference
  resolution).
- Anything else is relative to the folder that holds the manifest (or annotation file); ``.`` and
  ``..`` parts are resolved, so two spellings of one object give one URI.

The result is in the form a prefix listing gives (:func:`maskmodel.io.storage.to_uri`): a plain absolute
path for a local object, ``s3://bucket/key`` and the like otherwise.
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import unquote, urlsplit

from maskmodel.io import storage


def entry_folder(uri: str) -> str:
    """The folder a manifest's (or annotation file's) relative entries are under: the file's own.

    ``uri``: the manifest's URI or local path; ``""`` stands for the working directory.
    Returns a plain absolute path for a local file, else ``scheme://bucket/folder``.
    """
    if not uri:
        return os.getcwd()
    if "://" in uri and storage.split_uri(uri)[0] != "file":
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(storage.split_uri(uri)[1])


def file_uri_path(entry: str) -> str | None:
    """The local path of an RFC 8089 ``file:`` URI (percent-decoded, UTF-8), or ``None`` when ``entry`` is not one
    or names another host than this one (``localhost`` or empty)."""
    if entry[:5].lower() != "file:":
        return None
    parts = urlsplit(entry)
    if parts.netloc.lower() not in ("", "localhost"):
        return None
    path = unquote(parts.path, encoding="utf-8", errors="surrogateescape")
    return path if path.startswith("/") else None


def resolve_entry(folder: str, entry: str) -> str:
    """The URI of the object that ``entry`` (one manifest or annotation row) names, read under ``folder``.

    ``folder``: as :func:`entry_folder` gives it (a local path or a URI). The rule is the module's; the
    result is in a listing's form. Pure string work: nothing is read or checked for existence.
    """
    entry = entry.strip()
    local = file_uri_path(entry)
    if local is not None:
        return posixpath.normpath(local)
    if "://" in entry:
        if entry[:7].lower() == "file://":  # another host: kept as written, no local object has this name
            return entry
        return storage.to_uri(entry, storage.filesystem(entry)[1])
    remote = "://" in folder and storage.split_uri(folder)[0] != "file"
    if not remote:
        base = storage.split_uri(folder)[1] if folder else os.getcwd()
        return posixpath.normpath(posixpath.join(base, entry))
    scheme, rest = folder.split("://", 1)
    bucket, _, prefix = rest.partition("/")
    key = posixpath.normpath(posixpath.join("/" + prefix, entry)).lstrip("/")
    uri = f"{scheme}://{bucket}/{key}"
    return storage.to_uri(uri, storage.filesystem(uri)[1])
