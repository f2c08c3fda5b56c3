"""Detection metrics for face boxes: COCO average precision (pycocotools) and matching at an IoU.

Shared by the detector's training (AP each epoch) and ``jobs.evaluate`` (detection recall and
precision over committed scoring rows). Boxes are ``x0, y0, x1, y1`` in pixels of the original image;
one class, ``face``. No Ray.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _boxes(a: np.ndarray | Sequence[Sequence[float]] | None) -> np.ndarray:
    out = np.asarray(a if a is not None else np.zeros((0, 4)), dtype=np.float32)
    return out.reshape(-1, 4)


@dataclass(frozen=True)
class Matches:
    """One image's boxes matched at an IoU: ``pairs`` ``int64 (M, 2)`` of (truth index, prediction index)."""

    pairs: np.ndarray
    missed: np.ndarray      # int64 indices of truth boxes no prediction matched
    spurious: np.ndarray    # int64 indices of predictions that matched no truth box


def match(truth: np.ndarray, predicted: np.ndarray, scores: np.ndarray | None = None, *,
          iou: float = 0.5) -> Matches:
    """Match predictions to truth boxes the COCO way: in descending score, each prediction takes the
    unmatched truth box it overlaps most, if that IoU is at least ``iou``.

    ``truth`` ``(G, 4)``, ``predicted`` ``(P, 4)``, ``scores`` ``(P,)`` (None: the given order).
    IoU from :func:`torchvision.ops.box_iou`.
    """
    import torch
    from torchvision.ops import box_iou

    t, p = _boxes(truth), _boxes(predicted)
    order = np.arange(len(p)) if scores is None else np.argsort(-np.asarray(scores, np.float32), kind="stable")
    overlap = box_iou(torch.from_numpy(t), torch.from_numpy(p)).numpy() if len(t) and len(p) else np.zeros((len(t), len(p)))
    taken = np.zeros(len(t), dtype=bool)
    pairs = []
    for j in order:
        if not len(t):
            break
        cand = np.where(taken, -1.0, overlap[:, j])
        i = int(cand.argmax())
        if cand[i] >= iou:
            taken[i] = True
            pairs.append((i, int(j)))
    matched_p = {j for _, j in pairs}
    return Matches(pairs=np.array(pairs, dtype=np.int64).reshape(-1, 2),
                   missed=np.flatnonzero(~taken).astype(np.int64),
                   spurious=np.array([j for j in range(len(p)) if j not in matched_p], dtype=np.int64))


def _drop_pycocotools(record: logging.LogRecord) -> bool:
    return "pycocotools" not in record.pathname


@contextlib.contextmanager
def _quiet_pycocotools():
    """Inside Ray Train V2 workers ``print`` becomes a root-logger record (its ``patch_print``), which
    ``redirect_stdout`` does not catch: drop the records pycocotools' prints make, for this block only."""
    root = logging.getLogger()
    root.addFilter(_drop_pycocotools)
    try:
        yield
    finally:
        root.removeFilter(_drop_pycocotools)


def detection_metrics(truth: Sequence[np.ndarray], predicted: Sequence[np.ndarray], scores: Sequence[np.ndarray], *,
                      sizes: Sequence[tuple[int, int]] | None = None, iou: float = 0.5,
                      threshold: float = 0.0) -> dict[str, float]:
    """Face-detection metrics over a set of images.

    ``truth[i]`` ``float32 (G_i, 4)``, ``predicted[i]`` ``(P_i, 4)`` and ``scores[i]`` ``(P_i,)`` are image
    ``i``'s boxes (``x0, y0, x1, y1``, pixels); ``sizes[i]`` its ``(width, height)`` (only for COCO's
    record; defaults to the boxes' extent). Returns:

    - ``ap50``: average precision at IoU 0.5, and ``ap``: averaged over IoU 0.50:0.05:0.95, both
      COCO's 101-point interpolation from :class:`pycocotools.cocoeval.COCOeval` (maxDets 100), over
      every prediction whatever its score; ``-1`` when there is no truth box (COCO's convention);
    - ``recall`` and ``precision`` at IoU ``iou`` for predictions scoring at least ``threshold``
      (the operating point), from :func:`match`;
    - ``images``, ``faces`` (truth boxes), ``detections`` (at the threshold), ``matched``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, dets = [], [], []
    matched = faces = kept = 0
    for k, (t, p, s) in enumerate(zip(truth, predicted, scores)):
        t, p, s = _boxes(t), _boxes(p), np.asarray(s, np.float32).reshape(-1)
        w, h = sizes[k] if sizes is not None else (float(max(t[:, 2].max(initial=1), p[:, 2].max(initial=1))),
                                                   float(max(t[:, 3].max(initial=1), p[:, 3].max(initial=1))))
        images.append({"id": k + 1, "width": int(w), "height": int(h)})
        for b in t:
            annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "category_id": 1, "iscrowd": 0,
                                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                                "area": float((b[2] - b[0]) * (b[3] - b[1]))})
        for b, sc in zip(p, s):
            dets.append({"image_id": k + 1, "category_id": 1, "score": float(sc),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
        keep = s >= threshold
        m = match(t, p[keep], s[keep], iou=iou)
        matched, faces, kept = matched + len(m.pairs), faces + len(t), kept + int(keep.sum())
    ap50 = ap = -1.0
    if annotations and dets:
        with contextlib.redirect_stdout(io.StringIO()), _quiet_pycocotools():  # pycocotools prints its progress
            gt = COCO()
            gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "face"}]}
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(dets), iouType="bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        ap, ap50 = float(ev.stats[0]), float(ev.stats[1])
    elif annotations:
        ap = ap50 = 0.0  # faces to find and no prediction at all
    return {"ap50": ap50, "ap": ap, "recall": matched / faces if faces else 0.0,
            "precision": matched / kept if kept else 0.0, "images": len(images), "faces": faces,
            "detections": kept, "matched": matched}
