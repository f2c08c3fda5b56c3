"""Finding labelled training images and streaming them through Ray Data.

Two layouts are accepted (DESIGN.md): an ImageFolder tree
``<root>/<split>/<class>/<image>`` (splits ``train``, ``val``/``validation``,
optional ``test`` and any others such as ``scene``, in any case), or a
manifest (CSV or Parquet with ``path,label[,split]``; entries resolved by the one
rule of :mod:`maskmodel.io.paths`: relative to the manifest's folder, ``file://`` URIs
percent-decoded). Without a validation split, a deterministic split
by hash of the path is used. :func:`discover` is plain Python and runs on the
driver, so every problem with the data is reported before a worker starts.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from maskmodel.runtime import testhooks
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.io.paths import entry_folder, resolve_entry
from maskmodel.io.decode import IMAGE_EXTENSIONS, DecodeError, decode, too_large_bytes

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "validation": "val", "valid": "val",
                 "test": "test", "testing": "test"}
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
MAX_TRAINING_IMAGE_BYTES = 256 << 20  # a training image larger than this is not a photo of a face


@dataclass(frozen=True)
class LabelledImage:
    uri: str
    label: int
    split: str


@dataclass(frozen=True)
class TrainingData:
    """Every labelled image found, by split, with the class names in label order."""

    source: str
    classes: tuple[str, ...]
    splits: dict[str, list[LabelledImage]]
    total_bytes: int
    val_from_hash: bool = False
    #: Files of the tree left out for their extension, by extension (lower case, "" for none): e.g. {"txt": 2}.
    skipped_by_extension: dict[str, int] = field(default_factory=dict)

    def skipped_line(self) -> str:
        """``"3 file(s) skipped by extension (txt 2, gif 1)"``, or ``""`` when none was."""
        if not self.skipped_by_extension:
            return ""
        kinds = ", ".join(f"{e or 'no extension'} {n}" for e, n in sorted(self.skipped_by_extension.items(),
                                                                            key=lambda kv: (-kv[1], kv[0])))
        return f"{sum(self.skipped_by_extension.values())} file(s) skipped by extension ({kinds})"

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for split, items in self.splits.items():
            c = {name: 0 for name in self.classes}
            for it in items:
                c[self.classes[it.label]] += 1
            out[split] = c
        return out


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) for ``key``: the deterministic train/val split."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def _canonical_split(name: str) -> str:
    return SPLIT_ALIASES.get(name.lower(), name.lower())


def _read_manifest(uri: str) -> list[tuple[str, str, str | None]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    try:
        if uri.lower().endswith(".csv"):
            table = pacsv.read_csv(io.BytesIO(data))
        else:
            table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(f"Cannot read the manifest {uri!r} ({type(e).__name__}); it must be CSV or Parquet "
                        f"with columns path,label[,split].") from e
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise UserError(f"The manifest {uri!r} lacks column(s) {sorted(missing)}; it needs path,label[,split].")
    base = entry_folder(uri)
    paths = [str(p) for p in table.column("path").to_pylist()]
    labels = [str(v) for v in table.column("label").to_pylist()]
    splits = table.column("split").to_pylist() if "split" in table.column_names else [None] * len(paths)
    rows = []
    for p, lab, sp in zip(paths, labels, splits):
        rows.append((resolve_entry(base, p), lab, str(sp) if sp else None))
    return rows


def _read_tree(uri: str, extensions: tuple[str, ...]) -> tuple[list[tuple[str, str, str | None]], int, dict[str, int]]:
    """``(rows, bytes, skipped by extension)`` of an ImageFolder tree; one listing, filtered here."""
    exts = tuple(f".{e.lower().lstrip('.')}" for e in extensions)
    objects, skipped = [], Counter()
    for obj in storage.list_files(uri):
        if obj.uri.lower().endswith(exts):
            objects.append(obj)
        else:
            name = posixpath.basename(obj.uri)
            skipped[name.rsplit(".", 1)[1].lower() if "." in name else ""] += 1
    _, root = storage.filesystem(uri)
    rows, total = [], 0
    for obj in objects:
        _, path = storage.filesystem(obj.uri)
        parts = posixpath.relpath(path, root).split("/")
        if len(parts) >= 3 and _canonical_split(parts[0]) in set(SPLIT_ALIASES.values()) | {parts[0].lower()}:
            rows.append((obj.uri, parts[1], _canonical_split(parts[0])))
        elif len(parts) == 2:  # <root>/<class>/<image>: no splits, hash-split below
            rows.append((obj.uri, parts[0], None))
        else:
            continue
        total += obj.size
    # A tree either has split folders or class folders at the top, not both.
    if any(r[2] is not None for r in rows):
        rows = [r for r in rows if r[2] is not None]
    return rows, total, dict(skipped)


def _rows(uri: str, extensions: tuple[str, ...]) -> tuple[list[tuple[str, str, str | None]], int, dict[str, int]]:
    """``(path, label, split)`` rows of a manifest or tree, their bytes (trees only) and the files skipped by
    extension (trees only)."""
    if uri.lower().endswith(MANIFEST_SUFFIXES):
        return _read_manifest(uri), 0, {}
    return _read_tree(uri, extensions)


def discover(uri: str, *, val_fraction: float = 0.2,
             extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> TrainingData:
    """Find the labelled images under ``uri`` (a tree or a manifest file).

    Raises :class:`UserError` when the URI does not exist, holds no images, has
    no ``train`` split, fewer than two classes, an empty class, or validation
    classes that training does not have.
    """
    rows, total, skipped = _rows(uri, extensions)
    if not rows:
        left_out = f" ({sum(skipped.values())} other file(s) left out by extension)" if skipped else ""
        raise UserError(f"No images found under {uri!r}{left_out}; expected <root>/train/<class>/<image> folders "
                        f"(extensions {', '.join(extensions)}) or a CSV/Parquet manifest.")
    val_from_hash = not any(sp == "val" for _, _, sp in rows)
    assigned = []
    for path, label, split in rows:
        if split is None or (val_from_hash and split == "train"):
            split = "val" if hash_fraction(path) < val_fraction else "train"
        assigned.append((path, label, split))
    train_labels = sorted({lab for _, lab, sp in assigned if sp == "train"})
    if not train_labels:
        where = ("give rows split 'train' (or no split)" if uri.lower().endswith(MANIFEST_SUFFIXES)
                 else f"put them under {uri.rstrip('/')}/train/<class>/")
        raise UserError(f"{uri!r} has no training images; {where}.")
    if len(train_labels) < 2:
        raise UserError(f"{uri!r} has a single class ({train_labels[0]!r}) in its training split; "
                        f"a classifier needs at least two class folders, e.g. mask/ and no_mask/.")
    classes = tuple(train_labels)
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[LabelledImage]] = {}
    for path, label, split in assigned:
        if label not in index:
            raise UserError(f"Split {split!r} of {uri!r} has class {label!r}, which the training split lacks; "
                            f"training classes are {list(classes)}.")
        splits.setdefault(split, []).append(LabelledImage(path, index[label], split))
    if not splits.get("val"):
        raise UserError(f"{uri!r} has no validation images; add a val/ split or more training images.")
    data = TrainingData(source=uri, classes=classes, splits=splits, total_bytes=total, val_from_hash=val_from_hash,
                        skipped_by_extension=skipped)
    empty = [f"{s}/{c}" for s, c_counts in data.counts().items() if s in ("train",)
             for c, n in c_counts.items() if n == 0]
    if empty:
        raise UserError(f"Class folder(s) {empty} of {uri!r} hold no images; every class needs training images.")
    return data


def discover_splits(uri: str, splits: Sequence[str], *, val_fraction: float = 0.2,
                    extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> TrainingData:
    """The labelled images of ``splits`` (canonical names) under ``uri``, a tree or a manifest, for evaluation.

    Unlike :func:`discover`, no training split is needed: a manifest that holds only the photos to evaluate
    is enough. An image without a split (a manifest without a ``split`` column, a tree of class folders) is
    in the one asked split when a single split other than ``train``/``val`` is asked; otherwise it takes the
    hash split :func:`discover` gives it, so ``--split val`` is the validation set training held out. The
    classes are the labels of the asked splits, sorted. Raises :class:`UserError` when the URI does not exist,
    holds no images, or has none in an asked split.
    """
    rows, total, skipped = _rows(uri, extensions)
    if not rows:
        raise UserError(f"No images found under {uri!r}; expected <root>/<split>/<class>/<image> folders "
                        f"(extensions {', '.join(extensions)}) or a CSV/Parquet manifest path,label[,split].")
    asked = list(dict.fromkeys(splits))
    unsplit_is_asked = len(asked) == 1 and asked[0] not in ("train", "val")
    val_from_hash = not any(sp and _canonical_split(sp) == "val" for _, _, sp in rows)
    chosen: dict[str, list[tuple[str, str]]] = {}
    present: set[str] = set()
    for path, label, split in rows:
        split = _canonical_split(split) if split else None
        if split is None and unsplit_is_asked:
            split = asked[0]
        elif split is None or (val_from_hash and split == "train"):
            split = "val" if hash_fraction(path) < val_fraction else "train"
        present.add(split)
        if split in asked:
            chosen.setdefault(split, []).append((path, label))
    missing = [s for s in asked if not chosen.get(s)]
    if missing:
        hint = ("; an image without a split is read as the asked split when you ask for one split other than "
                "train or val" if any(sp is None for _, _, sp in rows) else "")
        raise UserError(f"{uri!r} has no labelled images in split {missing[0]!r} (it has: "
                        f"{', '.join(sorted(present))}); pass --split with one of those{hint}.")
    classes = tuple(sorted({label for items in chosen.values() for _, label in items}))
    index = {c: i for i, c in enumerate(classes)}
    return TrainingData(source=uri, classes=classes, total_bytes=total, val_from_hash=val_from_hash,
                        splits={s: [LabelledImage(p, index[lab], s) for p, lab in chosen[s]] for s in asked},
                        skipped_by_extension=skipped)


# --- per-batch functions run by Ray Data (plain callables, testable without Ray) ---

def fetch_and_check(batch: dict[str, np.ndarray], *, concurrency: int = 32, check: bool = True
                    ) -> dict[str, np.ndarray]:
    """Read each ``uri``'s bytes and (with ``check``) that they decode; adds ``data`` and ``error`` ('' when fine).

    Reads are concurrent (one GET each, ``concurrency`` in flight), because object
    stores reward concurrency and punish round trips. The check decodes at the
    smallest JPEG scale: every byte of the image is still read, so a truncated
    or corrupt file is still caught, at a fraction of a full decode's cost.
    """
    from maskmodel.io.fetch import read_error_reason, read_many

    if not check:  # an epoch's read; test-only pause point fetch-<name>: hold one object back
        for u in batch["uri"]:
            testhooks.pause(f"fetch-{posixpath.basename(str(u))}")
    got = read_many([str(u) for u in batch["uri"]], max_bytes=MAX_TRAINING_IMAGE_BYTES, concurrency=concurrency)
    datas, errors = [], []
    for g in got:
        data, error = g.data or b"", ""
        if g.error is not None:
            error = read_error_reason(g.error)
        elif g.data is None:
            error = too_large_bytes(int(g.size or 0), MAX_TRAINING_IMAGE_BYTES)
        elif check:
            try:
                decode(g.data, reduce_to=1)
            except DecodeError as e:
                error = str(e)
        datas.append(b"" if error else data)
        errors.append(error)
    out = dict(batch)
    out["data"] = np.array(datas, dtype=object)
    out["error"] = np.array(errors, dtype=object)
    return out


#: The label of a row an epoch could not read or decode: kept in place (Ray Train splits the training
#: rows equally, so every worker takes the same steps), left out of loss, accuracy and counts by the loop.
SKIPPED_LABEL = -1


class DecodeCrop:
    """Ray Data callable: ``data`` bytes → ``image`` ``uint8 (N, 3, S, S)`` via ``crop``, keeping ``label``.

    Decodes with :func:`maskmodel.data.transforms.preprocess_image` (the scoring path's
    decode and crop): JPEGs at the reduced size that still covers ``reduce_to``
    pixels on the short side; ``crop`` is a :class:`~maskmodel.data.transforms.TrainCrop`
    or :class:`~maskmodel.data.transforms.EvalCrop`. A row whose ``error`` is set
    (the epoch's read failed) or whose bytes no longer decode (the object was
    replaced after the check pass) gets label :data:`SKIPPED_LABEL`, with the
    reason in the worker's log, the check pass's reasons; its image is a copy
    of another row of the batch (zeros when none is left), so batch-norm
    statistics see a real picture. The training loop counts these rows
    (``skipped_*`` in ``metrics.csv``). What leaves this step, through Ray's
    object store, is uint8: a quarter of float32.
    """

    def __init__(self, crop: Callable[[Any], Any], *, reduce_to: int) -> None:
        self.crop, self.reduce_to = crop, reduce_to

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from maskmodel.data.transforms import preprocess_image

        n = len(batch["data"])
        errors = [str(e) if e else "" for e in batch.get("error", [""] * n)]
        images: list[np.ndarray | None] = [None] * n
        for i in range(n):
            if errors[i]:
                continue
            try:
                images[i] = preprocess_image(batch["data"][i], self.crop, reduce_to=self.reduce_to)[0]
            except DecodeError as e:
                errors[i] = str(e)
            except Exception as e:  # noqa: BLE001 - one odd file must never stop an epoch
                errors[i] = f"undecodable: {type(e).__name__}"
        bad = [i for i, e in enumerate(errors) if e]
        if bad:  # the check pass found these readable: a store error or a changed object
            uris = batch.get("uri", ["?"] * n)
            log.warning("%d image(s) of this batch could not be read or decoded and are left out of this epoch "
                        "(%s)", len(bad), "; ".join(f"{uris[i]}: {errors[i]}" for i in bad[:3]))
        size = self.crop.crop_size
        stand_in = next((im for im in images if im is not None), np.zeros((3, size, size), np.uint8))
        labels = np.asarray(batch["label"], dtype=np.int64).copy()
        labels[bad] = SKIPPED_LABEL
        return {"image": np.stack([stand_in if im is None else im for im in images]) if n
                else np.zeros((0, 3, size, size), np.uint8), "label": labels}
