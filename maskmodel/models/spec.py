"""What a job's config may name, without importing torch: architectures, weight keywords, detection options.

The configs (:mod:`maskmodel.train.config`, :mod:`maskmodel.score.plan`) build every
``--help`` from these, so ``python -m jobs.X --help`` imports neither torch nor Ray; the
modules that build the networks (:mod:`.classifier`, :mod:`.detect.trainable`,
:mod:`.detect.geometry`, :mod:`.precision`) take their names from here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: The classifier's torchvision architectures.
CLASSIFIER_ARCHITECTURES = ("resnet50", "resnet34", "resnet18")
#: Classifier --weights values that name a source rather than a file (every other value is a URI of a state dict).
CLASSIFIER_WEIGHT_KEYWORDS = ("imagenet", "none")
#: Trainable detectors: CenterFace, then torchvision's zoo (the MobileNet ones for CPUs, ResNet-50 FPN for GPUs).
DETECTOR_ARCHITECTURES = ("centerface", "fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large",
                          "fasterrcnn_resnet50_fpn")
#: Detector --weights values that name a source rather than a file.
DETECTOR_WEIGHT_KEYWORDS = ("pretrained", "coco", "none")
#: ``model.json`` metric: share of held-out images where bf16 gives the fp32 label
#: (see :func:`maskmodel.models.precision.label_agreement`).
BF16_AGREEMENT_KEY = "bf16_label_agreement"
STRIDE = 32  # input sides must be multiples of this: the backbones downsample by 32


@dataclass(frozen=True)
class DetectOptions:
    """What counts as a face: thresholds and limits, in the units each field names."""

    input_size: tuple[int, int] = (640, 384)  # detector input (width, height), multiples of 32; 16:9 photos fill it
    score_threshold: float = 0.5  # detector score a candidate needs (CenterFace's reference default)
    nms_iou: float = 0.3  # overlap above which the lower-scoring of two boxes is dropped (CenterFace's reference)
    max_faces: int = 32  # faces kept per image, highest scores first; the rest are counted in ``dropped_max``
    min_face: float = 8.0  # shorter side in ORIGINAL pixels a face needs; smaller ones are counted, not kept
    margin: float = 0.25  # crop boxes grow by this share of the face's width/height on each side

    def __post_init__(self) -> None:
        w, h = self.input_size
        if w < STRIDE or h < STRIDE or w % STRIDE or h % STRIDE:
            raise ValueError(f"detector input size must be multiples of {STRIDE} and at least {STRIDE}, got {w}x{h}")
        if not 0.0 <= self.score_threshold < 1.0:
            raise ValueError(f"score threshold must be in [0, 1), got {self.score_threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"NMS IoU must be in (0, 1], got {self.nms_iou}")
        if self.max_faces < 1:
            raise ValueError(f"max faces must be at least 1, got {self.max_faces}")
        if self.min_face < 0:
            raise ValueError(f"min face size must be zero or positive, got {self.min_face}")
        if not 0.0 <= self.margin <= 2.0:
            raise ValueError(f"crop margin must be between 0 and 2, got {self.margin}")

    def but(self, **changes) -> "DetectOptions":
        """A copy with ``changes`` applied (``None`` values ignored), validated again."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
