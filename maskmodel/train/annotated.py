"""Training the classifier from annotated photos: boxes with a class per face (COCO, VOC, YOLO) in, face crops out.

The driver reads the annotations (:func:`maskmodel.data.annotations.read_annotations`,
the product's one reader per format), renames or drops classes by ``--class-map``,
splits by photo (a COCO image's own ``split`` field where it has one, else by
hash of the photo's path, so the faces of one photo are never on both sides),
and counts faces per class and split, leaving out those under the face stage's
minimum size. Then one Ray Data pass per split reads each photo once, decodes it
as scoring does and cuts all its faces with :mod:`maskmodel.data.facecrop` (one
row per face, uint8); the crops are materialised once per job. Each epoch, a
training face gets :class:`~maskmodel.data.transforms.TrainCrop` (random resized
crop and flip) from a square crop a little larger than the input; a
validation face is exactly the crop scoring gives the classifier
(:class:`~maskmodel.data.transforms.EvalCrop` of the cut).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from maskmodel.errors import UserError

log = logging.getLogger(__name__)

#: The label of a row for a photo that could not be read or decoded (no face cut from it).
UNREADABLE = -1


def parse_class_map(text: str) -> dict[str, str | None]:
    """``"with_mask=mask,mask_weared_incorrect=-"`` -> ``{"with_mask": "mask", "mask_weared_incorrect": None}``
    (``name=`` or ``name=-`` drops a class). Raises :class:`UserError` on an entry without ``=``."""
    out: dict[str, str | None] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        if "=" not in entry:
            raise UserError(f"--class-map entry {entry!r} has no '='; write file_class=name (name '-' or empty "
                            f"drops the class), e.g. with_mask=mask,without_mask=no_mask.")
        k, v = (p.strip() for p in entry.split("=", 1))
        out[k] = None if v in ("", "-") else v
    return out


class _Renaming(dict):
    """A class map that keeps every class it does not name (the readers drop unnamed classes otherwise)."""

    def get(self, key, default=None):  # noqa: D401 - dict's signature
        return dict.get(self, key) if key in self else key


@dataclass(frozen=True)
class AnnotatedData:
    """Photos with their faces, by split; ``classes`` sorted; ``summary``: the counts printed and kept."""

    source: str
    classes: tuple[str, ...]
    splits: dict[str, list[dict[str, Any]]]  # {uri, boxes: K*4 floats x0 y0 x1 y1 original pixels, labels: K ints}
    summary: dict[str, Any] = field(default_factory=dict)


def _split_of(extra: Mapping[str, Any], uri: str, val_fraction: float, by_hash: bool) -> str:
    """A photo's split: its own ``split`` field (COCO images may carry one), else (or for ``train`` when no photo
    is marked ``val``: ``by_hash``) ``val`` for ``val_fraction`` of the photos by hash of the path."""
    from maskmodel.data.discovery import SPLIT_ALIASES, hash_fraction

    given = str(extra.get("split") or "").strip().lower()
    given = SPLIT_ALIASES.get(given, given)
    if given and not (by_hash and given == "train"):
        return given
    return "val" if hash_fraction(uri) < val_fraction else "train"


def load_annotated(uri: str, *, class_map: str = "", images_root: str = "", val_fraction: float = 0.2,
                   min_face: float) -> AnnotatedData:
    """Read, rename, split and count the annotated photos at ``uri`` (COCO file, VOC or YOLO folder).

    Raises :class:`UserError` when no photo is found, fewer than two classes
    have faces big enough in the training split, or a split named ``val`` is
    missing and cannot be made.
    """
    from maskmodel.data.annotations import check_found, read_annotations
    from maskmodel.data.facecrop import big_enough

    records = read_annotations(uri, class_map=_Renaming(parse_class_map(class_map)), images_root=images_root or None)
    check_found(records, source=uri)  # none found: one sentence; some: counted as unreadable by the data step
    classes = tuple(sorted({lab for r in records for lab in r.labels}))
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[dict[str, Any]]] = {}
    faces: dict[str, Counter] = {}
    small: Counter = Counter()
    dropped = sum(r.skipped for r in records)
    from maskmodel.data.discovery import SPLIT_ALIASES

    by_hash = not any(SPLIT_ALIASES.get(str(r.extra.get("split") or "").lower()) == "val" for r in records)
    for r in records:
        split = _split_of(r.extra, r.path, val_fraction, by_hash)
        keep = big_enough(r.boxes, min_face)
        small[split] += int((~keep).sum())
        labels = [index[lab] for lab, k in zip(r.labels, keep) if k]
        faces.setdefault(split, Counter()).update(classes[i] for i in labels)
        splits.setdefault(split, []).append({"uri": r.path, "boxes": r.boxes.reshape(-1).tolist(),
                                             "labels": [index[x] for x in r.labels]})
    trained = [c for c in classes if faces.get("train", {}).get(c)]
    if len(trained) < 2:
        raise UserError(f"{uri!r} has faces of {len(trained)} class(es) {trained} big enough (>= {min_face:g} px) in "
                        f"its training photos; a classifier needs at least two (classes found: {list(classes)}; "
                        f"--class-map renames or drops them).")
    if not any(faces.get("val", {}).values()):
        raise UserError(f"{uri!r} has no validation faces; add photos or raise --val-fraction.")
    summary = {"source": uri, "classes": list(classes),
               "photos": {s: len(rows) for s, rows in splits.items()},
               "faces": {s: {c: int(faces[s].get(c, 0)) for c in classes} for s in splits},
               "faces_too_small": dict(small), "min_face": min_face, "boxes_dropped_by_class_map": dropped}
    return AnnotatedData(source=uri, classes=classes, splits=splits, summary=summary)


def summary_line(summary: Mapping[str, Any]) -> str:
    """One log line: faces per split and class, photos, faces left out as too small, photos unreadable."""
    parts = []
    for split, counts in summary["faces"].items():
        per = ", ".join(f"{c} {n}" for c, n in counts.items())
        parts.append(f"{split}: {summary['photos'][split]} photos, {sum(counts.values())} faces ({per})")
    small = sum(summary["faces_too_small"].values())
    return (f"{'; '.join(parts)}; {small} face(s) under {summary['min_face']:g} px left out"
            + (f"; {summary['photos_unreadable']} photo(s) unreadable" if summary.get("photos_unreadable") else ""))


class CutFaces:
    """Ray Data callable: one row per photo (``uri``, ``data``, ``error``, ``boxes``, ``labels``) -> one row per face.

    Each photo is decoded once (:func:`maskmodel.data.facecrop.decode_photo`,
    scoring's decode) and all its faces at least ``min_face`` original pixels
    across are cut (:func:`maskmodel.data.facecrop.face_crops`) and given to
    ``crop``: ``image`` uint8 ``(N, 3, S, S)``, ``label`` int64. A photo that
    cannot be read or decoded becomes one row of label :data:`UNREADABLE`, its
    reason in ``error``, so the driver counts it.
    """

    def __init__(self, crop: Callable, *, crop_size: int, margin: float, min_face: float, max_pixels: int) -> None:
        self.crop, self.crop_size, self.margin, self.min_face, self.max_pixels = \
            crop, crop_size, margin, min_face, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from maskmodel.data.discovery import MAX_TRAINING_IMAGE_BYTES
        from maskmodel.data.facecrop import decode_photo, face_crops
        from maskmodel.io.decode import DecodeError

        images, labels, errors, uris = [], [], [], []
        for i in range(len(batch["uri"])):
            error = str(batch["error"][i] or "")
            if not error:
                try:
                    d = decode_photo(batch["data"][i], max_pixels=self.max_pixels,
                                     max_bytes=MAX_TRAINING_IMAGE_BYTES)
                    boxes = np.asarray(batch["boxes"][i], np.float32).reshape(-1, 4)
                    crops, kept = face_crops(np.asarray(d.image, np.uint8), boxes,
                                             (d.width, d.height), margin=self.margin, min_face=self.min_face,
                                             crop=self.crop, crop_size=self.crop_size)
                    images.extend(crops.numpy())
                    labels.extend(np.asarray(batch["labels"][i], np.int64)[kept].tolist())
                    errors.extend([""] * len(crops))
                    uris.extend([batch["uri"][i]] * len(crops))
                    continue
                except DecodeError as e:
                    error = str(e)
                except Exception as e:  # noqa: BLE001 - one odd file must never stop the job
                    error = f"undecodable: {type(e).__name__}"
            images.append(np.zeros((3, self.crop_size, self.crop_size), np.uint8))
            labels.append(UNREADABLE)
            errors.append(error)
            uris.append(batch["uri"][i])
        s = self.crop_size
        return {"image": np.stack(images) if images else np.zeros((0, 3, s, s), np.uint8),
                "label": np.asarray(labels, np.int64), "error": np.asarray(errors, object),
                "uri": np.asarray(uris, object)}


class ApplyCrop:
    """Ray Data callable, run each epoch: ``crop`` (a :class:`~maskmodel.data.transforms.TrainCrop`) on every
    stored face ``image`` uint8 ``(N, 3, D, D)`` -> ``(N, 3, S, S)``, ``label`` kept."""

    def __init__(self, crop: Callable, crop_size: int) -> None:
        self.crop, self.crop_size = crop, crop_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        out = [self.crop(torch.from_numpy(np.array(im))).numpy() for im in batch["image"]]  # a writable copy
        s = self.crop_size
        return {"image": np.stack(out) if out else np.zeros((0, 3, s, s), np.uint8),
                "label": np.asarray(batch["label"], np.int64)}


def face_split(rows: list[dict[str, Any]], *, name: str, cutter: CutFaces, max_unreadable: float,
               per_epoch: Callable | None, seed: int) -> tuple[Any, list[tuple[str, str]]]:
    """The faces of one split as a Ray Dataset (``image``, ``label``), cut once and kept in the object store.

    Returns the dataset (``per_epoch`` mapped over it lazily, so it runs every
    epoch) and the unreadable photos ``(uri, reason)``. Raises
    :class:`UserError` when more than ``max_unreadable`` of the photos are.
    """
    import random

    import ray
    from ray.data.expressions import col

    from maskmodel.data.discovery import fetch_and_check

    rows = list(rows)
    random.Random(seed).shuffle(rows)  # sorted listings group classes; spread them over blocks
    faces = (ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 16, 200)))
             .map_batches(fetch_and_check, batch_size=16, fn_kwargs={"check": False})
             .map_batches(cutter, batch_size=16)
             .materialize())
    bad_rows = faces.filter(expr=col("label") == UNREADABLE).select_columns(["uri", "error"]).take_all()
    bad = [(str(r["uri"]), str(r["error"])) for r in bad_rows]
    if bad:
        examples = "; ".join(f"{u} ({e})" for u, e in bad[:3])
        if len(bad) > max_unreadable * len(rows):
            raise UserError(f"{len(bad)} of {len(rows)} photos in the {name} split are unreadable (over the "
                            f"{max_unreadable:.0%} limit), e.g. {examples}; fix or remove them.")
        log.warning("%s split: skipping %d unreadable photo(s), e.g. %s", name, len(bad), examples)
    good = faces.filter(expr=col("label") != UNREADABLE).select_columns(["image", "label"]).materialize()
    if per_epoch is not None:
        good = good.randomize_block_order().map_batches(per_epoch, batch_size=32)
    return good, bad


def face_datasets(data: AnnotatedData, *, image_size: int, augment: bool, options, max_pixels: int,
                  max_unreadable: float, seed: int) -> tuple[dict[str, Any], dict[str, list[tuple[str, str]]]]:
    """The ``train`` and ``val`` face datasets of ``data`` (:func:`face_split`) and each split's unreadable photos.

    ``options``: the :class:`~maskmodel.models.spec.DetectOptions` whose margin and minimum face size scoring
    uses. Validation faces are scoring's crops (``EvalCrop(image_size)``); training faces are kept as a square
    of ``TrainCrop.decode_side`` (the same cut, resized larger) and get ``TrainCrop`` each epoch (``augment``).
    """
    from maskmodel.data.transforms import EvalCrop, TrainCrop

    evaluate = EvalCrop(crop_size=image_size)
    per_epoch, store, side = None, evaluate, image_size
    if augment:  # keep a square a little larger than the input; TrainCrop picks from it every epoch
        train_crop = TrainCrop(crop_size=image_size)
        side = train_crop.decode_side
        per_epoch, store = ApplyCrop(train_crop, image_size), EvalCrop(crop_size=side, resize_size=side)
    datasets, bad = {}, {}
    for split, crop, size, epoch_map in (("train", store, side, per_epoch), ("val", evaluate, image_size, None)):
        cutter = CutFaces(crop, crop_size=size, margin=options.margin, min_face=options.min_face,
                          max_pixels=max_pixels)
        datasets[split], bad[split] = face_split(data.splits.get(split, []), name=split, cutter=cutter,
                                                 max_unreadable=max_unreadable, per_epoch=epoch_map, seed=seed)
    return datasets, bad


def without_unreadable(data: AnnotatedData, bad: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """The data's summary with the faces of unreadable photos taken off and those photos counted."""
    from maskmodel.data.facecrop import big_enough

    summary = {**data.summary, "faces": {s: dict(c) for s, c in data.summary["faces"].items()}}
    for split, pairs in bad.items():
        gone = {u for u, _ in pairs}
        for row in data.splits.get(split, []):
            if row["uri"] in gone:
                kept = big_enough(np.asarray(row["boxes"], np.float32).reshape(-1, 4), summary["min_face"])
                for label, k in zip(row["labels"], kept):
                    summary["faces"][split][data.classes[label]] -= int(k)
    summary["photos_unreadable"] = {s: len(b) for s, b in bad.items() if b}
    return summary


def held_out_faces(config, crop, limit: int) -> list[np.ndarray]:
    """Up to ``limit`` held-out faces (test split, else val) of ``config``'s annotated photos (a
    :class:`~maskmodel.train.config.TrainConfig`), cut as scoring cuts them with ``crop``: uint8 ``(3, S, S)`` each."""
    from maskmodel.data.facecrop import decode_photo, face_crops
    from maskmodel.io.decode import DecodeError
    from maskmodel.models.spec import DetectOptions
    from maskmodel.errors import UserError
    from maskmodel.io import storage

    opts = DetectOptions()
    data = load_annotated(config.data, class_map=config.class_map, images_root=config.images_root,
                          val_fraction=config.val_fraction, min_face=opts.min_face)
    pixels: list[np.ndarray] = []
    for row in data.splits.get("test") or data.splits.get("val", []):
        if len(pixels) >= limit:
            break
        try:
            d = decode_photo(storage.read_bytes(row["uri"]), max_pixels=config.max_pixels)
        except (DecodeError, UserError):
            continue  # unreadable photos were already counted and skipped during training
        crops, _ = face_crops(np.asarray(d.image, np.uint8), np.asarray(row["boxes"], np.float32), (d.width, d.height),
                              margin=opts.margin, min_face=opts.min_face, crop=crop, crop_size=crop.crop_size)
        pixels.extend(crops.numpy())
    return pixels[:limit]


__all__ = ["AnnotatedData", "ApplyCrop", "CutFaces", "UNREADABLE", "face_datasets", "face_split", "load_annotated",
           "held_out_faces", "parse_class_map", "summary_line", "without_unreadable"]
