"""The classifier's forward pass at a precision (fp32 or bf16) on a device, and whether bf16 may be used: no Ray.

Devices are compared by what they are (type and index, :func:`same_device`), never as objects:
``torch.device("cuda") != torch.device("cuda:0")``, though a tensor moved to the first names the second.

Below both scoring (:class:`maskmodel.score.inference.Predictor` calls :func:`predict`)
and training (the job records :func:`label_agreement` in ``model.json`` as
:data:`BF16_AGREEMENT_KEY`, which :func:`resolve_precision` reads back).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from maskmodel.data.transforms import normalize
from maskmodel.models.classifier import ModelCard
from maskmodel.models.spec import BF16_AGREEMENT_KEY



def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); without it bf16 is emulated and slow."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, *, device: torch.device | str, card: ModelCard) -> str:
    """``fp32`` or ``bf16``; ``auto`` takes bf16 on GPU, and on CPU only when verified (see ``--precision``)."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16"
    return "bf16" if cpu_has_native_bf16() and card.metrics.get(BF16_AGREEMENT_KEY) == 1.0 else "fp32"


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` with its index made explicit where it names the current device: ``cuda`` is ``cuda:<current>``
    (``cuda:0`` without CUDA, which is what a tensor moved to ``cuda`` reports); ``cpu:0`` is ``cpu``."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if d.type == "cpu":
        return torch.device("cpu")  # one CPU device, whatever index it is given
    return d


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two device names are one device, by type and index (``torch.device('cuda') != 'cuda:0'`` as objects)."""
    return resolve_device(a) == resolve_device(b)


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``: itself if already there; from the host to a GPU through pinned memory, non-blocking.

    A host tensor that is already pinned (a buffer filled for the purpose) is
    copied as it is; any other is pinned first, so the copy is asynchronous.
    """
    if same_device(x.device, device):
        return x
    device = resolve_device(device)
    if device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def host_buffer(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An empty host tensor to fill and send to ``device``: pinned when that is a GPU (torch caches pinned blocks)."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=resolve_device(device).type == "cuda")


class HostCopy:
    """A device tensor on its way to the host: a non-blocking copy into pinned memory and a CUDA event.

    :meth:`numpy` waits for this copy only (the work queued before it on its
    stream), not for the whole device, so the caller can do host work (build
    the other result columns) while the GPU finishes. A host tensor is kept as it is.
    """

    def __init__(self, t: torch.Tensor) -> None:
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(t.device))
        else:
            self.host = t

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)


def predict_async(model: torch.nn.Module, pixels: np.ndarray | torch.Tensor, *, mean: Sequence[float],
                  std: Sequence[float], device: torch.device | str = "cpu", precision: str = "fp32") -> HostCopy:
    """Start :func:`predict` and return its probabilities on their way to the host (``float32 (N, C)``)."""
    device = resolve_device(device)
    x = to_device(pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels), device)
    x = normalize(x, mean=mean, std=std).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    return HostCopy(torch.softmax(logits.float(), dim=1))


def predict(model: torch.nn.Module, pixels: np.ndarray | torch.Tensor, *, mean: Sequence[float],
            std: Sequence[float], device: torch.device | str = "cpu", precision: str = "fp32") -> np.ndarray:
    """Class probabilities ``float32 (N, C)`` of cropped ``uint8 pixels (N, 3, S, S)``.

    The pixels cross to ``device`` as uint8 (pinned, asynchronously, for a
    GPU; not at all when already there) and are normalised there; channels_last, no grad.
    """
    return predict_async(model, pixels, mean=mean, std=std, device=device, precision=precision).numpy()


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
