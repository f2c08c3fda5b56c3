"""The detector card: ``detector.json`` in a detector model directory, everything needed to find faces with it.

A detector directory (local or object storage) holds the weights file the
card names and the card::

    {"format": "maskmodel-detector", "format_version": 1, "task": "face-detection", "classes": ["face"],
     "architecture": "centerface", "weights": "centerface.onnx", "sha256": "<hex of the weights file>",
     "model_id": "centerface-0123456789ab", "input_size": [640, 384], "score_threshold": 0.5, "nms_iou": 0.3,
     "source": "what made it", "metrics": {...}}

``input_size`` is (width, height), sides multiples of 32; ``score_threshold``
and ``nms_iou`` are the operating point the detector was validated at; scoring
may override them per run. ``model_id`` names the detector in every result
row. The next issue's detector training writes this card; the face stage reads
it. :func:`read_card` checks every field and that the weights still hash to
``sha256``, so a card never silently describes other weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.models.detect.geometry import DetectOptions

CARD_FILE = "detector.json"
FORMAT = "maskmodel-detector"
FORMAT_VERSION = 1
TASK = "face-detection"
CLASSES = ("face",)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class DetectorCard:
    """What ``detector.json`` holds (see the module docstring); construct through :meth:`from_dict` to validate."""

    architecture: str  # decoder and network family, e.g. "centerface"
    weights: str  # file name of the weights inside the detector directory (.onnx, or .pt state dict)
    sha256: str  # of the weights file's bytes
    model_id: str  # names the detector in result rows
    input_size: tuple[int, int] = DetectOptions.input_size  # (width, height), multiples of 32
    score_threshold: float = DetectOptions.score_threshold
    nms_iou: float = DetectOptions.nms_iou
    task: str = TASK
    classes: tuple[str, ...] = CLASSES
    source: str = ""  # where the weights came from (a package, a training run)
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. AP and recall at the operating point
    annotation_sets: tuple[dict[str, str], ...] = ()  # the label files it was trained on: [{"uri", "sha256"}]

    def options(self, **overrides: Any) -> DetectOptions:
        """Detection options at this card's input size and thresholds, with ``overrides`` (``None`` ignored)."""
        return DetectOptions(input_size=tuple(self.input_size), score_threshold=self.score_threshold,
                             nms_iou=self.nms_iou).but(**overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"], d["classes"] = list(self.input_size), list(self.classes)
        d["annotation_sets"] = [dict(a) for a in self.annotation_sets]
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "DetectorCard":
        """Validate a parsed card; :class:`UserError` naming ``where`` and the first bad field otherwise."""
        def bad(what: str) -> UserError:
            return UserError(f"The detector card {where!r} is not usable: {what}.")

        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise bad(f"it is not a {FORMAT} card (no \"format\": \"{FORMAT}\")")
        if d.get("format_version") != FORMAT_VERSION:
            raise bad(f"format_version {d.get('format_version')!r} is not {FORMAT_VERSION}; "
                      f"a newer maskmodel wrote it")
        if d.get("task") != TASK or list(d.get("classes", [])) != list(CLASSES):
            raise bad(f"task must be {TASK!r} with classes {list(CLASSES)}, got {d.get('task')!r} with "
                      f"{d.get('classes')!r}")
        for key in ("architecture", "weights", "sha256", "model_id"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise bad(f"{key!r} must be a non-empty string")
        if "/" in d["weights"] or d["weights"] in (".", ".."):
            raise bad(f"weights must be a file name inside the directory, got {d['weights']!r}")
        size = d.get("input_size", list(DetectOptions.input_size))
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise bad(f"input_size must be [width, height], got {size!r}")
        try:
            card = cls(architecture=d["architecture"], weights=d["weights"], sha256=d["sha256"],
                       model_id=d["model_id"], input_size=(size[0], size[1]),
                       score_threshold=float(d.get("score_threshold", DetectOptions.score_threshold)),
                       nms_iou=float(d.get("nms_iou", DetectOptions.nms_iou)), source=str(d.get("source", "")),
                       metrics=dict(d.get("metrics") or {}),
                       annotation_sets=tuple({"uri": str(a["uri"]), "sha256": str(a["sha256"])}
                                             for a in d.get("annotation_sets") or ()))
            card.options()  # validates sizes and thresholds
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)) from e
        return card


def read_card(uri: str) -> DetectorCard:
    """The validated card of the detector directory ``uri``; :class:`UserError` when absent or invalid."""
    path = storage.join(uri, CARD_FILE)
    raw = storage.read_json_object(
        path, missing=f"{uri!r} is neither a known detector (centerface) nor a detector model directory "
                      f"(no {CARD_FILE} there).", fix="re-export it with jobs.train_detector.")
    return DetectorCard.from_dict(raw, path)


def write_card(uri: str, card: DetectorCard) -> str:
    """Write ``card`` as ``<uri>/detector.json`` (after validating it); returns the card's URI."""
    DetectorCard.from_dict(card.to_dict(), f"{uri} (being written)")
    path = storage.join(uri, CARD_FILE)
    storage.write_text(path, json.dumps(card.to_dict(), indent=2) + "\n")
    return path


def read_weights(uri: str, card: DetectorCard) -> bytes:
    """The weights file a card names, checked against its ``sha256``; :class:`UserError` if missing or changed."""
    path = storage.join(uri, card.weights)
    if not storage.exists(path):
        raise UserError(f"The detector directory {uri!r} lacks {card.weights!r}, the weights its {CARD_FILE} names.")
    data = storage.read_bytes(path)
    if sha256(data) != card.sha256:
        raise UserError(f"{path!r} does not match the sha256 in {CARD_FILE}: the weights were changed after the "
                        f"card was written; write the card again or restore the file.")
    return data
