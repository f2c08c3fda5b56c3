"""Fine-tuning CenterFace: CenterNet's training targets and loss, and the module the detector training drives.

CenterFace (:mod:`maskmodel.models.detect.centerface`) is a CenterNet: a face
is the peak of a centre heatmap at stride 4, with its size and sub-cell offset
read at that cell. Training it is CenterNet's recipe, from Zhou, Wang and
Krähenbühl, "Objects as Points" (2019), reference code
github.com/xingyizhou/CenterNet:

- heatmap target: at each face's centre cell a 2-D Gaussian of standard
  deviation ``(2r + 1) / 6`` truncated at radius ``r``, where ``r`` is the
  radius by which a box's corners may move and keep IoU ``>= 0.7`` with it
  (``gaussian_radius`` and ``draw_umich_gaussian`` in ``src/lib/utils/image.py``,
  the CornerNet rule); overlapping Gaussians take the maximum;
- heatmap loss: the penalty-reduced pixel-wise focal loss, alpha 2, beta 4,
  normalised by the number of faces (``_neg_loss`` in ``src/lib/models/losses.py``);
- size and offset: L1 at the centre cells only, normalised the same way. The
  size is CenterFace's: ``log(height / 4)``, ``log(width / 4)`` (what
  :func:`~maskmodel.models.detect.centerface.decode` inverts); the offset is
  ``(dy, dx)`` of the centre from its cell, in cells.

Weights: ``1`` for the heatmap, :data:`OFFSET_WEIGHT` (1, as CenterNet and
CenterFace) for the offset and :data:`SIZE_WEIGHT` for the size. CenterFace's
paper (Xu et al. 2020) weights its box term 0.1; here it is 1, the weight
CenterNet gives its offset, because log-size errors are already of the
offset's order (below 1 for boxes within a factor e of the truth). 0.1 was not
tried; what 1 gives is measured in ``benchmarks/detector_choice.py``. The
landmark head has no targets here (no public face-mask set annotates
landmarks): its output joins the loss with weight 0, so data-parallel training
sees a gradient for every parameter.
"""

from __future__ import annotations

import math

import torch

from maskmodel.models.detect import centerface

ARCHITECTURE = centerface.ARCHITECTURE
STRIDE = 4
MIN_OVERLAP = 0.7  # CenterNet's gaussian_radius(min_overlap=0.7)
SIZE_WEIGHT = 1.0
OFFSET_WEIGHT = 1.0
ALPHA, BETA = 2.0, 4.0  # the focal loss' exponents (CenterNet)
EPS = 1e-4  # CenterNet clamps the sigmoid to [1e-4, 1 - 1e-4] before the logs


def gaussian_radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float = MIN_OVERLAP) -> torch.Tensor:
    """CornerNet's radius (in the unit of ``height``/``width``, float tensors of shape (K,)) for IoU ``min_overlap``.

    The smallest of the three quadratic roots of CenterNet's ``gaussian_radius``
    (``src/lib/utils/image.py``), kept as written there.
    """
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def targets(boxes: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """CenterNet targets of one image's faces at stride :data:`STRIDE`.

    ``boxes``: float ``(K, 4)`` ``x0, y0, x1, y1`` in input pixels (K may be 0);
    ``shape``: the heatmap's ``(H, W)``. Returns ``heatmap`` float ``(1, H, W)``
    in [0, 1] (1 exactly at the centre cells), ``cells`` int64 ``(K,)`` (flat
    ``y * W + x`` of each centre), ``size`` float ``(K, 2)`` (log(h/4),
    log(w/4)) and ``offset`` float ``(K, 2)`` (dy, dx) in cells. Boxes whose
    centre falls outside the heatmap are dropped.
    """
    h, w = shape
    boxes = boxes.float()
    bw, bh = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0), (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    # The decode puts a centre at (cell + offset + 0.5) * stride: the cell is the rounded centre in those units.
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / STRIDE - 0.5, (boxes[:, 1] + boxes[:, 3]) / 2 / STRIDE - 0.5
    x, y = torch.round(cx), torch.round(cy)
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    x, y, cx, cy, bw, bh = x[inside], y[inside], cx[inside], cy[inside], bw[inside], bh[inside]
    radius = gaussian_radius(bh / STRIDE, bw / STRIDE).clamp(min=0).floor()
    sigma = (2 * radius + 1) / 6
    ys = torch.arange(h, dtype=torch.float32, device=boxes.device).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=boxes.device).view(1, 1, w)
    dy, dx = ys - y.view(-1, 1, 1), xs - x.view(-1, 1, 1)
    g = torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma.view(-1, 1, 1) ** 2))
    g = g * ((dx.abs() <= radius.view(-1, 1, 1)) & (dy.abs() <= radius.view(-1, 1, 1)))
    heatmap = g.amax(dim=0, keepdim=True) if len(g) else torch.zeros((1, h, w), device=boxes.device)
    return {"heatmap": heatmap, "cells": (y * w + x).long(),
            "size": torch.stack([torch.log(bh / STRIDE), torch.log(bw / STRIDE)], dim=1),
            "offset": torch.stack([cy - y, cx - x], dim=1)}


def focal_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss summed over the batch (not normalised); ``pred`` is a probability."""
    pred = pred.clamp(EPS, 1 - EPS)
    pos = gt.eq(1).float()
    pos_loss = torch.log(pred) * (1 - pred) ** ALPHA * pos
    neg_loss = torch.log(1 - pred) * pred ** ALPHA * (1 - gt) ** BETA * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum())


def loss(outputs: tuple[torch.Tensor, ...] | list[torch.Tensor], boxes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CenterFace training loss of a batch: ``{"heatmap", "size", "offset", "landmarks"}`` scalars.

    ``outputs``: the network's (heatmap (N, 1, H, W) probabilities, scale (N, 2, H, W), offset (N, 2, H, W),
    landmarks (N, 10, H, W)); ``boxes``: per image float ``(K_i, 4)`` in input pixels.
    """
    heatmap, scale, offset, landmarks = outputs[:4]
    n, _, h, w = heatmap.shape
    made = [targets(b.to(heatmap.device), (h, w)) for b in boxes]
    gt = torch.stack([t["heatmap"] for t in made])
    faces = sum(len(t["cells"]) for t in made)
    norm = max(faces, 1)
    size_err, off_err = heatmap.new_zeros(()), heatmap.new_zeros(())
    for i, t in enumerate(made):
        if len(t["cells"]):
            size_err = size_err + (scale[i].float().reshape(2, h * w)[:, t["cells"]].T - t["size"]).abs().sum()
            off_err = off_err + (offset[i].float().reshape(2, h * w)[:, t["cells"]].T - t["offset"]).abs().sum()
    return {"heatmap": focal_loss(heatmap.float(), gt) / norm, "size": SIZE_WEIGHT * size_err / norm,
            "offset": OFFSET_WEIGHT * off_err / norm, "landmarks": landmarks.float().sum() * 0.0}


class CenterFaceNet(torch.nn.Module):
    """CenterFace for training: ``network`` (the converted graph) with the interface the detector loop drives.

    ``forward(images)``: ``images`` float ``(N, 3, H, W)`` pixel values 0..255
    (CenterFace's own input; sides multiples of 32) -> the four heads (eval),
    or with ``boxes`` (per image float ``(K_i, 4)`` in input pixels) the
    :func:`loss` dict (training). ``state_dict`` of :attr:`network` is what a
    detector directory of architecture ``centerface`` holds.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor] | None = None):
        out = self.network(images)
        return out if boxes is None else loss(out, boxes)


def reset(network: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``network`` with fresh weights (``--weights none``): every layer's own ``reset_parameters``.

    The heatmap's last bias starts at ``-log((1 - 0.01) / 0.01)`` (prior 0.01), as CenterNet and RetinaNet
    initialise it, so the first steps are not swamped by the background.
    """
    torch.manual_seed(seed)
    for m in network.modules():
        if hasattr(m, "reset_parameters") and m is not network:
            m.reset_parameters()
    heads = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1]
    if heads and heads[-1].bias is not None:
        torch.nn.init.constant_(heads[-1].bias, -math.log((1 - 0.01) / 0.01))
    return network
