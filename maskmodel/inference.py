"""The predict step of scoring, on the model's device, without Ray: load-step batches in, result rows out.

:class:`Predictor` finishes what :mod:`maskmodel.loading` started: GPU JPEG
decoding (batched, with a per-image CPU fallback that keeps the CPU path's
reasons), normalisation on the device, the model, and rows of the results
schema. :mod:`maskmodel.scoring` runs it in a Ray Data actor pool. The forward
pass itself (:func:`maskmodel.precision.predict`) is shared with training.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from maskmodel import results, testhooks
from maskmodel.decode import DecodeError
from maskmodel.loading import column
from maskmodel.model import load_model_dir
from maskmodel.precision import predict
from maskmodel.transforms import EvalCrop, preprocess_image


def result_table(batch: dict[str, Any], probs: np.ndarray, *, schema: pa.Schema, classes: Sequence[str],
                 model_id: str, run_id: str, scored_at: Any) -> pa.Table:
    """Rows of ``schema`` from a :func:`load_batch` batch and the probabilities of its ok rows (in order)."""
    n = len(batch["path"])
    errors, versions, sizes = (column(batch, c, n) for c in ("error", "version", "size"))
    ok = np.array([e is None for e in errors], dtype=bool)
    full = np.zeros((len(errors), len(classes)), dtype=np.float32)
    full[ok] = probs
    best = full.argmax(1) if len(classes) else np.zeros(len(errors), int)
    cols: dict[str, pa.Array] = {
        "path": pa.array(list(batch["path"]), pa.string()),
        "archive": pa.array(column(batch, "archive", n), pa.string()),
        "member": pa.array(column(batch, "member", n), pa.string()),
        "version": pa.array(versions, pa.string()),
        "size": pa.array([None if s is None else int(s) for s in sizes], pa.int64()),
        "status": pa.array(np.where(ok, "ok", "error").tolist(), pa.string()),
        "error": pa.array(errors, pa.string()),
        "label": pa.array([classes[b] if o else None for b, o in zip(best, ok)], pa.string()),
        "confidence": pa.array(full.max(1) if len(classes) else full.sum(1), pa.float32(), mask=~ok),
        "width": pa.array(np.asarray(batch["width"], np.int32), pa.int32(), mask=~ok),
        "height": pa.array(np.asarray(batch["height"], np.int32), pa.int32(), mask=~ok),
        "model_id": pa.array([model_id] * len(errors), pa.string()),
        "run_id": pa.array([run_id] * len(errors), pa.string()),
        "scored_at": pa.array([scored_at] * len(errors), pa.timestamp("us", tz="UTC")),
    }
    for j, c in enumerate(classes):
        cols[results.prob_column(c)] = pa.array(full[:, j], pa.float32(), mask=~ok)
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


# A batched JPEG decoder: compressed bytes as 1-D uint8 tensors in, (3, H, W) uint8 images on `device` out.
JpegDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def torchvision_jpeg_decoder(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched ``decode_jpeg`` (nvJPEG on CUDA), RGB, EXIF orientation applied."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)


def decode_on_device(datas: list[bytes], crop: EvalCrop, *, device: torch.device,
                     decoder: JpegDecoder = torchvision_jpeg_decoder) -> list[torch.Tensor | None]:
    """Decode and crop JPEGs on ``device`` in one batch: ``uint8 (3, S, S)`` each, ``None`` where it failed.

    A batch the decoder rejects as a whole is retried image by image, so one
    bad file costs its own row only; the caller decodes ``None`` ones on the CPU.
    Images of one size (a camera's frames) are resized and cropped together,
    in one call per size rather than a few small kernels per image.
    """
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        images: list[torch.Tensor | None] = list(decoder(tensors, device))
    except Exception:  # noqa: BLE001 - nvJPEG refuses a whole batch for one odd image
        images = []
        for t in tensors:
            try:
                images.append(decoder([t], device)[0])
            except Exception:  # noqa: BLE001 - this image falls back to the CPU
                images.append(None)
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        if img is not None and img.dim() == 3 and img.shape[0] == 3 and img.dtype == torch.uint8:
            by_size.setdefault(tuple(img.shape), []).append(i)  # anything else (a grey result...): CPU fallback
    for idx in by_size.values():
        try:
            cropped = crop(torch.stack([images[i] for i in idx]))
        except Exception:  # noqa: BLE001 - a size the resize refuses: CPU fallback
            continue
        for j, i in enumerate(idx):
            out[i] = cropped[j]
    return out


class Predictor:
    """The actor-pool callable: loads the model once, turns :func:`load_batch` batches into result rows.

    Rows that arrive with compressed ``data`` are decoded on the predictor's
    device (:func:`decode_on_device`); an image the device cannot decode is
    decoded on the CPU here, and one that fails there too gets the CPU
    path's reason, exactly as if it had never been sent to the GPU.
    """

    def __init__(self, model_uri: str, *, run_id: str, precision: str, device: str = "cpu", threads: int = 0,
                 decoder: JpegDecoder = torchvision_jpeg_decoder) -> None:
        if device == "cpu":
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        else:
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        self.device = torch.device(device)
        model, self.card = load_model_dir(model_uri)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.schema = results.results_schema(self.card.classes)
        self.crop = EvalCrop(crop_size=self.card.input_size, resize_size=self.card.resize_size)
        self.run_id, self.precision, self.decoder = run_id, precision, decoder
        self.calls = 0

    def _device_rows(self, batch: dict[str, Any], errors: list[str | None]) -> dict[int, torch.Tensor]:
        """Decode the batch's compressed rows; rows that fail on the device take the CPU path in place."""
        idx = [i for i, d in enumerate(batch.get("data", ())) if d is not None and errors[i] is None]
        if not idx:
            return {}
        decoded = decode_on_device([batch["data"][i] for i in idx], self.crop, device=self.device,
                                   decoder=self.decoder)
        on_device = {}
        if not batch["pixels"].flags.writeable and any(img is None for img in decoded):
            batch["pixels"] = batch["pixels"].copy()  # the CPU fallback writes its crops in place
        for i, img in zip(idx, decoded):
            if img is not None:
                on_device[i] = img
                continue
            try:  # the CPU path, with its reasons
                batch["pixels"][i] = preprocess_image(batch["data"][i], self.crop)[0]
            except DecodeError as e:
                errors[i] = str(e)
            except Exception as e:  # noqa: BLE001 - one odd file must never stop the job
                errors[i] = f"undecodable: {type(e).__name__}"
        return on_device

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        self.calls += 1
        testhooks.pause(f"score-predict-{self.calls}")  # test-only: lose a node while actors hold work
        n = len(batch["path"])
        errors = column(batch, "error", n)
        on_device = self._device_rows(batch, errors)
        batch["error"] = np.array(errors, dtype=object)
        ok = np.array([e is None for e in errors], dtype=bool)
        classes = self.card.classes
        if not ok.any():
            probs = np.zeros((0, len(classes)), np.float32)
        else:
            pixels = batch["pixels"]
            with warnings.catch_warnings():  # Ray hands Arrow-backed, read-only arrays over; nothing writes to them
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(pixels if ok.all() else pixels[ok])  # no copy when every row is ok
            if on_device:  # place the device-decoded crops among the CPU-decoded ones, on the device
                x = x.to(self.device, non_blocking=True) if x.device != self.device else x.clone()
                rank = np.cumsum(ok) - 1
                for i, img in on_device.items():
                    x[rank[i]] = img
            probs = predict(self.model, x, mean=self.card.mean, std=self.card.std, device=self.device,
                            precision=self.precision)
        return result_table(batch, probs, schema=self.schema, classes=classes, model_id=self.card.model_id,
                            run_id=self.run_id, scored_at=results.utc_now())
