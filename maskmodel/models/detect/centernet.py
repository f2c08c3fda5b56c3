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

import numpy as np
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


def batch_targets(boxes, counts, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """CenterNet targets of a padded batch at stride :data:`STRIDE`, built on the CPU (the data step's work).

    ``boxes``: float ``(N, B, 4)`` ``x0, y0, x1, y1`` in input pixels, the first ``counts[i]`` of row
    ``i`` real (``counts`` int ``(N,)``; ``-1``: an image the epoch could not read, learnt nothing from);
    ``shape``: the heatmap's ``(H, W)``. Numpy arrays or CPU tensors. Returns CPU tensors:
    ``heatmap`` float32 ``(N, 1, H, W)`` in [0, 1] (1 exactly at the centre cells; overlapping Gaussians
    take the maximum), ``cells`` int64 ``(N, B)`` (flat ``y * W + x`` of each centre, 0 where masked),
    ``size`` float32 ``(N, B, 2)`` (log(h/4), log(w/4)), ``offset`` float32 ``(N, B, 2)`` (dy, dx) in
    cells, ``mask`` bool ``(N, B)`` (a real box whose centre falls inside the heatmap) and ``valid``
    float32 ``(N,)`` (1 for an image to learn from). Each Gaussian is drawn in its own window only.
    """
    h, w = shape
    boxes = torch.as_tensor(boxes, dtype=torch.float32).cpu()
    counts = torch.as_tensor(counts, dtype=torch.int64).cpu()
    n, b = boxes.shape[:2]
    real = torch.arange(b).view(1, b) < counts.view(n, 1)
    bw = (boxes[..., 2] - boxes[..., 0]).clamp(min=1.0)
    bh = (boxes[..., 3] - boxes[..., 1]).clamp(min=1.0)
    # The decode puts a centre at (cell + offset + 0.5) * stride: the cell is the rounded centre in those units.
    cx = (boxes[..., 0] + boxes[..., 2]) / 2 / STRIDE - 0.5
    cy = (boxes[..., 1] + boxes[..., 3]) / 2 / STRIDE - 0.5
    x, y = torch.round(cx), torch.round(cy)
    mask = real & (x >= 0) & (x < w) & (y >= 0) & (y < h)
    radius = gaussian_radius(bh / STRIDE, bw / STRIDE).clamp(min=0).floor()
    heatmap = np.zeros((n, 1, h, w), np.float32)
    for (i, _), r, xi, yi in zip(mask.nonzero().tolist(), radius[mask].int().tolist(), x[mask].int().tolist(),
                                 y[mask].int().tolist()):
        two_sigma_sq = np.float32(2) * np.float32((2 * r + 1) / 6) ** 2
        y0, y1, x0, x1 = max(0, yi - r), min(h, yi + r + 1), max(0, xi - r), min(w, xi + r + 1)
        dy = np.arange(y0 - yi, y1 - yi, dtype=np.float32).reshape(-1, 1)
        dx = np.arange(x0 - xi, x1 - xi, dtype=np.float32).reshape(1, -1)
        window = heatmap[i, 0, y0:y1, x0:x1]
        np.maximum(window, np.exp(-(dx * dx + dy * dy) / two_sigma_sq), out=window)
    keep = mask.float().unsqueeze(-1)
    return {"heatmap": torch.from_numpy(heatmap), "cells": torch.where(mask, y * w + x, 0).long(),
            "size": torch.stack([torch.log(bh / STRIDE), torch.log(bw / STRIDE)], dim=-1) * keep,
            "offset": torch.stack([cy - y, cx - x], dim=-1) * keep, "mask": mask,
            "valid": (counts >= 0).float()}


#: What :func:`batch_targets` returns: the keys a batch carries to :func:`masked_loss`.
TARGET_KEYS = ("heatmap", "cells", "size", "offset", "mask", "valid")


def targets(boxes: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """CenterNet targets of one image's faces (float ``(K, 4)``, K may be 0): :func:`batch_targets` of a batch of one.

    Returns ``heatmap`` ``(1, H, W)`` and, for the boxes whose centre falls inside it, ``cells`` ``(K',)``,
    ``size`` ``(K', 2)`` and ``offset`` ``(K', 2)``.
    """
    t = batch_targets(boxes.float().cpu().reshape(1, -1, 4), [len(boxes)], shape)
    m = t["mask"][0]
    return {"heatmap": t["heatmap"][0], "cells": t["cells"][0][m], "size": t["size"][0][m],
            "offset": t["offset"][0][m]}


def focal_loss(pred: torch.Tensor, gt: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss summed over the batch (not normalised); ``pred`` is a probability.

    ``weight``: float ``(N,)``, each image's share (0 leaves an image out without a host sync).
    """
    pred = pred.clamp(EPS, 1 - EPS)
    pos = gt.eq(1).float()
    pos_loss = torch.log(pred) * (1 - pred) ** ALPHA * pos
    neg_loss = torch.log(1 - pred) * pred ** ALPHA * (1 - gt) ** BETA * (1 - pos)
    per_image = (pos_loss + neg_loss).flatten(1).sum(1)
    return -(per_image if weight is None else per_image * weight).sum()


def masked_loss(outputs, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CenterFace training loss from padded targets (:func:`batch_targets`, on the outputs' device).

    ``outputs``: the network's (heatmap (N, 1, H, W) probabilities, scale (N, 2, H, W), offset (N, 2, H, W),
    landmarks (N, 10, H, W)). Returns ``{"heatmap", "size", "offset", "landmarks"}`` scalar tensors, each
    normalised by the number of faces; padding, faces outside the heatmap and images with ``valid == 0``
    count in none. No host sync: every count stays a tensor.
    """
    heatmap, scale, offset, landmarks = outputs[:4]
    n, _, h, w = heatmap.shape
    mask = t["mask"].float().unsqueeze(-1)  # (N, B, 1)
    norm = t["mask"].sum().clamp(min=1).float()
    index = t["cells"].unsqueeze(-1).expand(-1, -1, 2)  # (N, B, 2)

    def at_cells(head: torch.Tensor) -> torch.Tensor:  # (N, 2, H, W) -> (N, B, 2): the head read at each centre
        return head.float().reshape(n, 2, h * w).transpose(1, 2).gather(1, index)

    return {"heatmap": focal_loss(heatmap.float(), t["heatmap"], t["valid"]) / norm,
            "size": SIZE_WEIGHT * ((at_cells(scale) - t["size"]).abs() * mask).sum() / norm,
            "offset": OFFSET_WEIGHT * ((at_cells(offset) - t["offset"]).abs() * mask).sum() / norm,
            "landmarks": landmarks.float().sum() * 0.0}


def loss(outputs: tuple[torch.Tensor, ...] | list[torch.Tensor], boxes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`masked_loss` with the targets of per-image boxes (float ``(K_i, 4)`` in input pixels) built here."""
    from torch.nn.utils.rnn import pad_sequence

    h, w = outputs[0].shape[-2:]
    padded = pad_sequence([b.float().cpu().reshape(-1, 4) for b in boxes], batch_first=True) if boxes else None
    if padded is None or padded.shape[1] == 0:
        padded = torch.zeros(len(boxes), 1, 4)
    made = batch_targets(padded, [len(b) for b in boxes], (h, w))
    return masked_loss(outputs, {k: v.to(outputs[0].device) for k, v in made.items()})


class CenterFaceNet(torch.nn.Module):
    """CenterFace for training: ``network`` (the converted graph) with the interface the detector loop drives.

    ``forward(images)``: ``images`` float ``(N, 3, H, W)`` pixel values 0..255
    (CenterFace's own input; sides multiples of 32) -> the four heads (eval),
    or with ``boxes`` (per image float ``(K_i, 4)`` in input pixels) the
    :func:`loss` dict (training), or with the padded targets of :func:`batch_targets` (a dict, on the
    device) the :func:`masked_loss` dict. ``state_dict`` of :attr:`network` is what a
    detector directory of architecture ``centerface`` holds.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor] | dict[str, torch.Tensor] | None = None):
        out = self.network(images)
        if boxes is None:
            return out
        # Padded targets built in the data step (training), or per-image boxes whose targets are built here.
        return masked_loss(out, boxes) if isinstance(boxes, dict) else loss(out, boxes)


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
