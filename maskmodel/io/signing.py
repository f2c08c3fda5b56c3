"""Presigned URLs for objects on S3, and when the credentials that sign them end.

A presigned URL carries a signature (and, with temporary credentials, the
session token): it is a credential in itself, so callers write it only where
the user asked for it and never log it. It stops working at the earlier of its
own expiry and the end of the temporary credentials that signed it, which is
why :func:`credentials_end` exists.
"""

from __future__ import annotations

import datetime as dt
import logging

from maskmodel.errors import UserError
from maskmodel.io import storage

log = logging.getLogger(__name__)

#: S3's limit for a SigV4 presigned URL: seven days.
MAX_SECONDS = 7 * 24 * 3600


def presign(uri: str, seconds: int) -> str:
    """An HTTP(S) URL that fetches the ``s3://`` object ``uri`` for ``seconds`` (1 .. 7 days) without credentials.

    Signed locally with the credentials the environment provides (no request is
    made). Raises :class:`UserError` for another scheme or an out-of-range expiry.
    """
    if storage.split_uri(uri)[0] != "s3":
        raise UserError(f"Only s3:// objects can be presigned, not {uri!r}; leave out --presign for other storage.")
    if not 1 <= seconds <= MAX_SECONDS:
        raise UserError(f"A presigned URL lasts 1 to {MAX_SECONDS} seconds (7 days), not {seconds}.")
    fs, path = storage.filesystem(uri)
    with storage.storage_errors(uri, "presign"):
        return fs.sign(path, expiration=seconds)


def credentials_end() -> tuple[bool, dt.datetime | None]:
    """``(temporary, end)`` of the credentials the default AWS chain gives this process.

    ``temporary``: they carry a session token (STS, SSO, an instance role);
    ``end``: when they expire, if the chain says (``AWS_CREDENTIAL_EXPIRATION``,
    a role's refreshable credentials), else ``None``. ``(False, None)`` when
    there are no credentials or they are long-lived keys.
    """
    import botocore.session

    creds = botocore.session.get_session().get_credentials()
    if creds is None:
        return False, None
    expiry = getattr(creds, "_expiry_time", None)  # set on botocore's RefreshableCredentials only
    frozen = creds.get_frozen_credentials()
    temporary = bool(frozen.token) or expiry is not None
    if isinstance(expiry, dt.datetime) and expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=dt.timezone.utc)
    return temporary, expiry


def expiry_warning(seconds: int, *, now: dt.datetime | None = None) -> str | None:
    """A sentence when URLs presigned now for ``seconds`` would stop working earlier (temporary credentials
    ending before then, or of unknown end); ``None`` otherwise. Names no key, token or URL."""
    temporary, end = credentials_end()
    if not temporary:
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    wanted = now + dt.timedelta(seconds=seconds)
    if end is None:
        return (f"The presigned URLs are signed with temporary credentials whose end is unknown; they stop working "
                f"when those credentials end, which may be before {wanted:%Y-%m-%d %H:%M} UTC.")
    if end < wanted:
        return (f"The presigned URLs stop working at {end:%Y-%m-%d %H:%M} UTC, when the temporary credentials that "
                f"signed them end, not at {wanted:%Y-%m-%d %H:%M} UTC; sign with longer-lived credentials or ask "
                f"for a shorter --presign.")
    return None
