"""The face detector's training job: annotations in, a detector directory that ``load_detector`` reads out.

:func:`train_detector` reads COCO JSON, Pascal VOC XML or YOLO boxes
(:mod:`maskmodel.data.annotations`; every class is ``face`` unless
``--class-map`` drops some), checks them and the output before any worker
starts, streams the photos through Ray Data with the classifier's check pass
and limits (:func:`maskmodel.train.training.prepare_split`: fetched once,
unreadable ones counted, more than ``--max-unreadable`` stops the job),
decodes them at the reduced size the input needs with box-aware augmentation
(:class:`maskmodel.data.boxes.DecodeBoxes`), trains a detector of
:mod:`maskmodel.models.detect.trainable` (CenterFace fine-tuned with CenterNet's
loss by default, or torchvision's zoo) on ``num_workers`` Ray Train workers
with the classifier's trainer, checkpoints and resume
(:func:`maskmodel.train.training.make_trainer`), evaluates AP50, COCO AP and
recall/precision at the operating threshold each epoch (and once before the
first, as epoch 0: what the initial weights already reach), logs progress
inside each epoch, and exports the best epoch (by AP50) as a detector
directory with its ``detector.json`` card.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from maskmodel import reports
from maskmodel.config import config_to_dict
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.train.config import DetectTrainConfig

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "train_loss", "val_ap50", "val_ap", "val_recall", "val_precision", "lr", "images_per_s",
                  "epoch_seconds", "train_images", "val_images", "val_faces", "skipped_train", "skipped_val",
                  "attempt")
PANELS = (("train_loss", "Train loss"), ("val_ap50", "Val AP50"), ("val_ap", "Val AP (COCO)"),
          ("val_recall", "Val recall at the threshold"))
SCORE_METRIC = "val_ap50"  # what picks the exported epoch
DATASET_ANNOTATIONS = "detect.coco.json"  # what jobs.make_dataset writes next to its detect split


@dataclass(frozen=True)
class DetectTrainOutputs:
    output: str
    model_dir: str
    model_id: str
    metrics: dict[str, float]
    epochs_run: int
    #: The initial weights' validation figures (epoch 0): val_ap50, val_ap, val_recall, val_precision.
    before_training: dict[str, float] | None = None


# --- annotations -> split rows (no Ray) ---

def _annotations_uri(uri: str) -> str:
    """A dataset folder of jobs.make_dataset means its scene annotations; anything else is taken as given."""
    if not uri.lower().endswith((".json", ".xml")) and storage.exists(storage.join(uri, DATASET_ANNOTATIONS)):
        return storage.join(uri, DATASET_ANNOTATIONS)
    return uri


class _Faces(dict):
    """A reader's class map for the detector: every class is a face but those the ``--class-map`` drops."""

    def get(self, key, default=None):  # the readers' lookup
        return None if key in self and dict.__getitem__(self, key) is None else "face"


def read_boxes(uri: str, *, images_root: str = "", class_map: str = "") -> list:
    """The :class:`~maskmodel.data.annotations.ImageBoxes` of ``uri``, every class a face but those ``class_map``
    (``--class-map``, :func:`maskmodel.train.annotated.parse_class_map`'s syntax) drops with ``name=-``.

    Logs one line with what was dropped (boxes of other classes, boxes with no
    area inside their image). Raises :class:`UserError` when the file holds no
    image or no face box at all: nothing to learn from.
    """
    from maskmodel.data.annotations import read_annotations

    uri = _annotations_uri(uri)
    if not storage.exists(uri):
        raise UserError(f"The annotations {uri!r} do not exist; pass a COCO .json, a VOC .xml file or folder, or a "
                        f"dataset folder with {DATASET_ANNOTATIONS}.")
    from maskmodel.train.annotated import parse_class_map

    dropped = [c for c, name in parse_class_map(class_map).items() if name is None]
    records = read_annotations(uri, class_map=_Faces(parse_class_map(class_map)) if class_map else None,
                               images_root=images_root or None)
    faces = sum(len(r) for r in records)
    if not records or not faces:
        but = f" once --class-map drops {', '.join(dropped)}" if dropped else ""
        raise UserError(f"{uri!r} holds {len(records)} image(s) and no face box{but}; a detector needs annotated "
                        f"faces to learn from.")
    skipped, invalid = sum(r.skipped for r in records), sum(r.invalid for r in records)
    if skipped or invalid:
        log.warning("%s: %d box(es) of other classes (or crowd regions) and %d with no area inside their image "
                    "left out", uri, skipped, invalid)
    log.info("%s: %d image(s), %d face(s), %d image(s) without a face", uri, len(records), faces,
             sum(not len(r) for r in records))
    return records


def split_rows(records: list, *, val_records: list | None, val_fraction: float) -> dict[str, list[dict]]:
    """Ray Data rows per split: ``uri``, ``boxes`` (packed float32, original pixels) and ``n`` (face count)."""
    from maskmodel.data.boxes import pack_boxes
    from maskmodel.data.discovery import hash_fraction

    def row(r) -> dict:
        return {"uri": r.path, "boxes": pack_boxes(r.boxes), "n": len(r)}

    if val_records is not None:
        train, val = records, val_records
    else:
        val = [r for r in records if hash_fraction(r.path) < val_fraction]
        train = [r for r in records if hash_fraction(r.path) >= val_fraction]
    if not train or not val:
        raise UserError(f"{len(train)} training and {len(val)} validation image(s): both splits need images; "
                        f"annotate more images or pass --val-data.")
    return {"train": [row(r) for r in train], "val": [row(r) for r in val]}


def _size(uri: str) -> int:
    try:
        return storage.info(uri).size
    except UserError:
        return 0  # a missing photo is counted (and judged) by the check pass, not here


def _card(config: DetectTrainConfig, weights: bytes, metrics: dict[str, Any]):
    from maskmodel.data.lineage import annotation_sets
    from maskmodel.models.detect.card import DetectorCard, sha256

    digest = sha256(weights)
    return DetectorCard(architecture=config.arch, weights="model.pt", sha256=digest,
                        model_id=f"facedet-{digest[:12]}", input_size=(config.image_size, config.image_size),
                        score_threshold=config.score_threshold, nms_iou=config.nms_iou,
                        source=f"maskmodel jobs.train_detector, {config.arch}, --weights {config.weights}, "
                               f"data {config.data}", metrics=metrics,
                        annotation_sets=tuple(annotation_sets([config.data, config.val_data])))


# --- the job ---

def train_detector(config: DetectTrainConfig) -> DetectTrainOutputs:
    """Run one detector training end to end; see the module docstring. Raises :class:`UserError` on bad input."""
    trainer, val_rows = prepare_detector_training(config)
    return export_detector(config, trainer.fit(), val_rows)


def prepare_detector_training(config: DetectTrainConfig, *, callbacks: Sequence[Any] = (),
                              worker_env: dict[str, str] | None = None) -> tuple[Any, list[dict]]:
    """Check the input and build (not fit) the run's ``TorchTrainer``; returns it and the validation rows.

    Raises :class:`UserError` (bad annotations, unknown or unreachable
    ``--weights``, another run's checkpoints at ``--output``, too many
    unreadable images) before any worker starts.
    """
    import ray

    from maskmodel.data.boxes import DecodeBoxes, train_transform
    from maskmodel.models.detect import trainable
    from maskmodel.runtime.resources import cluster_cpus, cpus_per_worker
    from maskmodel.train.detect_loop import detect_loop_per_worker
    from maskmodel.train.outputs import check_resumable, run_meta
    from maskmodel.train.training import _init_ray, _object_store_bytes, make_trainer, prepare_split

    storage.check_writable(config.output)
    records = read_boxes(config.data, images_root=config.images_root, class_map=config.class_map)
    val_records = (read_boxes(config.val_data, images_root=config.images_root, class_map=config.class_map)
                   if config.val_data else None)
    folded = sorted({c for r in [*records, *(val_records or [])] for c in r.classes})
    log.info("annotation classes %s folded into one class 'face': the detector finds faces, the classifier tells "
             "their classes apart", ", ".join(folded))
    rows = split_rows(records, val_records=val_records, val_fraction=config.val_fraction)
    meta = run_meta(config.arch, ["face"], config.image_size)
    check_resumable(config.output, meta)
    import torch

    torch.manual_seed(config.seed)
    initial = trainable.initial(config.arch, config.weights, storage.read_bytes).state_dict()  # bad --weights fail here

    _init_ray()
    worker_cpus = cpus_per_worker(config.cpus_per_worker, config.num_workers, cluster_cpus())
    # The bytes of a sample of the photos, scaled to all of them (listing a bucket to sum sizes is no cheaper).
    sample = rows["train"][:20]
    total_bytes = (sum(_size(r["uri"]) for r in sample) / len(sample) *
                   (len(rows["train"]) + len(rows["val"]))) if config.cache_raw == "auto" else 0.0
    cache = config.cache_raw == "on" or (config.cache_raw == "auto" and total_bytes < 0.3 * _object_store_bytes())
    augment = train_transform(zoom_out=config.zoom_out) if config.augment else None
    train_ds, bad_train = prepare_split(rows["train"], name="train", seed=config.seed,
                                        max_unreadable=config.max_unreadable, cache=cache, shuffle=True,
                                        decoder=DecodeBoxes(size=config.image_size, augment=augment))
    val_ds, bad_val = prepare_split(rows["val"], name="val", seed=config.seed, max_unreadable=config.max_unreadable,
                                    cache=cache, shuffle=False, decoder=DecodeBoxes(size=config.image_size))
    counts = {s: {"images": len(r), "faces": sum(x["n"] for x in r)} for s, r in rows.items()}
    storage.write_json(storage.join(config.output, "train_config.json"),
                       {"config": config_to_dict(config), "task": "face-detection", "counts": counts})
    log.info("detector %s (--weights %s) at %d px: train %d images / %d faces, val %d images / %d faces",
             config.arch, config.weights, config.image_size, counts["train"]["images"], counts["train"]["faces"],
             counts["val"]["images"], counts["val"]["faces"])
    trainer = make_trainer(
        detect_loop_per_worker, output=config.output, datasets={"train": train_ds, "val": val_ds},
        num_workers=config.num_workers, gpu=config.gpu, worker_cpus=worker_cpus, max_failures=config.max_failures,
        score_attribute=SCORE_METRIC, callbacks=callbacks, worker_env=worker_env,
        loop_config={
            "arch": config.arch, "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr,
            "optimizer": config.optimizer, "momentum": config.momentum, "weight_decay": config.weight_decay,
            "lr_schedule": config.lr_schedule, "warmup_epochs": config.warmup_epochs, "seed": config.seed,
            "image_size": config.image_size, "score_threshold": config.score_threshold, "nms_iou": config.nms_iou,
            "precision": config.precision, "progress_s": config.progress_s,
            "train_images": counts["train"]["images"] - bad_train,
            "output": config.output, "meta": meta, "columns": METRIC_COLUMNS, "panels": PANELS, "stall_s": 60 * config.stall_minutes,
            "torch_threads": config.torch_threads or max(1, int(worker_cpus)),
            "initial_state_ref": ray.put(initial), "skipped": {"train": bad_train, "val": bad_val},
        })
    return trainer, rows["val"]


def export_detector(config: DetectTrainConfig, result, val_rows: list[dict]) -> DetectTrainOutputs:
    """The best epoch (by AP50) as ``<output>/detector`` (weights + card), plus report.json, curves and a grid."""
    import torch

    from maskmodel.models.detect.detector import save_detector
    from maskmodel.models.detect.trainable import export_state
    from maskmodel.train.outputs import write_epoch_outputs
    from maskmodel.train.training import best_and_latest

    best, latest = best_and_latest(result, SCORE_METRIC)
    history, row = latest["history"], best["history"][-1]
    trained = [h for h in history if h["epoch"] >= 1]  # epoch 0: the initial weights, before training
    before = next(({k: h[k] for k in ("val_ap50", "val_ap", "val_recall", "val_precision")}
                   for h in history if h["epoch"] == 0), None)
    if before is not None and row["val_ap50"] < before["val_ap50"]:
        log.warning("fine-tuning lowered AP50 on the validation photos: %.4f at the best epoch (%d), %.4f with the "
                    "initial weights (epoch 0)", row["val_ap50"], row["epoch"], before["val_ap50"])
    buf = io.BytesIO()
    torch.save(export_state(config.arch, best["model"]), buf)
    metrics = {k: row[k] for k in ("epoch", "train_loss", "val_ap50", "val_ap", "val_recall", "val_precision",
                                   "val_images", "val_faces")}
    model_dir = storage.join(config.output, "detector")
    card = save_detector(model_dir, buf.getvalue(), _card(config, buf.getvalue(), metrics))
    write_epoch_outputs(config.output, history, columns=METRIC_COLUMNS, panels=PANELS)
    storage.write_json(storage.join(config.output, "report.json"),
                       {**metrics, "model_id": card.model_id, "best_epoch": row["epoch"], "epochs_run": len(trained),
                        "before_training": before, "data": config.data, "split": "val",
                        "score_threshold": config.score_threshold, "task": "face-detection"})
    write_detections_grid(config.output, model_dir, val_rows)
    return DetectTrainOutputs(output=config.output, model_dir=model_dir, model_id=card.model_id, metrics=metrics,
                              epochs_run=len(trained), before_training=before)


def write_detections_grid(output: str, model_dir: str, val_rows: list[dict], *, limit: int = 16) -> None:
    """``detections.png``: validation photos with true boxes (green) and the exported detector's (red, scored)."""
    from maskmodel.data.boxes import unpack_boxes
    from maskmodel.io.decode import DecodeError, decode
    from maskmodel.models.detect.detector import load_detector

    detector = load_detector(model_dir)
    pics, titles = [], []
    for r in val_rows[:limit]:
        try:
            img = np.asarray(decode(storage.read_bytes(r["uri"])).image)
        except (DecodeError, OSError, UserError):
            continue
        faces = detector.detect([img])[0]
        drawn = reports.draw_boxes(img, unpack_boxes(r["boxes"]), color=(0, 200, 0))
        drawn = reports.draw_boxes(drawn, faces.boxes, color=(230, 0, 0), labels=[f"{s:.2f}" for s in faces.scores])
        pics.append(drawn)
        titles.append(f"{len(faces)} found / {r['n']} true")
    if pics:
        storage.write_bytes(storage.join(output, "detections.png"), reports.image_grid_png(
            np.stack([_fit(p, 256) for p in pics]), titles, cols=4,
            suptitle="Validation: true boxes green, detected red (best epoch)"))


def _fit(img: np.ndarray, side: int) -> np.ndarray:
    """A uint8 picture letterboxed into ``side`` x ``side`` (so pictures of any size share a grid)."""
    from PIL import Image

    h, w = img.shape[:2]
    r = side / max(h, w)
    small = np.asarray(Image.fromarray(img).resize((max(1, round(w * r)), max(1, round(h * r)))))
    out = np.full((side, side, 3), 255, np.uint8)
    out[:small.shape[0], :small.shape[1]] = small
    return out
