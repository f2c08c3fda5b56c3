"""Finding faces in photos, and the annotated boxes they are measured against.

Owns: the face detectors (pretrained CenterFace, and detector model
directories with a ``detector.json`` card), letterboxing photos into the
detector's input, decoding its output to boxes in original pixels
(thresholds, NMS, limits, margins, clipping), and reading/writing box
annotations (COCO JSON, Pascal VOC XML).

May import: torch, torchvision, numpy, PIL, :mod:`maskmodel.io.storage` and
:mod:`maskmodel.errors`; nothing of Ray, scoring, results or training, which
import this package, not the other way round.
"""

from maskmodel.models.detect.card import CARD_FILE, DetectorCard, read_card, write_card
from maskmodel.models.detect.detector import PRETRAINED, FaceDetector, load_detector, save_detector
from maskmodel.models.detect.geometry import DetectOptions, Faces, Placement, letterbox, place, postprocess

__all__ = ["CARD_FILE", "PRETRAINED", "DetectOptions", "DetectorCard", "FaceDetector", "Faces",
           "Placement", "letterbox", "load_detector", "place", "postprocess",
           "read_card", "save_detector", "write_card"]
