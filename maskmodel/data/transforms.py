"""Training and evaluation transforms as small keyword-only callables.

Preprocessing is split in two. Next to the decoder, on CPUs, ``uint8 (3, H, W)``
(what :mod:`maskmodel.io.decode` yields) becomes a ``uint8 (3, S, S)`` crop:
:class:`EvalCrop` (resize + centre crop) or :class:`TrainCrop` (random resized
crop + flip); that is what crosses Ray's object store, a quarter of float32's
bytes. On the model's device, whole batches become normalised floats:
:func:`normalize`, or for training :class:`maskmodel.data.augment.DeviceAugment`.
:class:`EvalPreset` chains the halves for one image; :func:`preprocess_image`
decodes and crops one file's bytes, for scoring and for the training job's
bf16 check alike. Built on ``torchvision.transforms.v2``; no Ray.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from maskmodel.io.decode import decode, to_uint8_chw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_for(crop_size: int) -> int:
    """The resize edge used before a centre crop of ``crop_size`` (the 0.875 ImageNet ratio)."""
    return int(round(crop_size / 0.875))


class TrainCrop:
    """The CPU half of training augmentation: random resized crop and horizontal flip, ``uint8`` in and out.

    The original study's augmentation is flip, rotation and crop (plus, here,
    a light colour jitter). Crop and flip need the whole decoded picture, so
    they run next to the decoder; rotation, jitter and normalisation run on
    the worker's device on whole batches (:class:`maskmodel.data.augment.DeviceAugment`).
    """

    def __init__(self, *, crop_size: int, hflip_prob: float = 0.5, scale: tuple[float, float] = (0.5, 1.0)) -> None:
        self.crop_size, self.scale = crop_size, scale
        self._t = v2.Compose([v2.RandomResizedCrop(crop_size, scale=scale, antialias=True),
                              v2.RandomHorizontalFlip(hflip_prob)])

    @property
    def decode_side(self) -> int:
        """The short side a JPEG must keep when decoded at reduced size, so that even the smallest random
        crop (``scale[0]`` of the area) still has ``crop_size`` pixels across: ``crop_size / sqrt(scale[0])``."""
        return math.ceil(self.crop_size / math.sqrt(self.scale[0]))

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


def preprocess_image(data: bytes, crop: Any, *, max_bytes: int | None = None,
                     reduce_to: int | None = None) -> tuple[np.ndarray, int, int]:
    """Decode (at the reduced size ``crop`` needs) and crop one image: ``(uint8 (3, S, S), width, height)``.

    ``crop``: an :class:`EvalCrop` (``reduce_to`` defaults to its resize size)
    or, for training, a :class:`TrainCrop` with ``reduce_to`` given. ``width``/``height``
    are the original's. Raises :class:`DecodeError` if unusable.
    """
    d = decode(data, max_bytes=max_bytes, reduce_to=reduce_to or crop.resize_size)
    return crop(torch.from_numpy(to_uint8_chw(d.image))).numpy(), d.width, d.height


def normalize(batch: torch.Tensor, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 (N, 3, S, S)`` (any device) to normalised ``dtype`` on the same device, in one fused pass.

    Same arithmetic as ``ToDtype(scale=True)`` + ``Normalize``: ``(x / 255 - mean) / std``.
    """
    return standardize(batch.to(torch.float32) / 255.0, mean=mean, std=std).to(dtype)


@functools.lru_cache(maxsize=64)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as ``(1, 3, 1, 1)`` tensors on ``device``, made once per (values, dtype, device).

    Building them per call costs a pageable host-to-device copy, which synchronises the host with the GPU, on
    every training step and every predict call. Made outside inference mode, so that training may use them in
    autograd; nothing writes to them.
    """
    with torch.inference_mode(False):
        return (torch.tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1),
                torch.tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1))


def standardize(x: torch.Tensor, *, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Floats in ``[0, 1]`` ``(N, 3, H, W)`` (any device) to ``(x - mean) / std`` per channel, in ``x``'s dtype.

    The last step of :func:`normalize` and of :class:`maskmodel.data.augment.DeviceAugment`. The constants are
    cached per (values, dtype, device): no host-to-device copy, hence no host sync, after the first call.
    """
    m, s = _channel_constants(tuple(map(float, mean)), tuple(map(float, std)), x.dtype, x.device)
    return (x - m) / s


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
    m, s = _channel_constants(tuple(map(float, mean)), tuple(map(float, std)), batch.dtype, batch.device)
    return (batch * s + m).clamp(0, 1)
