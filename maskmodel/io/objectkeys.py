"""The identity of a scored object as a 64-bit key: ``(path, version)`` hashed, and set membership over sorted keys.

Pure numpy, no Ray, no results table: the load step skips objects whose key a
caller passed in (:func:`contains`), and :mod:`maskmodel.results.incremental` builds
those keys from the committed rows (:func:`object_keys`).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def object_keys(paths: Sequence[str | None], versions: Sequence[str | None]) -> np.ndarray:
    """64-bit keys (``uint64 (N,)``) of ``(path, version)`` pairs, as used by :func:`maskmodel.results.incremental.committed_keys`.

    The key is the little-endian 8-byte BLAKE2b digest of ``path NUL version``.
    """
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(f"{p}\0{v or ''}".encode(), digest_size=8).digest()
                        for p, v in zip(paths, versions)])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Boolean mask ``(len(keys),)``: which ``keys`` are in ``sorted_keys`` (sorted ``uint64``, e.g. from committed_keys)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    idx = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[idx] == keys
