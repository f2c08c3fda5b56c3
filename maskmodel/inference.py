"""Scoring one image at a time, and one batch at a time, without Ray.

The steps of the scoring pipeline that are plain functions: read an object
(its own try/except, so a missing or oversized object becomes a reason),
decode and preprocess it exactly as ``model.json`` says, run the model, and
turn predictions into rows of the results schema. :mod:`maskmodel.scoring`
wraps them in Ray Data tasks and the :class:`Predictor` actor pool; the
training job uses :func:`label_agreement` to record whether bf16 is safe.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from maskmodel import results, storage, testhooks
from maskmodel.decode import DecodeError, decode_image, to_uint8_chw, too_large_bytes
from maskmodel.errors import UserError
from maskmodel.model import ModelCard, load_model_dir
from maskmodel.transforms import EvalPreset

#: ``model.json`` metric: share of held-out images where bf16 gives the fp32 label (see :func:`label_agreement`).
BF16_AGREEMENT_KEY = "bf16_label_agreement"


def _reason(e: UserError) -> str:
    cause = e.__cause__
    if isinstance(cause, FileNotFoundError):
        return "unreadable: not found"
    if isinstance(cause, PermissionError):
        return "unreadable: permission denied"
    return f"unreadable: {type(cause or e).__name__}"


def read_object(uri: str, version: str | None, size: int | None, *, max_bytes: int,
                skip_keys: np.ndarray | None = None) -> tuple[bytes | None, str | None, int | None, str | None] | None:
    """``(data, version, size, error)`` for one object, or ``None`` if ``(uri, version)`` is in ``skip_keys``.

    Never raises for a storage failure. An unknown version or size (manifest
    input) is looked up first; an object over ``max_bytes`` is not downloaded.
    Errors: ``unreadable: ...`` or ``too large: ...``.
    """
    try:
        if version is None or size is None:
            found = storage.info(uri)
            version, size = found.version, found.size
        if skip_keys is not None and len(skip_keys) and results.contains(
                skip_keys, results.object_keys([uri], [version]))[0]:
            return None
        if size > max_bytes:
            return None, version, size, too_large_bytes(size, max_bytes)
        return storage.read_bytes(uri), version, size, None
    except UserError as e:
        return None, version, size, _reason(e)


def preprocess_image(data: bytes, preset: EvalPreset, *, max_bytes: int | None = None
                     ) -> tuple[np.ndarray, int, int]:
    """Decode and preprocess one image: ``(float32 (3, S, S), width, height)``; :class:`DecodeError` if unusable."""
    img = decode_image(data, max_bytes=max_bytes)
    return preset(torch.from_numpy(to_uint8_chw(img))).numpy(), img.width, img.height


def _column(batch: dict[str, Any], name: str, n: int) -> list[Any]:
    """A column as a list with None for missing values; Ray may hand an all-null column over as NaN floats."""
    if name not in batch:
        return [None] * n
    return [None if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) else v for v in batch[name]]


def load_batch(batch: dict[str, Any], *, card: ModelCard, max_bytes: int,
               skip_keys: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Read, decode and preprocess a batch of objects (columns ``path`` [, ``version``, ``size``]).

    Returns columns ``path, version, size, error, width, height, pixels``; a
    failing object keeps its row with ``error`` set (zero pixels, width -1).
    Objects whose ``(path, version)`` is in ``skip_keys`` are dropped. One
    object's bytes are held at a time.
    """
    n = len(batch["path"])
    versions, sizes = _column(batch, "version", n), _column(batch, "size", n)
    preset = EvalPreset(crop_size=card.input_size, resize_size=card.resize_size, mean=card.mean, std=card.std)
    pixels = np.zeros((n, 3, card.input_size, card.input_size), dtype=np.float32)
    width, height = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
    rows: list[tuple[str, str | None, int | None, str | None]] = []
    for i, path in enumerate(str(p) for p in batch["path"]):
        got = read_object(path, versions[i], None if sizes[i] is None else int(sizes[i]),
                          max_bytes=max_bytes, skip_keys=skip_keys)
        if got is None:
            continue
        data, version, size, error = got
        j = len(rows)
        if error is None:
            try:
                pixels[j], width[j], height[j] = preprocess_image(data, preset, max_bytes=max_bytes)
            except DecodeError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - one odd file must never stop the job
                error = f"undecodable: {type(e).__name__}"
        rows.append((path, version, size, error))
    k = len(rows)
    cols = [np.array(c, dtype=object) for c in zip(*rows)] if rows else [np.empty(0, object)] * 4
    return {"path": cols[0], "version": cols[1], "size": cols[2], "error": cols[3],
            "width": width[:k], "height": height[:k], "pixels": pixels[:k]}


def cpu_has_native_bf16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, *, device: str, card: ModelCard) -> str:
    """``fp32`` or ``bf16``; ``auto`` takes bf16 on GPU, and on CPU only when verified (see ``--precision``)."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16"
    return "bf16" if cpu_has_native_bf16() and card.metrics.get(BF16_AGREEMENT_KEY) == 1.0 else "fp32"


def predict(model: torch.nn.Module, pixels: np.ndarray, *, device: torch.device | str = "cpu",
            precision: str = "fp32") -> np.ndarray:
    """Class probabilities ``float32 (N, C)`` of preprocessed ``pixels (N, 3, S, S)``; channels_last, no grad."""
    device = torch.device(device)
    x = torch.from_numpy(pixels) if pixels.flags.writeable else torch.tensor(pixels)
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


def label_agreement(model: torch.nn.Module, batches: Sequence[np.ndarray], *, device: str = "cpu") -> float:
    """Share of images whose bf16 label equals the fp32 label; 1.0 lets ``--precision auto`` use bf16 on CPU.

    The training job records it in ``model.json`` metrics as :data:`BF16_AGREEMENT_KEY`.
    """
    model = model.to(device, memory_format=torch.channels_last).eval()
    same = total = 0
    for b in batches:
        a = predict(model, b, device=device).argmax(1)
        same += int((predict(model, b, device=device, precision="bf16").argmax(1) == a).sum())
        total += len(a)
    return same / total if total else 0.0


def result_table(batch: dict[str, Any], probs: np.ndarray, *, schema: pa.Schema, classes: Sequence[str],
                 model_id: str, run_id: str, scored_at: Any) -> pa.Table:
    """Rows of ``schema`` from a :func:`load_batch` batch and the probabilities of its ok rows (in order)."""
    n = len(batch["path"])
    errors, versions, sizes = (_column(batch, c, n) for c in ("error", "version", "size"))
    ok = np.array([e is None for e in errors], dtype=bool)
    full = np.zeros((len(errors), len(classes)), dtype=np.float32)
    full[ok] = probs
    best = full.argmax(1) if len(classes) else np.zeros(len(errors), int)
    cols: dict[str, pa.Array] = {
        "path": pa.array(list(batch["path"]), pa.string()),
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


class Predictor:
    """The actor-pool callable: loads the model once, turns :func:`load_batch` batches into result rows."""

    def __init__(self, model_uri: str, *, run_id: str, precision: str, device: str = "cpu", threads: int = 0) -> None:
        if device == "cpu":
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        self.device = torch.device(device)
        model, self.card = load_model_dir(model_uri)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.schema = results.results_schema(self.card.classes)
        self.run_id, self.precision = run_id, precision
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.calls += 1
        testhooks.pause(f"score-predict-{self.calls}")  # test-only: lose a node while actors hold work
        ok = np.array([e is None for e in _column(batch, "error", len(batch["path"]))], dtype=bool)
        probs = (predict(self.model, np.ascontiguousarray(batch["pixels"][ok]), device=self.device,
                         precision=self.precision) if ok.any() else np.zeros((0, len(self.card.classes)), np.float32))
        return result_table(batch, probs, schema=self.schema, classes=self.card.classes,
                            model_id=self.card.model_id, run_id=self.run_id, scored_at=results.utc_now())
