"""Photos with face boxes -> fixed-size detector inputs: reduced decode, box-aware augmentation, letterbox.

What the detector's training reads, per image: the bytes (fetched and checked
by :func:`maskmodel.data.discovery.fetch_and_check`), its annotated boxes in
original pixels, and the original size. :class:`DecodeBoxes` (a Ray Data
callable, Ray-free) decodes a JPEG at the reduced DCT scale that the
training resolution needs, moves the boxes into the decoded pixels, applies
:func:`train_transform` (torchvision.transforms.v2 on an image and a
``tv_tensors.BoundingBoxes``, so boxes follow every geometric change) and
letterboxes into a ``size`` x ``size`` input exactly as the face stage does
for scoring (:func:`maskmodel.models.detect.geometry.place`'s rule: aspect
kept, top left, zero padding right and below).

Rows leave as fixed-shape columns, so Ray Data moves them as tensors:
``image`` uint8 ``(3, S, S)``, ``boxes`` float32 ``(MAX_BOXES, 4)`` in
input pixels (``x0, y0, x1, y1``, zero rows after the real ones), ``n_boxes``
int64 (``-1``: this epoch could not read or decode the image; the loop leaves
it out).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from maskmodel.io.decode import DecodeError, decode

log = logging.getLogger(__name__)

MAX_BOXES = 128  # per image; WIDER FACE's crowds hold more, and the extra (smallest) boxes are dropped, counted
SKIPPED = -1  # n_boxes of a row the epoch could not read or decode


def pack_boxes(boxes: np.ndarray) -> bytes:
    """float32 ``(K, 4)`` -> bytes, how boxes travel in a Ray Data row (a column of one type whatever K is)."""
    return np.ascontiguousarray(boxes, dtype=np.float32).tobytes()


def unpack_boxes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32).reshape(-1, 4).copy()


def train_transform(*, zoom_out: float = 2.0, p_zoom: float = 0.3, p_crop: float = 0.5,
                    jitter: bool = True) -> v2.Compose:
    """Box-aware augmentation, torchvision's SSD recipe scaled for faces.

    Photometric distortion (brightness, contrast, saturation, hue, channel order),
    random zoom-out (the photo on a larger canvas of the mean colour, faces get
    smaller: up to ``zoom_out`` times), random IoU crop (a crop keeping at least
    part of a face, faces get larger), horizontal flip, then boxes that lost
    their area are dropped (``SanitizeBoundingBoxes``).
    """
    steps: list[Any] = []
    if jitter:
        steps.append(v2.RandomPhotometricDistort(p=0.5))
    if zoom_out > 1:
        steps.append(v2.RandomZoomOut(fill={tv_tensors.Image: (124, 116, 104), "others": 0},
                                      side_range=(1.0, zoom_out), p=p_zoom))
    if p_crop > 0:
        steps.append(v2.RandomApply([v2.RandomIoUCrop()], p=p_crop))
    steps += [v2.RandomHorizontalFlip(p=0.5), v2.SanitizeBoundingBoxes(min_size=2.0, labels_getter=None)]
    return v2.Compose(steps)


def letterbox_boxes(image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(3, H, W)`` and float ``(K, 4)`` boxes -> ``(3, size, size)`` and the boxes in its pixels.

    Scaled as large as fits with the aspect kept, at the top left, zero padding
    (the face stage's :func:`~maskmodel.models.detect.geometry.place`).
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    r = min(size / w, size / h)
    new_w, new_h = max(1, min(size, round(w * r))), max(1, min(size, round(h * r)))
    out = torch.zeros((3, size, size), dtype=torch.uint8)
    out[:, :new_h, :new_w] = F.resize(image, [new_h, new_w], antialias=True)
    scale = boxes.new_tensor([new_w / w, new_h / h, new_w / w, new_h / h])
    return out, boxes * scale


class DecodeBoxes:
    """Ray Data callable: ``data`` bytes + ``boxes`` (packed, original pixels) -> the fixed-shape row above.

    ``size``: the detector's input side; ``augment``: a transform such as
    :func:`train_transform` (``None``: letterbox only, for validation). Like
    :class:`maskmodel.data.discovery.DecodeCrop`, an image this epoch cannot
    read or decode stays in the batch (Ray Train gives every worker the same
    number of steps) with ``n_boxes = -1`` and a logged reason; it never stops
    the epoch.
    """

    def __init__(self, *, size: int, augment: Any = None, seed: int | None = None) -> None:
        self.size, self.augment = size, augment
        if seed is not None:
            torch.manual_seed(seed)

    def one(self, data: bytes, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Decode, augment and letterbox one photo; returns the image, ``(MAX_BOXES, 4)`` boxes and their count.

        ``boxes``: float32 ``(K, 4)`` in the original photo's pixels (after EXIF rotation, as the readers
        and the face stage count them); the photo's own size, not the annotation's, scales them.
        """
        # Decode at the smallest JPEG scale whose short side still covers the input.
        img, width, height = decode(data, reduce_to=self.size)
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        h, w = int(t.shape[1]), int(t.shape[2])
        b = torch.from_numpy(boxes) * torch.tensor([w / width, h / height, w / width, h / height])
        if self.augment is not None:
            image = tv_tensors.Image(t)
            bb = tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=(h, w))
            image, bb = self.augment(image, bb)  # a negative (no box) is jittered and flipped, not cropped
            t, b = image.as_subclass(torch.Tensor), bb.as_subclass(torch.Tensor)
        out, b = letterbox_boxes(t, b.float(), self.size)
        if len(b) > MAX_BOXES:
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            b = b[area.argsort(descending=True)[:MAX_BOXES]]
        padded = np.zeros((MAX_BOXES, 4), np.float32)
        padded[:len(b)] = b.numpy()
        return out.numpy(), padded, len(b)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["data"])
        errors = [str(e) if e else "" for e in batch.get("error", [""] * n)]
        images = np.zeros((n, 3, self.size, self.size), np.uint8)
        boxes = np.zeros((n, MAX_BOXES, 4), np.float32)
        counts = np.full(n, SKIPPED, np.int64)
        for i in range(n):
            if errors[i]:
                continue
            try:
                images[i], boxes[i], counts[i] = self.one(batch["data"][i], unpack_boxes(batch["boxes"][i]))
            except DecodeError as e:
                errors[i] = str(e)
            except Exception as e:  # noqa: BLE001 - one odd file must never stop an epoch
                errors[i] = f"undecodable: {type(e).__name__}: {e}"
        bad = [i for i, e in enumerate(errors) if e]
        if bad:
            uris = batch.get("uri", ["?"] * n)
            log.warning("%d image(s) of this batch could not be read or decoded and are left out of this epoch "
                        "(%s)", len(bad), "; ".join(f"{uris[i]}: {errors[i]}" for i in bad[:3]))
        return {"image": images, "boxes": boxes, "n_boxes": counts}
