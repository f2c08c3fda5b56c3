"""A procedurally drawn face-mask dataset: the built-in data when no photos are reachable.

What separates the classes. ``mask``: a face wearing a surgical mask (pale,
horizontal pleats), an N95-like rounded cup (centre seam, sometimes a valve) or
a cloth mask (solid or patterned, sometimes skin-coloured). A mask always covers
nose *and* mouth, follows the face outline from just below the eyes to under
the chin, and is held by ear loops or head straps. ``no_mask``: the same kind of
faces with the mouth visible, and, as hard negatives (``hard_negative_fraction``
of them, 30 % by default: the original model's stated failure modes), the lower
face covered by something that is not a mask: a skin-coloured hand with fingers
and a wrist, a rectangular sheet of paper held by its corners with no straps, or
a scarf wrapped below the chin that leaves the mouth visible. So "something
covers the mouth" is not enough: a model has to tell a mask's shape, texture
and straps from skin, fingers and straight paper edges. ``mask_incorrect``
(on by default, ``incorrect_share`` of the faces; 0 draws two classes only):
the same masks worn wrong, the most common violation in practice: below the
nose (nose visible, mouth covered; variant ``below_nose``) or down on the chin
(nose and mouth visible; variant ``chin``). Everything else (skin
tone, hair, eyes, glasses, beard, position, scale, rotation, lighting,
background, blur, JPEG quality) is drawn from the same distributions for both
classes, so it carries no label.

Layout: ``<out>/<split>/<class>/<index:06d>.jpg`` (or, with ``format="webdataset"``, tar shards
``<out>/<split>/<split>-<shard:06d>.tar`` holding ``<class>/<index:06d>.jpg`` and ``.cls``) with ``train``
(``n_per_class`` images per class), ``val``, ``test`` and ``scene``
(``max(2, round(n/4))`` each) and ``detect`` (``max(2, round(0.4 n))``); ``mask_incorrect`` gets as
many as makes it ``incorrect_share`` of the split (:func:`class_sizes`; the default third: as many as the
others). ``train``/``val`` are tight face crops (``image_size`` square); ``test`` holds faces as the face
stage cuts them at scoring time (:func:`render_face_cut`): the first face of a busy scene drawn like the
``scene`` split's, its box grown by the face stage's margin and clipped
(:mod:`maskmodel.data.facecrop`), at the scene's resolution (so from about 36 px to half the scene's
side, not square); scored whole (``--faces none``) a ``test`` file gives the classifier what the face stage
would give it for that face, so per-face accuracy on ``scene`` and accuracy on ``test`` agree;
``scene`` pictures (``scene_size`` px, by default four times ``image_size``)
hold 0 to 4 faces of mixed classes and sizes, down to 24 px across, in a busy
picture (:mod:`maskmodel.data.scenes`); their folder follows the picture's verdict
(``no_mask`` if any face is unmasked, else ``mask_incorrect`` if any mask is worn
wrong, else ``mask``, a picture with no face included: an alert picture is in an
alert class's folder), so tools that score whole pictures by folder keep working. Every
scene face's box, class and variant is in ``scene.coco.json`` (COCO JSON, paths
relative to ``<out>``; read it with :func:`maskmodel.data.annotations.read_coco`).
``detect`` holds more such scenes, drawn from their own seeds, with their boxes in
``detect.coco.json``: what ``jobs.train_detector`` learns from, so the ``scene``
split stays unseen by the detector as by the classifier.
``dataset.json`` records the generator's parameters and the counts;
``variants.csv`` gives each file's variant (``surgical``, ``n95``, ``cloth``,
``plain``, ``hand``, ``paper``, ``scarf``, ``below_nose``, ``chin``; for a scene its faces' variants
joined by ``+``, or ``empty``) to break accuracy down by failure mode.

Determinism: image ``i`` of a split and class is drawn from
``numpy.random.default_rng((seed, split_index, class_index, i))`` alone, so a
seed gives byte-identical files whatever the order or parallelism of generation.
"""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from maskmodel.config import field, resolve_paths
from maskmodel.data.drawing import MASK_STYLES  # re-exported
from maskmodel.data.samples import (  # re-exported: synth is where callers find the dataset's pictures
    CLASSES,
    CUT_SPLITS,
    DEFAULT_INCORRECT_SHARE,
    FACE_MARGIN,
    HARD_NEGATIVES,
    INCORRECT,
    SCENE_SPLITS,
    SPLITS,
    WORN_WRONG,
    Sample,
    dataset_classes,
    render_face_cut,
    render_photo,
    render_sample,
    render_scene_sample,
    variant_for,
)
from maskmodel.errors import UserError
from maskmodel.io import storage

log = logging.getLogger(__name__)

# Bump whenever a seed would draw different pictures (2: scenes with boxes; 3: the detect split; 4: mask_incorrect;
# 5: test holds face-stage cuts).
VERSION = 5
SCENE_ANNOTATIONS = "scene.coco.json"  # COCO boxes of the scene split, next to it
DETECT_ANNOTATIONS = "detect.coco.json"  # COCO boxes of the detect split (the face detector's training scenes)
OWN_ENTRIES = (*SPLITS, "dataset.json", "variants.csv", SCENE_ANNOTATIONS, DETECT_ANNOTATIONS)



@dataclass(frozen=True)
class DatasetConfig:
    """Everything that decides what ``jobs.make_dataset`` writes, and where."""

    out: str = field(path=True, help="where to write the dataset tree: a local path or a URI such as s3://bucket/faces")
    n_per_class: int = field(500, help="train images per class; val, test and scene get max(2, round(N/4)) each, "
                                       "detect (the face detector's training scenes) max(2, round(0.4 N))")
    image_size: int = field(96, help="side of the square images in pixels")
    scene_size: int = field(0, help="side of the scene pictures in pixels (0: four times --image-size, at least "
                                    "128): room for up to 4 faces of at least 24 px")
    seed: int = field(0, help="random seed; the same seed writes byte-identical files")
    hard_negative_fraction: float = field(0.3, help="share of no_mask images whose face is covered by a hand, "
                                                    "paper or scarf")
    incorrect_share: float = field(DEFAULT_INCORRECT_SHARE,
                                   help="share of each split's pictures (and of the scenes' other faces) in the "
                                        "mask_incorrect class, a mask worn below the nose or on the chin (default "
                                        "a third: as many as mask or no_mask; 0: two classes only)")
    workers: int = field(16, help="threads drawing and writing images (writes to object storage are I/O bound)")
    overwrite: bool = field(False, help="replace a dataset already at --out (only its own folders and files)")
    format: str = field("folders", choices=("folders", "webdataset"),
                        help="folders: one JPEG per object, <split>/<class>/<index>.jpg; webdataset: tar shards "
                             "<split>/<split>-NNNNNN.tar holding <class>/<index>.jpg and .cls (the class index)")
    shard_size: int = field(1000, help="images per tar shard (webdataset)")

    def __post_init__(self) -> None:
        resolve_paths(self)
        if self.n_per_class < 2:
            raise ValueError(f"n_per_class must be at least 2, got {self.n_per_class}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be between 32 and 1024 pixels, got {self.image_size}")
        if self.scene_size and not 96 <= self.scene_size <= 2048:
            raise ValueError(f"scene_size must be 0 or between 96 and 2048 pixels, got {self.scene_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be zero or positive, got {self.seed}")
        if not 0.0 <= self.hard_negative_fraction <= 1.0:
            raise ValueError(f"hard_negative_fraction must be between 0 and 1, got {self.hard_negative_fraction}")
        if not 0.0 <= self.incorrect_share <= 0.8:
            raise ValueError(f"incorrect_share must be between 0 and 0.8, got {self.incorrect_share}")
        if not 1 <= self.workers <= 256:
            raise ValueError(f"workers must be between 1 and 256, got {self.workers}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")


def scene_side(config: DatasetConfig) -> int:
    """Side of the scene pictures: ``scene_size``, or four times ``image_size`` and at least 128."""
    return config.scene_size or max(128, 4 * config.image_size)


def split_sizes(n_per_class: int) -> dict[str, int]:
    """Images per class in each split: ``n_per_class`` in train, ``max(2, round(n/4))`` in val, test and scene,
    ``max(2, round(0.4 n))`` in detect (240 scenes for the demo's 300: what the detector needs, measured in
    ``benchmarks/detector_choice.py``)."""
    small = max(2, round(n_per_class / 4))
    return {"train": n_per_class, "val": small, "test": small, "scene": small,
            "detect": max(2, round(0.4 * n_per_class))}


def class_sizes(n_per_class: int, incorrect_share: float) -> dict[str, dict[str, int]]:
    """Pictures per split and class: :func:`split_sizes` for ``mask`` and ``no_mask``; for ``mask_incorrect``
    (when ``incorrect_share`` > 0) ``round(2 n s / (1 - s))`` of a split of ``n`` per class, at least 1, so that
    it is the share ``s`` of the split."""
    out = {}
    for split, n in split_sizes(n_per_class).items():
        out[split] = {"mask": n, "no_mask": n}
        if incorrect_share > 0:
            out[split][INCORRECT] = max(1, round(2 * n * incorrect_share / (1 - incorrect_share)))
    return out


def _webdataset_tar(samples: list[tuple[str, int, bytes]]) -> bytes:
    """A WebDataset shard: per sample ``<key>.jpg`` and ``<key>.cls``; fixed metadata, so the bytes are reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, label, data in samples:
            key = name.rsplit(".", 1)[0]
            for member, payload in ((name, data), (f"{key}.cls", f"{label}\n".encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_dataset(config: DatasetConfig) -> dict:
    """Draw the whole dataset and write it under ``config.out``; returns what ``dataset.json`` holds.

    Refuses (:class:`UserError`) to write over an earlier dataset there unless
    ``config.overwrite``, which deletes only this generator's own entries
    (:data:`OWN_ENTRIES`). ``dataset.json`` is written last, so its presence
    marks a complete dataset. Storage failures surface as :class:`UserError`.
    """
    existing = sorted(set(storage.listdir(config.out)) & set(OWN_ENTRIES))
    if existing and not config.overwrite:
        raise UserError(f"{config.out!r} already holds a dataset ({', '.join(existing)}); "
                        f"pass --overwrite to replace it or choose another --out.")
    for name in existing:
        storage.delete(storage.join(config.out, name))
    sizes, started, done = class_sizes(config.n_per_class, config.incorrect_share), time.monotonic(), itertools.count(1)
    classes = dataset_classes(config.incorrect_share)
    # Classes interleaved, so that every shard holds all.
    files = [(s, c, f"{s}/{c}/{i:06d}.jpg") for s in SPLITS for i in range(max(sizes[s].values())) for c in classes
             if i < sizes[s][c]]
    last_log = [started]
    shards = config.format == "webdataset"

    scene_px = scene_side(config)

    def make(split: str, label: str, path: str) -> tuple[str, bytes, tuple]:
        if split in SCENE_SPLITS:
            scene = render_scene_sample(label, int(path[-10:-4]), size=scene_px, seed=config.seed,
                                        hard_negative_fraction=config.hard_negative_fraction, split=split,
                                        incorrect_share=config.incorrect_share)
            sample, faces = Sample(scene.image, scene.variant, scene.jpeg_quality), scene.faces
        elif split in CUT_SPLITS:
            faces = ()
            sample = render_face_cut(label, int(path[-10:-4]), scene_size=scene_px, seed=config.seed, split=split,
                                     hard_negative_fraction=config.hard_negative_fraction,
                                     incorrect_share=config.incorrect_share)
        else:
            faces = ()
            sample = render_sample(split, label, int(path[-10:-4]), image_size=config.image_size, seed=config.seed,
                                   hard_negative_fraction=config.hard_negative_fraction)
        data = sample.jpeg()
        if not shards:
            storage.write_bytes(storage.join(config.out, path), data)
        n, now = next(done), time.monotonic()  # count() is atomic under the GIL
        if now - last_log[0] >= 5 or n == len(files):  # alive, not chatty
            last_log[0] = now
            log.info("%d/%d images %s", n, len(files), "drawn" if shards else "written")
        return sample.variant, (data if shards else b""), faces

    # Threads, not processes: object-store writes wait on the network, and
    # Pillow releases the GIL while resizing, blurring and encoding.
    rows, scene_faces = [], []
    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        for split in SPLITS:  # one shard's images in memory at a time
            todo = [f for f in files if f[0] == split]
            for k in range(0, len(todo), config.shard_size if shards else len(todo)):
                chunk = todo[k:k + config.shard_size] if shards else todo
                futures = [pool.submit(make, *f) for f in chunk]
                try:
                    made = [f.result() for f in futures]
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
                if shards:
                    shard = f"{split}/{split}-{k // config.shard_size:06d}.tar"
                    storage.write_bytes(storage.join(config.out, shard),
                                        _webdataset_tar([(p.split("/", 1)[1], classes.index(c), d)
                                                         for (_, c, p), (_, d, _) in zip(chunk, made)]))
                    names = [f"{shard}#{p.split('/', 1)[1]}" for _, _, p in chunk]
                else:
                    names = [p for _, _, p in chunk]
                rows += [(n, c, s, v) for n, (s, c, _), (v, _, _) in zip(names, chunk, made)]
                scene_faces += [(s, n, c, faces) for n, (s, c, _), (_, _, faces) in zip(names, chunk, made)
                                if s in SCENE_SPLITS]
    for split, name in (("scene", SCENE_ANNOTATIONS), ("detect", DETECT_ANNOTATIONS)):
        _write_scene_annotations(config.out, [f[1:] for f in scene_faces if f[0] == split], scene_px, name=name,
                                 split=split, classes=classes)
    storage.write_text(storage.join(config.out, "variants.csv"),
                       "path,label,split,variant\n" + "".join(",".join(r) + "\n" for r in rows))
    # Only what decides the pictures: the same seed gives the same file wherever it is written.
    record = {"generator": "maskmodel.data.synth", "version": VERSION, "seed": config.seed,
              "image_size": config.image_size, "scene_size": scene_px, "n_per_class": config.n_per_class,
              "hard_negative_fraction": config.hard_negative_fraction, "incorrect_share": config.incorrect_share,
              "classes": list(classes), "splits": sizes,
              "variants": {s: dict(sorted(Counter(r[3] for r in rows if r[2] == s).items())) for s in SPLITS},
              "total": len(rows), "format": config.format,
              "scene_annotations": _annotation_record(SCENE_ANNOTATIONS, [f for f in scene_faces if f[0] == "scene"]),
              "detect_annotations": _annotation_record(DETECT_ANNOTATIONS,
                                                       [f for f in scene_faces if f[0] == "detect"]),
              "layout": ("<split>/<split>-<shard:06d>.tar holding <class>/<index:06d>.jpg and .cls" if shards
                         else "<split>/<class>/<index:06d>.jpg")}
    if shards:
        record["shard_size"] = config.shard_size
    storage.write_json(storage.join(config.out, "dataset.json"), record)
    log.info("wrote %d images to %s in %.1f s", len(rows), config.out, time.monotonic() - started)
    return record


def _annotation_record(name: str, scenes: list[tuple]) -> dict:
    return {"file": name, "format": "coco", "faces": dict(Counter(f.label for *_, fs in scenes for f in fs)),
            "images_without_faces": sum(not fs for *_, fs in scenes)}


def _write_scene_annotations(out: str, scenes: list[tuple[str, str, tuple]], size: int, *, name: str,
                             split: str, classes: tuple[str, ...]) -> None:
    """``<out>/<name>``: per picture of ``split`` (path relative to ``out``) its faces' boxes, classes, variants."""
    from maskmodel.data.annotations import ImageBoxes, write_coco

    records = [ImageBoxes(path=storage.join(out, name), width=size, height=size,
                          boxes=np.asarray([f.box for f in faces], np.float32).reshape(-1, 4),
                          classes=tuple(f.label for f in faces), labels=tuple("face" for _ in faces),
                          attributes=tuple({"variant": f.variant} for f in faces), extra={"label": label})
               for name, label, faces in scenes]
    write_coco(records, storage.join(out, name), categories=classes,
               info={"description": f"maskmodel.data.synth {split} split: every face's box, class "
                                    f"({'/'.join(classes)}) and variant; images[].label is the picture's folder "
                                    f"(an alert class's when any face is of one)",
                     "version": VERSION})


__all__ = ["CLASSES", "CUT_SPLITS", "DEFAULT_INCORRECT_SHARE", "DETECT_ANNOTATIONS", "FACE_MARGIN", "HARD_NEGATIVES",
           "INCORRECT", "MASK_STYLES", "OWN_ENTRIES", "SCENE_ANNOTATIONS", "SCENE_SPLITS", "SPLITS", "VERSION", "WORN_WRONG",
           "DatasetConfig", "Sample", "class_sizes", "dataset_classes", "render_face_cut", "render_photo",
           "render_sample", "render_scene_sample", "scene_side", "split_sizes", "variant_for", "write_dataset"]
