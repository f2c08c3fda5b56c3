"""JPEG decoding on the predictor's device, without Ray: compressed bytes in, ``uint8 (3, S, S)`` device crops out.

:class:`DeviceDecoder` batches nvJPEG (torchvision's ``decode_jpeg(device='cuda')``)
in memory-bounded chunks, crops each chunk before the next, and hands back a
reason instead of a crop for every picture the device could not decode (the
predictor then decodes it on the CPU). :class:`DecodeStreams` orders the
decoder's writes against the stream that uses its outputs.

Why a stream of its own (checked in torchvision 0.29's and 0.26's
``decode_jpegs_cuda.cpp``, the same code since the batched decoder of 0.19):
``decode_jpeg`` allocates its outputs with ``torch::empty`` on the caller's
*current* stream, but nvJPEG writes them on the decoder's private stream
(``getStreamFromPool``), which never waits for the caller's stream; only
afterwards is the caller's stream made to wait for the decoder. A block that
the caching allocator hands out may have been freed (on the host) while
kernels queued on the caller's stream still use it, such as the previous
chunk's crop temporaries: the decoder overwrites it under them and crops come
out wrong with no error (torchvision PR #9606 reproduced it on an H100; torchcodec
fixed the same bug in #1634). Here ``decode_jpeg`` runs with a dedicated stream
current, on which nothing else ever runs, so the allocator hands its outputs
blocks that only earlier outputs used; each output is recorded on the stream
that crops it (``record_stream``), so its block is not reused before those
kernels are done; and the consuming stream waits for the decode stream with an
event (``wait_stream``). No host synchronisation is added: the decode call
already returns only when nvJPEG is done (it synchronises its own stream).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections import Counter
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from maskmodel.runtime import telemetry
from maskmodel.data.transforms import EvalCrop
from maskmodel.models.precision import resolve_device

log = logging.getLogger(__name__)

# A batched JPEG decoder: compressed bytes as 1-D uint8 tensors in, (3, H, W) uint8 images on `device` out.
JpegDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]

#: Decoded bytes (3 x width x height, full size) one device decode call may hold at once: about 40 frames of
#: 1080p or 7 twelve-megapixel photos. nvJPEG decodes at full size; each chunk is cropped before the next
#: (stacking a chunk's pictures for the resize about doubles its peak).
DEVICE_DECODE_BYTES = 256 << 20
#: Device failures in a row, with no image ever decoded there, after which an actor stops trying its device.
DEVICE_GIVE_UP = 64
# nvJPEG's and CUDA's allocation failures as torchvision words them: "Failed to decode batch: 5" and the like
# (NVJPEG_STATUS_ALLOCATOR_FAILURE is 5 in every torchvision status message), "Failed to synchronize CUDA
# stream: 2" (cudaErrorMemoryAllocation). Checked against torchvision 0.29's decode_jpegs_cuda.cpp (0.26: same).
_DEVICE_ALLOCATION_FAILURE = re.compile(r"Failed to [^:\n]+: 5\b|Failed to synchronize CUDA stream: 2\b")


# Start-of-frame markers: baseline (SOF0) is what nvJPEG's hardware engines decode in batches; progressive ones
# (SOF2, SOF6, SOF10, SOF14) torchvision sends to nvJPEG's hybrid path one picture at a time, a host sync each.
_SOF_BASELINE = 0xC0
_SOF_ANY = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOF_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def device_scan_problem(data: bytes) -> str | None:
    """Why a JPEG whose headers passed should still be decoded on the CPU; ``None``: the device may decode it.

    - ``progressive`` (or another non-baseline frame): nvJPEG decodes it on its slow hybrid path, one picture
      at a time with a host sync each;
    - ``more than one scan``: the frame's components are not in one interleaved scan;
    - ``suspect scan: ...``: the entropy-coded data of the scan is damaged in a way its bytes show (a marker
      that cannot occur inside a scan, restart markers out of order or not as many as the restart interval
      implies, an end marker followed by more scan data ending in another end marker). nvJPEG decodes such
      data to garbage without an error; libjpeg reports it, so the CPU path gives the row its error.

    Damage that changes no marker (bits flipped inside the entropy data) cannot be seen without decoding.
    Cost: one pass of numpy over the scan's bytes (about 0.2 ms for a 500 KB photo).
    """
    n, i = len(data), 2
    sof = restart = components = 0
    sampling: list[tuple[int, int]] = []
    width = height = scan_start = 0
    while i + 4 <= n:
        if data[i] != 0xFF:
            return "suspect scan: no marker where the headers continue"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        seg = data[i + 4:i + 2 + length]
        if marker in _SOF_ANY and not sof and len(seg) >= 6:
            sof, components = marker, seg[5]
            height, width = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big")
            sampling = [(seg[7 + 3 * c] >> 4, seg[7 + 3 * c] & 15) for c in range(components) if 8 + 3 * c <= len(seg)]
        elif marker == 0xDD and len(seg) >= 2:
            restart = int.from_bytes(seg[:2], "big")
        elif marker == 0xDA:
            if not sof:
                return "suspect scan: no frame header before the scan"
            if sof in _SOF_PROGRESSIVE:
                return "progressive"
            if sof != _SOF_BASELINE:
                return f"not baseline (SOF{sof - 0xC0})"
            if not seg or seg[0] != components:
                return "more than one scan"
            scan_start = i + 2 + length
            break
        i += 2 + length
    if not scan_start:
        return "suspect scan: no scan"
    body = np.frombuffer(data, dtype=np.uint8, offset=min(scan_start, n))
    at = np.flatnonzero(body[:-1] == 0xFF)
    after = body[at + 1]
    keep = (after != 0x00) & (after != 0xFF)  # stuffed bytes and fill bytes are not markers
    at, after = at[keep], after[keep]
    rst = (after >= 0xD0) & (after <= 0xD7)
    others = np.flatnonzero(~rst)
    if not len(others) or after[others[0]] != 0xD9:
        return "suspect scan: a marker inside the scan" if len(others) else "suspect scan: no end marker"
    end = int(at[others[0]])
    seq = after[:others[0]][rst[:others[0]]].astype(np.int64) - 0xD0
    if len(seq) and (not restart or (seq != np.arange(len(seq)) % 8).any()):
        return "suspect scan: restart markers out of order"
    if restart and sampling:
        hmax, vmax = max(h for h, _ in sampling), max(v for _, v in sampling)
        mcus = math.ceil(width / (8 * hmax)) * math.ceil(height / (8 * vmax))
        expected = math.ceil(mcus / restart) - 1
        if len(seq) != expected:
            return f"suspect scan: {len(seq)} restart markers where the restart interval implies {expected}"
    tail = bytes(body[end + 2:]).rstrip(b"\0")
    if tail and not tail.startswith(b"\xff\xd8") and tail.endswith(b"\xff\xd9"):
        return "suspect scan: an end marker inside the scan"
    return None


def torchvision_jpeg_decoder(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched ``decode_jpeg`` (nvJPEG on CUDA), RGB.

    No EXIF orientation: torchvision applies it on the CPU only, so it is not
    asked for here either (the same picture on either device);
    :func:`maskmodel.score.loading.device_route` sends only upright JPEGs to the device.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory: ``torch.OutOfMemoryError``, CUDA's "out of
    memory", or nvJPEG's own allocation failure (status 5, e.g. ``Failed to decode batch: 5``), which
    torchvision raises as a plain RuntimeError."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    text = str(error)
    return isinstance(error, oom) or "out of memory" in text.lower() or bool(_DEVICE_ALLOCATION_FAILURE.search(text))


def chunks(sizes: Sequence[tuple[int, int]], budget: int) -> list[list[int]]:
    """Consecutive indices of ``sizes`` (``(width, height)``) grouped so that each group's full-size RGB bytes
    stay within ``budget``; a picture larger than the budget alone is a group of its own."""
    out: list[list[int]] = []
    used = budget + 1
    for i, (w, h) in enumerate(sizes):
        need = 3 * max(w, 1) * max(h, 1)
        if used + need > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += need
    return out


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]


class DecodeStreams:
    """The decoder's own CUDA stream, and the hand-over of its outputs to the stream that is current when the
    caller uses them (see the module docstring). On a CPU both are no-ops."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = resolve_device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Make the decode stream current (nothing but decoder calls may run inside)."""
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def hand_over(self, images: Sequence[torch.Tensor | str]) -> None:
        """Order the current stream after the decoder, and keep each output's block from reuse until the work
        queued on the current stream so far and from now on is done (``record_stream``)."""
        if self.stream is None:
            return
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self.stream)
        for img in images:
            if isinstance(img, torch.Tensor):
                img.record_stream(consumer)


class DeviceDecoder:
    """Decode and crop JPEGs on one device, in memory-bounded batches: ``uint8 (3, S, S)`` crops on the device.

    Pictures go to ``decoder`` in chunks of at most ``budget`` decoded bytes
    (:func:`chunks`; default :data:`DEVICE_DECODE_BYTES`); each chunk is cropped (resize + centre crop, one call per
    picture size) before the next is decoded, so memory stays bounded whatever
    the batch. The decoder runs on its own stream (:class:`DecodeStreams`;
    ``streams`` is injectable for tests). A chunk the decoder rejects is
    retried image by image, so one bad file costs its own row only. Out of
    device memory (:func:`is_out_of_memory`), a chunk is split in half (the
    budget too, for the rest of this decoder's life) and retried; a single
    picture that does not fit raises, never turning into a silent slow path.
    Each failure is a *fallback* (the caller decodes that picture on the CPU):
    counted in :attr:`fallbacks` by kind of reason, logged once per kind, and
    passed to ``on_fallback``. After :data:`DEVICE_GIVE_UP` failures with no
    success the device is given up (:attr:`enabled` false), with a warning.
    """

    def __init__(self, crop: EvalCrop, device: torch.device | str, *, decoder: JpegDecoder = torchvision_jpeg_decoder,
                 budget: int | None = None, on_fallback: Callable[[str, int], None] | None = None,
                 streams: DecodeStreams | None = None) -> None:
        self.crop, self.device, self.decoder = crop, resolve_device(device), decoder
        self.budget, self.on_fallback = budget or DEVICE_DECODE_BYTES, on_fallback
        self.streams = streams or DecodeStreams(self.device)
        self.fallbacks: Counter[str] = Counter()
        self.decoded = 0
        self.enabled = True

    def __call__(self, datas: Sequence[bytes], sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor | str]:
        """One crop on the device per picture, or the reason the device could not decode it (a string)."""
        out: list[torch.Tensor | str] = ["device decoding given up"] * len(datas)
        if not self.enabled:
            self._fail("device decoding given up", len(datas))
            return out
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        pending = chunks(sizes, self.budget)
        while pending:
            idx = pending.pop(0)
            try:
                images = self._decode(idx, tensors)
            except Exception as e:  # noqa: BLE001 - sorted out below
                if not is_out_of_memory(e):
                    raise
                if len(idx) == 1:
                    raise  # one picture the device cannot hold: a real problem, not a slow path
                self.budget = max(1, self.budget // 2)
                log.warning("device %s ran out of memory decoding %d JPEGs at once (%s); halving the decode budget "
                            "to %d MiB", self.device, len(idx), _reason(e), self.budget >> 20)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                half = len(idx) // 2
                pending[:0] = [idx[:half], idx[half:]]
                continue
            for i, img in zip(idx, images):
                out[i] = img
        return out

    def _run(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        """The decoder on its own stream, its outputs handed over to the current one."""
        with self.streams.decoding():
            images = list(self.decoder(data, self.device))
        self.streams.hand_over(images)
        return images

    def _decode(self, idx: list[int], tensors: list[torch.Tensor]) -> list[torch.Tensor | str]:
        """Decode and crop the pictures ``idx`` of ``tensors``; raises only when the device is out of memory."""
        try:
            images: list[torch.Tensor | str] = list(self._run([tensors[i] for i in idx]))
        except Exception as e:  # noqa: BLE001 - nvJPEG refuses a whole batch for one odd image
            if is_out_of_memory(e):
                raise
            images = []
            for i in idx:
                try:
                    images.append(self._run([tensors[i]])[0])
                except Exception as e1:  # noqa: BLE001 - this image falls back to the CPU
                    if is_out_of_memory(e1):
                        raise
                    images.append(_reason(e1))
        out: list[torch.Tensor | str] = list(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for j, img in enumerate(images):
            if isinstance(img, str):
                continue
            if img.dim() == 3 and img.shape[0] == 3 and img.dtype == torch.uint8:
                by_size.setdefault(tuple(img.shape), []).append(j)
            else:
                out[j] = f"unexpected output: {tuple(img.shape)} {img.dtype}"  # a grey picture...
        for group in by_size.values():
            try:
                cropped = self.crop(torch.stack([images[j] for j in group]))
            except Exception as e:  # noqa: BLE001 - a size the resize refuses: CPU fallback
                if is_out_of_memory(e):
                    raise
                for j in group:
                    out[j] = _reason(e)
                continue
            for k, j in enumerate(group):
                out[j] = cropped[k]
        del images  # the full-size pictures: freed before the next chunk (their blocks wait for the crops)
        for r in out:
            if isinstance(r, str):
                self._fail(r, 1)
            else:
                self.decoded += 1
        return out

    def _fail(self, reason: str, n: int) -> None:
        kind = telemetry.error_kind(reason)  # the reason without per-file detail: a bounded set
        if kind not in self.fallbacks:
            log.warning("decoding a JPEG on %s failed (%s); it is decoded on the CPU instead. Counted in the metric "
                        "%s; logged once per kind of failure", self.device, reason, telemetry.SCORE_DECODE_FALLBACKS)
        self.fallbacks[kind] += n
        if self.on_fallback is not None:
            self.on_fallback(reason, n)
        if self.enabled and not self.decoded and sum(self.fallbacks.values()) >= DEVICE_GIVE_UP:
            self.enabled = False
            log.warning("no JPEG has decoded on %s after %d failures; this actor decodes on the CPU from now on",
                        self.device, sum(self.fallbacks.values()))


__all__ = ["DEVICE_DECODE_BYTES", "DEVICE_GIVE_UP", "DecodeStreams", "DeviceDecoder", "JpegDecoder", "chunks",
           "device_scan_problem", "is_out_of_memory", "torchvision_jpeg_decoder"]
