"""The one definition of a face crop: from a photo's bytes and a face box to the classifier's input.

Scoring (:class:`maskmodel.score.faces.FaceStage`, boxes from a detector) and
training from annotated photos (:mod:`maskmodel.train.annotated`, boxes from a
COCO / VOC / YOLO file) both call these functions, so a face is cut alike in
both (no train/serve skew):

1. :func:`decode_photo`: the photo decoded once, EXIF-rotated, to at most
   ``max_pixels`` (:data:`DEFAULT_MAX_PIXELS`, scoring's ``--max-pixels``);
2. :func:`big_enough`: faces whose shorter side is under ``min_face``
   ORIGINAL pixels are left out (``DetectOptions.min_face``);
3. :func:`to_decoded` then :func:`crop_boxes`: the box in decoded pixels,
   grown by ``margin`` of its width / height on each side and clipped to the
   picture (``DetectOptions.margin``);
4. :func:`cut`: the crop box cut from the decoded picture, pixel-aligned
   outwards, and turned into the classifier's input by ``crop`` (scoring:
   :class:`~maskmodel.data.transforms.EvalCrop`).

:func:`face_crops` chains 2-4 for boxes in original pixels. Boxes are
``x0, y0, x1, y1`` float32, ``x1``/``y1`` exclusive, as in torchvision.ops.
No Ray.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
from torchvision.ops import clip_boxes_to_image

from maskmodel.io.decode import DEFAULT_MAX_PIXELS, Decoded, decode


def decode_photo(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None) -> Decoded:
    """The whole photo, decoded once for its detector and its face crops: RGB, EXIF-rotated, at most ``max_pixels``
    pixels (aspect kept); ``width``/``height`` are the original's. Raises
    :class:`~maskmodel.io.decode.DecodeError` with a short reason."""
    return decode(data, max_bytes=max_bytes, max_pixels=max_pixels)


def as_chw(image: np.ndarray) -> torch.Tensor:
    """A decoded picture ``uint8 (h, w, 3)`` as ``(3, h, w)`` sharing its memory (read-only buffers from Ray are
    never written to: resizing makes new tensors, so torch's warning about them is silenced, not copied away)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(image).permute(2, 0, 1)


def big_enough(boxes: np.ndarray, min_face: float) -> np.ndarray:
    """``bool (K,)``: faces whose shorter side is at least ``min_face`` pixels (``boxes`` in ORIGINAL pixels)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= min_face


def to_decoded(boxes: np.ndarray, size: tuple[int, int], decoded: tuple[int, int]) -> np.ndarray:
    """``(K, 4)`` boxes in the original's pixels (``size = (width, height)``) -> the decoded picture's
    (``decoded = (w, h)``), float32."""
    (width, height), (w, h) = size, decoded
    return np.asarray(boxes, np.float32).reshape(-1, 4) * np.array([w / width, h / height] * 2, np.float32)


def grow(boxes: torch.Tensor, margin: float) -> torch.Tensor:
    """``(K, 4)`` boxes grown by ``margin`` times their own width / height on each side (not clipped)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) * margin
    return boxes + wh * boxes.new_tensor([-1.0, -1.0, 1.0, 1.0])


def crop_boxes(boxes: torch.Tensor, margin: float, size: tuple[int, int]) -> torch.Tensor:
    """Where to cut each face: ``(K, 4)`` face boxes grown by ``margin`` and clipped to the picture
    (``size = (height, width)``, torchvision's order), same dtype and device."""
    return clip_boxes_to_image(grow(boxes, margin), size)


def cut(image: np.ndarray, boxes: np.ndarray, crop: Callable[[torch.Tensor], torch.Tensor],
        crop_size: int) -> torch.Tensor:
    """Classifier inputs ``uint8 (K, 3, S, S)`` of crop ``boxes`` (float ``(K, 4)``, decoded pixels) in ``image``
    (uint8 ``(h, w, 3)``); ``S = crop_size``, what ``crop`` returns.

    Each box is cut at the decode's resolution (pixel-aligned outwards, at
    least one pixel) and given to ``crop`` as a whole image would be, so a face
    is only upsampled when the file itself holds fewer pixels of it than the
    classifier's input.
    """
    chw = as_chw(image)
    h, w = image.shape[:2]
    out = []
    for x0, y0, x1, y1 in np.asarray(boxes, np.float32).reshape(-1, 4).tolist():
        c0, r0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        c1, r1 = min(w, max(c0 + 1, math.ceil(x1))), min(h, max(r0 + 1, math.ceil(y1)))
        out.append(crop(chw[:, r0:r1, c0:c1]))
    return torch.stack(out) if out else torch.zeros((0, 3, crop_size, crop_size), dtype=torch.uint8)


def face_crops(image: np.ndarray, boxes: np.ndarray, size: tuple[int, int], *, margin: float, min_face: float,
               crop: Callable[[torch.Tensor], torch.Tensor], crop_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """The faces of one decoded photo as the classifier sees them at scoring time.

    ``image``: uint8 ``(h, w, 3)`` from :func:`decode_photo`; ``boxes``: float
    ``(K, 4)`` in ORIGINAL pixels; ``size``: the original's ``(width, height)``.
    Returns ``(crops uint8 (k, 3, S, S), kept bool (K,))``: one crop per face
    at least ``min_face`` original pixels across, in ``boxes`` order.
    """
    kept = big_enough(boxes, min_face)
    h, w = image.shape[:2]
    decoded = torch.from_numpy(to_decoded(np.asarray(boxes, np.float32).reshape(-1, 4)[kept], size, (w, h)))
    return cut(image, crop_boxes(decoded, margin, (h, w)).numpy(), crop, crop_size), kept


__all__ = ["DEFAULT_MAX_PIXELS", "as_chw", "big_enough", "crop_boxes", "cut", "decode_photo", "face_crops", "grow",
           "to_decoded"]
