"""torchvision's detection zoo as face detectors: two classes (background, face), one input convention.

:class:`TorchvisionFaceNet` is the adapter: it wraps a torchvision detector
(Faster R-CNN, SSDlite) so it takes what every detector of
:class:`~maskmodel.models.detect.detector.FaceDetector` takes, a float32
``(N, 3, H, W)`` batch of pixel values 0..255 already letterboxed to the
detector's input size, and it turns off torchvision's own resize (its
``GeneralizedRCNNTransform`` is set to the batch's size on every call, so
the letterbox is the only resize: training, validation and scoring see the
same pixels). In eval mode it returns torchvision's list of
``{"boxes", "scores", "labels"}`` per image, in input pixels; :func:`decode`
turns that into the candidate boxes the shared NMS and limits take. In train
mode, given boxes per image, it returns torchvision's loss dict.

Weights: ``none`` builds from scratch (no ImageNet backbone either: nothing
downloads), ``coco`` loads torchvision's COCO detection weights for every
tensor but the 91-class heads (downloaded into torch's hub cache; a plain
:class:`UserError` when that fails), any other value is the URI of a state dict
of this adapter (``model.`` keys) or of the bare torchvision model.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Callable

import torch
import torchvision.models.detection as tvdet

from maskmodel.errors import UserError

log = logging.getLogger(__name__)

FACE_LABEL = 1  # torchvision detectors reserve label 0 for the background
NUM_CLASSES = 2

#: architecture -> (builder, its COCO weights enum). The first two run on CPUs; ResNet-50 FPN is for GPUs.
ZOO: dict[str, tuple[Callable[..., torch.nn.Module], Any]] = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": (tvdet.fasterrcnn_mobilenet_v3_large_320_fpn,
                                              tvdet.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1),
    "ssdlite320_mobilenet_v3_large": (tvdet.ssdlite320_mobilenet_v3_large,
                                      tvdet.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1),
    "fasterrcnn_resnet50_fpn": (tvdet.fasterrcnn_resnet50_fpn, tvdet.FasterRCNN_ResNet50_FPN_Weights.COCO_V1),
}
WEIGHT_KEYWORDS = ("coco", "none")


class TorchvisionFaceNet(torch.nn.Module):
    """The adapter of the module docstring around a torchvision detector ``model``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor] | None = None):
        """``images``: float ``(N, 3, H, W)`` 0..255; ``boxes`` (training): per image float ``(K, 4)``
        ``x0, y0, x1, y1`` in input pixels, every one a face (:data:`FACE_LABEL`)."""
        targets = None if boxes is None else [
            {"boxes": b.float(), "labels": torch.full((len(b),), FACE_LABEL, dtype=torch.int64, device=b.device)}
            for b in boxes]
        h, w = int(images.shape[-2]), int(images.shape[-1])
        t = self.model.transform
        if t.fixed_size is not None:  # SSD: a fixed (width, height)
            t.fixed_size = (w, h)
        else:  # R-CNN: scale = min(min_size / short side, max_size / long side) = 1
            t.min_size, t.max_size = (min(h, w),), max(h, w)
        return self.model(list(images / 255.0), targets)


def build(arch: str) -> TorchvisionFaceNet:
    """``arch`` of :data:`ZOO` with two classes and random weights (nothing downloads)."""
    if arch not in ZOO:
        raise UserError(f"Unknown detector architecture {arch!r}; choose one of {sorted(ZOO)}.")
    builder, _ = ZOO[arch]
    # The card's threshold decides what is a face; torchvision's own floor only bounds the candidates (SSD's is 0.001).
    extra = {"box_score_thresh": 0.01} if arch.startswith("fasterrcnn") else {}
    return TorchvisionFaceNet(builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **extra))


def load_matching(net: TorchvisionFaceNet, state: dict[str, torch.Tensor], source: str) -> int:
    """Copy every tensor of ``state`` whose name and shape fit ``net`` (bare-model keys get ``model.``).

    The class heads of a 91-class COCO model do not fit and keep their
    initialisation. Returns how many tensors were loaded; raises
    :class:`UserError` when none fits (not a state dict of this architecture).
    """
    own = net.state_dict()
    fitted = {}
    for k, v in state.items():
        key = k if k in own else f"model.{k}"
        if key in own and isinstance(v, torch.Tensor) and own[key].shape == v.shape:
            fitted[key] = v
    if not fitted:
        raise UserError(f"{source!r} holds no tensor of a {type(net.model).__name__} of this architecture; "
                        f"pass a state dict saved from the same --arch.")
    net.load_state_dict(fitted, strict=False)
    log.info("loaded %d of %d tensors from %s", len(fitted), len(own), source)
    return len(fitted)


def coco_state(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's COCO detection weights of ``arch`` (downloaded once into torch's hub cache)."""
    _, weights = ZOO[arch]
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # noqa: BLE001 - urllib, SSL, proxy, disk: all mean "could not download"
        raise UserError(f"Could not download torchvision's COCO weights for {arch} from {weights.url} "
                        f"({type(e).__name__}: {e}); pass --weights none to train from scratch, or the URI of a "
                        f"state dict.") from e


def state_from_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """A state dict read from ``data``; :class:`UserError` when it is not one."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is the user's
        raise UserError(f"{source!r} is not a torch state dict ({type(e).__name__}).") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint
    if not isinstance(state, dict):
        raise UserError(f"{source!r} is not a torch state dict (it holds a {type(state).__name__}).")
    return state


def initial(arch: str, weights: str, read_bytes: Callable[[str], bytes]) -> TorchvisionFaceNet:
    """``arch`` with ``weights``: ``none``, ``coco`` or the URI of a state dict (read with ``read_bytes``)."""
    net = build(arch)
    if weights == "coco":
        load_matching(net, coco_state(arch), f"torchvision COCO weights of {arch}")
    elif weights != "none":
        load_matching(net, state_from_bytes(read_bytes(weights), weights), weights)
    return net


def build_from_weights(arch: str) -> Callable[[bytes, str, str], torch.nn.Module]:
    """The ``build`` of a detector directory holding a state dict of ``arch`` (see ``detector.ARCHITECTURES``)."""
    def build_it(data: bytes, name: str, source: str) -> torch.nn.Module:
        net = build(arch)
        try:
            net.load_state_dict(state_from_bytes(data, source))
        except RuntimeError as e:
            raise UserError(f"{source!r} is not a state dict of {arch} ({str(e).splitlines()[0]}).") from e
        return net.eval()
    return build_it


def decode(outputs: list[dict[str, torch.Tensor]], *, input_size: tuple[int, int], threshold: float,
           top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's per-image outputs -> candidate ``(boxes (M, 4), scores (M,), image_index (M,) int64)``.

    Face boxes only, scoring above ``threshold``, at most ``top_k`` per image
    (torchvision returns them sorted by score); boxes in input pixels.
    """
    del input_size  # boxes already are in input pixels
    boxes, scores, index = [], [], []
    for i, o in enumerate(outputs):
        keep = (o["labels"] == FACE_LABEL) & (o["scores"] > threshold)
        b, s = o["boxes"][keep][:top_k].float(), o["scores"][keep][:top_k].float()
        boxes.append(b)
        scores.append(s)
        index.append(torch.full((len(s),), i, dtype=torch.int64, device=s.device))
    if not outputs:
        return torch.zeros((0, 4)), torch.zeros((0,)), torch.zeros((0,), dtype=torch.int64)
    return torch.cat(boxes), torch.cat(scores), torch.cat(index)
