"""Which objects are archives, and how a member of one is named: ``<archive URI>#<member key>``.

The key is the member's path in its archive, except for a name that occurs more than once (tar allows
it): the k-th member of that name, k >= 2, is ``<name>#k`` (:func:`member_key`, the one identity rule of
tar and zip). Pure string functions; no I/O.
"""

from __future__ import annotations

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


def member_key(name: str, occurrence: int) -> str:
    """A member's identity in its archive: ``name``, or ``name#k`` for the ``occurrence``-th (k >= 2) of that name.

    A streamed tar cannot look ahead, so the first of a name keeps it and the
    later ones are numbered in archive order: a name that occurs once keeps
    its key. ``#k`` cannot end a wanted member's own name (those end in an
    image extension), so keys never collide.
    """
    return name if occurrence <= 1 else f"{name}{SEPARATOR}{occurrence}"


def split_member_uri(path: str) -> tuple[str, str | None]:
    """``(archive, member key)`` of a member's path; ``(path, None)`` for a loose object.

    The archive part ends at the first ``#`` that follows an archive suffix,
    so ``#`` elsewhere in a key or inside a member name does not confuse it.
    """
    low, start = path.lower(), 0
    while (i := path.find(SEPARATOR, start)) != -1:
        if low[:i].endswith(TAR_SUFFIXES + ZIP_SUFFIXES):
            return path[:i], path[i + 1:]
        start = i + 1
    return path, None
