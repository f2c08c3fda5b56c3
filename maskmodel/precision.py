"""The classifier's forward pass at a precision (fp32 or bf16), and whether bf16 may be used: no Ray.

Below both scoring (:class:`maskmodel.inference.Predictor` calls :func:`predict`)
and training (the job records :func:`label_agreement` in ``model.json`` as
:data:`BF16_AGREEMENT_KEY`, which :func:`resolve_precision` reads back).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from maskmodel.model import ModelCard
from maskmodel.transforms import normalize

#: ``model.json`` metric: share of held-out images where bf16 gives the fp32 label (see :func:`label_agreement`).
BF16_AGREEMENT_KEY = "bf16_label_agreement"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); without it bf16 is emulated and slow."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, *, device: str, card: ModelCard) -> str:
    """``fp32`` or ``bf16``; ``auto`` takes bf16 on GPU, and on CPU only when verified (see ``--precision``)."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16"
    return "bf16" if cpu_has_native_bf16() and card.metrics.get(BF16_AGREEMENT_KEY) == 1.0 else "fp32"


def predict(model: torch.nn.Module, pixels: np.ndarray | torch.Tensor, *, mean: Sequence[float],
            std: Sequence[float], device: torch.device | str = "cpu", precision: str = "fp32") -> np.ndarray:
    """Class probabilities ``float32 (N, C)`` of cropped ``uint8 pixels (N, 3, S, S)``.

    The pixels cross to ``device`` as uint8 (pinned, asynchronously, for a
    GPU) and are normalised there; channels_last, no grad.
    """
    device = torch.device(device)
    x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels)
    if x.device != device:
        if device.type == "cuda":
            x = x.pin_memory()
        x = x.to(device, non_blocking=True)
    x = normalize(x, mean=mean, std=std).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


def label_agreement(model: torch.nn.Module, batches: Sequence[np.ndarray], *, mean: Sequence[float],
                    std: Sequence[float], device: str = "cpu") -> float:
    """Share of images (cropped uint8 batches) whose bf16 label equals the fp32 label.

    1.0 lets ``--precision auto`` use bf16 on CPU; the training job records it
    in ``model.json`` metrics as :data:`BF16_AGREEMENT_KEY`.
    """
    model = model.to(device, memory_format=torch.channels_last).eval()
    same = total = 0
    for b in batches:
        a = predict(model, b, mean=mean, std=std, device=device).argmax(1)
        same += int((predict(model, b, mean=mean, std=std, device=device, precision="bf16").argmax(1) == a).sum())
        total += len(a)
    return same / total if total else 0.0
