"""Training and evaluation transforms as small keyword-only callables.

The presets take a ``uint8`` tensor ``(3, H, W)`` (what :mod:`maskmodel.decode`
yields) and return a normalised ``float32`` tensor ``(3, S, S)``. Evaluation is
split in two: :class:`EvalCrop` (resize + crop, uint8, on the CPU next to the
decoder) and :func:`normalize` (batched, on the model's device). Built on
``torchvision.transforms.v2``; no Ray.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_for(crop_size: int) -> int:
    """The resize edge used before a centre crop of ``crop_size`` (the 0.875 ImageNet ratio)."""
    return int(round(crop_size / 0.875))


class TrainPreset:
    """Random resized crop, horizontal flip, rotation and mild colour jitter, then normalise.

    The original study's augmentation (flip, rotation, crop) plus a light
    colour jitter; ``augment=False`` gives the eval transform instead, which
    is what ``--no-augment`` trains with.
    """

    def __init__(self, *, crop_size: int, augment: bool = True, hflip_prob: float = 0.5,
                 rotation_degrees: float = 15.0, scale: tuple[float, float] = (0.5, 1.0),
                 jitter: float = 0.2, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        if not augment:
            self._t = EvalPreset(crop_size=crop_size, mean=mean, std=std)
            return
        self._t = v2.Compose([
            v2.RandomResizedCrop(crop_size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(hflip_prob),
            v2.RandomRotation(rotation_degrees),
            v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ])

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self._t(img)


class EvalCrop:
    """Resize the short side to ``resize_size``, centre-crop ``crop_size``: ``uint8 (3, H, W)`` to ``uint8 (3, S, S)``.

    The CPU half of evaluation preprocessing; what crosses Ray's object store
    is this uint8 crop (a quarter of float32's bytes), and :func:`normalize`
    finishes the job on the device that runs the model. Deterministic.
    """

    def __init__(self, *, crop_size: int, resize_size: int | None = None) -> None:
        self.crop_size = crop_size
        self.resize_size = resize_size or resize_for(crop_size)
        self._t = v2.Compose([
            v2.Resize(self.resize_size, interpolation=InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(crop_size),
        ])

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self._t(img)


def normalize(batch: torch.Tensor, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 (N, 3, S, S)`` (any device) to normalised ``dtype`` on the same device, in one fused pass.

    Same arithmetic as ``ToDtype(scale=True)`` + ``Normalize``: ``(x / 255 - mean) / std``.
    """
    m = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return ((batch.to(torch.float32) / 255.0 - m) / s).to(dtype)


class EvalPreset:
    """:class:`EvalCrop` then :func:`normalize`, for one image: ``uint8 (3, H, W)`` to ``float32 (3, S, S)``."""

    def __init__(self, *, crop_size: int, resize_size: int | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.crop = EvalCrop(crop_size=crop_size, resize_size=resize_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return normalize(self.crop(img)[None], mean=self.mean, std=self.std)[0]


def denormalize(batch: torch.Tensor, *, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Undo :class:`v2.Normalize` for display: ``(N, 3, H, W)`` floats in ``[0, 1]``."""
    m = torch.tensor(mean, dtype=batch.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch * s + m).clamp(0, 1)
