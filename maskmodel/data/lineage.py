"""Which labels a model learnt from: each annotation set's URI and a hash of its content, for the model's card.

A row of the results table names its model (``model_id``); the model's card
(``model.json``, ``detector.json``) names, in ``annotation_sets``, the label
files it was trained on, so that a verdict leads back to the labels behind
it, and a relabelled set is told apart from the one a model saw.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

from maskmodel.io import storage

#: Files that hold labels: COCO / Label Studio JSON, Pascal VOC XML, YOLO txt, manifests.
LABEL_EXTENSIONS = ("json", "xml", "txt", "csv", "parquet")


def content_hash(uri: str, *, workers: int = 16) -> str:
    """``sha256:<hex>`` of a label file's bytes; of a folder, of each label file's relative path and sha256
    (sorted), so renaming or editing any one changes it. Raises :class:`UserError` when ``uri`` is missing."""
    if not _is_dir(uri):
        return "sha256:" + hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    files = storage.list_files(uri, extensions=LABEL_EXTENSIONS)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        digests = list(pool.map(lambda f: hashlib.sha256(storage.read_bytes(f.uri)).hexdigest(), files))
    root = uri.rstrip("/") + "/"
    h = hashlib.sha256()
    for f, d in zip(files, digests):
        h.update(f"{f.uri[len(root):] if f.uri.startswith(root) else f.uri}\t{d}\n".encode())
    return "sha256:" + h.hexdigest()


def _is_dir(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return fs.isdir(path)


def annotation_sets(uris: Iterable[str]) -> list[dict[str, str]]:
    """``[{"uri", "sha256"}]`` of each distinct non-empty URI, in order (a model card's ``annotation_sets``)."""
    return [{"uri": u, "sha256": content_hash(u)} for u in dict.fromkeys(u for u in uris if u)]


def label_files(uris: Iterable[str]) -> list[dict[str, str]]:
    """:func:`annotation_sets` of those ``uris`` that are files (an annotation file or a manifest); a folder
    (an ImageFolder tree, whose labels are its folder names) is left out rather than hashed image by image."""
    return annotation_sets(u for u in uris if u and not _is_dir(u))
