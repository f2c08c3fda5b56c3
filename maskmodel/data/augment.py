"""Training augmentation on the worker's device: batched, every image with its own random parameters.

The CPU side of training does only what needs the full picture: a reduced-size
JPEG decode, then :class:`maskmodel.data.transforms.TrainCrop` (random resized crop
and flip) to ``uint8 (3, S, S)``. What is left of the study's augmentation
(random rotation, a light colour jitter) plus the conversion to normalised
floats runs here, on the GPU with ``--gpu``, on a whole batch at once: a
GPU does it in microseconds per image, where the CPU spent milliseconds.

Same effect as torchvision's ``RandomRotation(degrees)`` (black corners, the
picture turned about its centre, bilinear here rather than nearest) and
``ColorJitter(brightness=j, contrast=j, saturation=j)`` (each factor uniform in
``[1 - j, 1 + j]``, applied brightness, contrast, saturation, clamped to [0, 1]).

Occlusion (``occlusion=p``, off by default): with probability ``p`` a face crop
gets a shape over its lower face, and keeps its class, so that "something
covers the mouth" stops meaning "mask" (the study's failure mode: faces behind
paper or a hand). The shapes are drawn unlike the synthetic data's own hard
negatives (:mod:`maskmodel.data.drawing`: skin-coloured hands with fingers,
nails and a wrist; white sheets with lines of text held by two thumbs), so a
benchmark on those hard negatives measures transfer, not recall of the drawing:
a hand-like blob (an ellipse) or a paper-like card (a rotated rectangle), in one
flat random colour with pixel noise, no fingers, text or thumbs.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from maskmodel.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, standardize


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of ``(N, 3, H, W)`` floats, as ``(N, 1, H, W)`` (torchvision's rgb_to_grayscale)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


class DeviceAugment:
    """``uint8 (N, 3, S, S)`` on any device to normalised ``float32``, randomly rotated and colour-jittered per image.

    ``generator`` (a ``torch.Generator`` on the batch's device) makes the draw
    reproducible. With ``rotation_degrees=0`` and ``jitter=0`` the result is
    exactly :func:`maskmodel.data.transforms.normalize`.
    """

    def __init__(self, *, rotation_degrees: float = 15.0, jitter: float = 0.2, occlusion: float = 0.0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.rotation_degrees, self.jitter, self.occlusion = float(rotation_degrees), float(jitter), float(occlusion)
        self.mean, self.std = tuple(mean), tuple(std)

    def params(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-image angles (degrees) and brightness / contrast / saturation factors."""
        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)

        d, j = self.rotation_degrees, self.jitter
        return {"angle": uniform(-d, d), "brightness": uniform(1 - j, 1 + j), "contrast": uniform(1 - j, 1 + j),
                "saturation": uniform(1 - j, 1 + j)}

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.rotation_degrees and not self.jitter and not self.occlusion:
            return normalize(batch, mean=self.mean, std=self.std)
        p = self.params(batch.shape[0], batch.device, generator)
        x = batch.to(torch.float32) / 255.0
        if self.occlusion:
            x = occlude(x, self.occlusion, generator)
        if self.rotation_degrees:
            x = rotate(x, p["angle"])
        if self.jitter:
            x = (x * p["brightness"].view(-1, 1, 1, 1)).clamp(0, 1)
            m = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - m) * p["contrast"].view(-1, 1, 1, 1) + m).clamp(0, 1)
            g = _grey(x)
            x = ((x - g) * p["saturation"].view(-1, 1, 1, 1) + g).clamp(0, 1)
        return standardize(x, mean=self.mean, std=self.std)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of ``(N, C, H, W)`` floats about its centre by its own angle; outside is 0 (black)."""
    theta = degrees * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # affine_grid maps output to input coordinates in [-1, 1]; scale for non-square pictures.
    h, w = x.shape[-2:]
    matrix = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
    grid = F.affine_grid(matrix.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def occluder_masks(n: int, h: int, w: int, *, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``float32 (n, 1, h, w)`` in {0, 1}: one shape over the lower face of each crop (a tight face crop: the mouth
    at about 70 % of its height): an ellipse (hand-like) or a rotated rectangle (paper-like), chosen per image, with
    random size, centre and angle; covers about 10-40 % of the crop."""
    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, device=device, generator=generator)).view(n, 1, 1)

    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy, ang = u(0.35, 0.65), u(0.68, 0.9), u(-0.35, 0.35)  # radians: up to 20 degrees either way
    dx, dy = xx[None] - cx, yy[None] - cy
    cos, sin = torch.cos(ang), torch.sin(ang)
    rx_, ry_ = dx * cos + dy * sin, -dx * sin + dy * cos  # coordinates in the shape's own frame
    ax, ay = u(0.18, 0.34), u(0.1, 0.2)  # half-width and half-height, in crop units: the top 36 % stays clear
    ellipse = (rx_ / ax) ** 2 + (ry_ / ay) ** 2 <= 1
    rectangle = (rx_.abs() <= ax) & (ry_.abs() <= ay)
    is_ellipse = torch.rand(n, device=device, generator=generator).view(n, 1, 1) < 0.5
    return torch.where(is_ellipse, ellipse, rectangle).to(torch.float32)[:, None]


def occlude(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(N, 3, H, W)`` floats in [0, 1] with an occluder (:func:`occluder_masks`) pasted on each image with
    probability ``p``: a flat random colour with +/- 0.08 pixel noise."""
    n, _, h, w = x.shape
    mask = occluder_masks(n, h, w, device=x.device, generator=generator)
    mask = mask * (torch.rand(n, 1, 1, 1, device=x.device, generator=generator) < p).to(x.dtype)
    colour = torch.rand(n, 3, 1, 1, device=x.device, generator=generator)
    noise = (torch.rand(n, 3, h, w, device=x.device, generator=generator) - 0.5) * 0.16
    fill = (colour + noise).clamp(0, 1)
    return x * (1 - mask) + fill * mask
