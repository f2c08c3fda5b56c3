"""The predict step of scoring, on the model's device, without Ray: load-step batches in, result rows out.

:class:`Predictor` finishes what :mod:`maskmodel.score.loading` started: GPU JPEG
decoding (:class:`maskmodel.score.gpu_decode.DeviceDecoder`: batched, memory-bounded,
on a stream of its own, with a per-image CPU fallback that keeps the CPU path's
reasons and is logged and counted), normalisation on the device, the model, and
rows of the results schema.
:mod:`maskmodel.score.scoring` runs it in a Ray Data actor pool. The forward pass and
device placement (:mod:`maskmodel.models.precision`) are shared with training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

# First, so that the mark below times this module's own imports (torch, torchvision, maskmodel) in each process:
# in a predictor actor they are most of its start-up (benchmarks/README.md, "Timeline of one run").
from maskmodel.runtime import timeline

timeline.mark("inference import start", "import")

import numpy as np
import pyarrow as pa
import torch

from maskmodel import results
from maskmodel.runtime import telemetry, testhooks
from maskmodel.alert import alert_indices
from maskmodel.data.transforms import EvalCrop, preprocess_image
from maskmodel.models.classifier import load_model_dir
from maskmodel.models.detect import DetectOptions
from maskmodel.models.precision import HostCopy, host_buffer, predict_async, resolve_device, to_device
from maskmodel.score.faces import FaceStage, face_records, verdict
from maskmodel.score.gpu_decode import DeviceDecoder, JpegDecoder, torchvision_jpeg_decoder
from maskmodel.score.loading import column, decode_reason

log = logging.getLogger(__name__)


@dataclass
class FaceColumns:
    """The face columns of a batch's rows, one entry per row (``None`` on error rows): ``faces`` (lists of
    :data:`maskmodel.results.FACE_TYPE` dicts), ``dropped`` (over --max-faces) and ``detector``."""

    faces: list[list[dict] | None]
    dropped: list[int | None]
    detector: list[str | None]

    @classmethod
    def without_faces(cls, ok: Sequence[bool]) -> "FaceColumns":
        """``--faces none``: every ok row's face is the whole image, and no detector looked."""
        return cls([[] if o else None for o in ok], [0 if o else None for o in ok],
                   [results.NO_DETECTOR if o else None for o in ok])


def result_table(batch: dict[str, Any], probs: np.ndarray | HostCopy | PartProbs, *, schema: pa.Schema,
                 classes: Sequence[str], model_id: str, run_id: str, scored_at: Any,
                 alert_classes: Sequence[str], faces: FaceColumns | None = None) -> pa.Table:
    """Rows of ``schema`` from a :func:`load_batch` batch and the probabilities of its ok rows (in order).

    ``probs`` may still be on its way from the device (:class:`HostCopy`, :class:`PartProbs`): the
    columns that do not need it are built first. An ok row whose ``probs`` are
    NaN has no label (an explicit detector found no face): label, confidence and
    ``p_<class>`` null. ``faces``: the face columns (default: ``--faces none``'s). ``alert``: the label is one
    of ``alert_classes`` (an ok row without a label: no alert; an error row: null).
    """
    n = len(batch["path"])
    errors, versions, sizes = (column(batch, c, n) for c in ("error", "version", "size"))
    ok = np.array([e is None for e in errors], dtype=bool)
    cols: dict[str, pa.Array] = {
        "path": pa.array(list(batch["path"]), pa.string()),
        "archive": pa.array(column(batch, "archive", n), pa.string()),
        "member": pa.array(column(batch, "member", n), pa.string()),
        "version": pa.array(versions, pa.string()),
        "size": pa.array([None if s is None else int(s) for s in sizes], pa.int64()),
        "status": pa.array(np.where(ok, "ok", "error").tolist(), pa.string()),
        "error": pa.array(errors, pa.string()),
        "width": pa.array(np.asarray(batch["width"], np.int32), pa.int32(), mask=~ok),
        "height": pa.array(np.asarray(batch["height"], np.int32), pa.int32(), mask=~ok),
        "model_id": pa.array([model_id] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "scored_at": pa.array([scored_at] * n, pa.timestamp("us", tz="UTC")),
    }
    faces = faces or FaceColumns.without_faces(ok)
    cols["faces"] = pa.array(faces.faces, pa.list_(results.FACE_TYPE))
    cols["faces_found"] = pa.array([None if f is None else len(f) for f in faces.faces], pa.int32())
    cols["faces_dropped"] = pa.array(faces.dropped, pa.int32())
    cols["detector"] = pa.array(faces.detector, pa.string())
    full = np.zeros((n, len(classes)), dtype=np.float32)
    full[ok] = np.asarray(probs)
    labelled = ok & ~np.isnan(full).any(1)
    full[~labelled] = 0.0
    best = full.argmax(1) if len(classes) else np.zeros(n, int)
    cols["label"] = pa.array([classes[b] if o else None for b, o in zip(best, labelled)], pa.string())
    alert = np.isin(best, alert_indices(classes, alert_classes)) & labelled
    cols["alert"] = pa.array(alert, pa.bool_(), mask=~ok)
    cols["confidence"] = pa.array(full.max(1) if len(classes) else full.sum(1), pa.float32(), mask=~labelled)
    for j, c in enumerate(classes):
        cols[results.prob_column(c)] = pa.array(full[:, j], pa.float32(), mask=~labelled)
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


#: Rows per forward pass on a GPU: a batch is cut into parts of this many, and the next part's copy and decode
#: run (on a thread, on a CUDA stream of their own) while this part's forward runs on the default stream.
PART_ROWS = 128


def bucket_size(n: int) -> int:
    """The batch size a forward pass of ``n`` rows is padded to: 8, 16, 32, 64, then multiples of 64.

    The number of ok rows (and of faces) changes from batch to batch; with
    ``cudnn.benchmark`` each new shape re-tunes every convolution (0.5-2 s each
    time), so shapes come from this short list instead: 11 shapes up to 512
    rows, at most 63 of them padding (zeros, whose outputs are never read).
    """
    if n <= 8:
        return 8
    return 1 << (n - 1).bit_length() if n <= 64 else -(-n // 64) * 64


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``(n, ...)``) with zero rows appended up to :func:`bucket_size` ``(n)`` rows, on its device."""
    extra = bucket_size(len(x)) - len(x)
    return x if not extra else torch.cat([x, x.new_zeros((extra, *x.shape[1:]))])


#: Face crops per classifier call off the pipelined path (a batch of photos may hold thousands of faces).
DEFAULT_FACE_ROWS = 512


class PartProbs:
    """The probabilities of a batch's forward passes, in row order, still on their way from the device:
    ``float32 (N, C)`` once read (``np.asarray``), padding rows left out."""

    def __init__(self, classes: int) -> None:
        self.classes, self.parts = classes, []

    def add(self, probs: HostCopy, rows: int) -> None:
        self.parts.append((probs, rows))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if not self.parts:
            return np.zeros((0, self.classes), dtype or np.float32)
        a = np.concatenate([np.asarray(p)[:rows] for p, rows in self.parts])
        return a if dtype is None else a.astype(dtype)


class Predictor:
    """The actor-pool callable: loads the model once, turns :func:`load_batch` batches into result rows.

    Batches come as :data:`~maskmodel.score.loading.COLUMNS` (crops) or, with GPU
    decoding, :data:`~maskmodel.score.loading.DEVICE_COLUMNS`: the rows whose
    ``encoded`` bytes are a JPEG are decoded on the predictor's device
    (:class:`DeviceDecoder`); one the device cannot decode is decoded on the
    CPU here, and one that fails there too gets the CPU path's reason, exactly
    as if it had never been sent to the GPU. Host crops are gathered into one
    pinned buffer and copied to the device without blocking; the probabilities
    come back the same way while the other result columns are built.

    ``pipelined`` (default: on a GPU) cuts each batch into parts of ``part_rows``
    (:data:`PART_ROWS`): while part k's forward runs, part k+1 is gathered (copied,
    decoded, cropped) on a thread of this actor, on a CUDA stream of its own,
    its hand-over ordered by an event; the model itself is only ever called from
    the caller's thread. Each forward pass is padded to :func:`bucket_size` rows.
    """

    def __init__(self, model_uri: str, *, run_id: str, precision: str, device: str = "cpu", threads: int = 0,
                 decoder: JpegDecoder = torchvision_jpeg_decoder, decode_budget: int | None = None,
                 faces: str = "none", detector_weights: str = "", detect_options: DetectOptions | None = None,
                 pipelined: bool | None = None, part_rows: int = PART_ROWS) -> None:
        timeline.mark("predictor init", "predictor")
        if device == "cpu":
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        else:
            if threads:  # the actor's CPUs, for its host work (Ray sets OMP_NUM_THREADS to them)
                torch.set_num_threads(threads)
            # Input sizes are fixed and batch sizes come from a few buckets (pad_rows): cuDNN tunes each
            # shape once, then picks its fastest kernels.
            torch.backends.cudnn.benchmark = True
        self.device = resolve_device(device)  # cuda -> cuda:N: compared by what it is, never by spelling
        model, self.card = load_model_dir(model_uri)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.schema = results.results_schema(self.card.classes)
        self.crop = EvalCrop(crop_size=self.card.input_size, resize_size=self.card.resize_size)
        self.run_id, self.precision = run_id, precision
        self.decode = DeviceDecoder(self.crop, self.device, decoder=decoder, budget=decode_budget,
                                    on_fallback=telemetry.decode_fallback_recorder(run_id))
        self.alert = alert_indices(self.card.classes, self.card.alert_classes)
        # The detector on this actor's device, batched, at the classifier's precision (None: --faces none).
        self.faces = None if faces == "none" else FaceStage(
            faces, weights=detector_weights, options=detect_options or DetectOptions(), crop=self.crop,
            device=self.device, precision=precision)
        self.calls = 0
        self.pipelined = self.device.type == "cuda" if pipelined is None else pipelined
        self.part_rows = part_rows if self.pipelined else 1 << 62
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="predictor-prefetch") if self.pipelined else None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        timeline.mark("model loaded", "predictor")

    def gather(self, batch: dict[str, Any], errors: list[str | None]) -> torch.Tensor | np.ndarray | None:
        """The ok rows' crops, ``uint8 (n_ok, 3, S, S)`` in row order (on the device where any was decoded there);
        sets ``errors`` of rows that fail their CPU fallback. ``None`` when no row is ok."""
        n, shape = len(errors), (3, self.card.input_size, self.card.input_size)
        if "data" not in batch:  # CPU-decoded crops: as Ray hands them over, copied only where needed
            ok = np.array([e is None for e in errors], dtype=bool)
            if not ok.any():
                return None
            with warnings.catch_warnings():  # Ray hands Arrow-backed, read-only arrays over; nothing writes to them
                warnings.simplefilter("ignore", UserWarning)
                pixels = torch.from_numpy(batch["pixels"])
            if self.device.type == "cpu":
                return pixels if ok.all() else pixels[torch.from_numpy(ok)]
            buf = host_buffer((int(ok.sum()), *shape), dtype=torch.uint8, device=self.device)
            return torch.index_select(pixels, 0, torch.from_numpy(np.flatnonzero(ok)), out=buf)
        datas, encoded = batch["data"], np.asarray(batch["encoded"], dtype=bool)
        width, height = np.asarray(batch["width"]), np.asarray(batch["height"])
        jpegs = [i for i in range(n) if errors[i] is None and encoded[i]]
        on_device: dict[int, torch.Tensor] = {}
        host: dict[int, np.ndarray] = {}
        for i, got in zip(jpegs, self.decode([datas[i] for i in jpegs], [(int(width[i]), int(height[i]))
                                                                           for i in jpegs]) if jpegs else ()):
            if not isinstance(got, str):
                on_device[i] = got
                continue
            try:  # the CPU path, with its reasons
                host[i] = preprocess_image(datas[i], self.crop)[0]
            except Exception as e:  # noqa: BLE001 - one odd file must never stop the job
                errors[i] = decode_reason(e)
        for i in range(n):
            if errors[i] is None and not encoded[i]:
                host[i] = np.frombuffer(datas[i], dtype=np.uint8).reshape(shape)
        ok_rows = [i for i in range(n) if errors[i] is None]
        if not ok_rows:
            return None
        rank = {i: r for r, i in enumerate(ok_rows)}
        staged, in_host = None, sorted(host)  # row order: with no device crops, this is the whole batch
        if host:
            buf = host_buffer((len(host), *shape), dtype=torch.uint8, device=self.device)
            view = buf.numpy()  # the crops are written straight into the (pinned) buffer: one copy each
            for j, i in enumerate(in_host):
                view[j] = host[i]
            staged = to_device(buf, self.device)
            if not on_device:
                return staged
        decoded = torch.stack(list(on_device.values()))  # row order (the decoder's order)
        if staged is None:
            return decoded
        x = torch.empty((len(ok_rows), *shape), dtype=torch.uint8, device=self.device)
        # Row indices copied from pinned memory without blocking (a pageable copy would sync the host).
        x[to_device(torch.tensor([rank[i] for i in in_host]), self.device)] = staged
        x[to_device(torch.tensor([rank[i] for i in on_device]), self.device)] = decoded
        return x

    def _gather_part(self, batch: dict[str, Any], errors: list[str | None], start: int, stop: int):
        """:meth:`gather` of rows ``start:stop`` on the copy stream; ``(crops, event)`` (``event``: when the
        crops are ready on that stream; ``None`` off CUDA). Sets ``errors[start:stop]``."""
        part = {k: v[start:stop] for k, v in batch.items()}
        errs = errors[start:stop]
        stream = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else contextlib.nullcontext()
        event = None
        with stream:
            x = self.gather(part, errs)
            if self._copy_stream is not None:
                x = None if x is None else to_device(x, self.device)  # host crops: copied here, not in forward
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        errors[start:stop] = errs
        return x, event

    def _ready(self, x: torch.Tensor | None, event: Any) -> torch.Tensor | None:
        """``x`` for use on the current stream: after ``event``, its memory kept until that stream is done."""
        if event is not None and x is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            if x.device.type == "cuda":
                x.record_stream(current)
        return x

    def parts(self, batch: dict[str, Any], errors: list[str | None]) -> Iterator[tuple[torch.Tensor | None, int]]:
        """The ok rows' crops of each part of ``batch`` in turn, with the part's size; pipelined, the next part
        is gathered on the prefetch thread while the caller works on this one."""
        n = len(errors)
        bounds = [(s, min(n, s + self.part_rows)) for s in range(0, n, self.part_rows)]
        if self._prefetch is None or len(bounds) < 2:
            for start, stop in bounds:
                yield self._ready(*self._gather_part(batch, errors, start, stop)), stop - start
            return
        pending = self._prefetch.submit(self._gather_part, batch, errors, *bounds[0])
        for j, (start, stop) in enumerate(bounds):
            got = pending.result()
            if j + 1 < len(bounds):
                pending = self._prefetch.submit(self._gather_part, batch, errors, *bounds[j + 1])
            yield self._ready(*got), stop - start

    def forward(self, x: torch.Tensor) -> HostCopy:
        """Class probabilities of crops ``uint8 (n, 3, S, S)``, on their way to the host (padded to a bucket
        when pipelined: read only the first ``n`` rows)."""
        return predict_async(self.model, pad_rows(x) if self.pipelined else x, mean=self.card.mean,
                             std=self.card.std, device=self.device, precision=self.precision)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        self.calls += 1
        testhooks.pause(f"score-predict-{self.calls}")  # test-only: lose a node while actors hold work
        if self.faces is not None:
            return self.score_faces(batch)
        n = len(batch["path"])
        errors = column(batch, "error", n)
        probs = PartProbs(len(self.card.classes))
        for x, _ in self.parts(batch, errors):
            if x is not None:
                probs.add(self.forward(x), len(x))
        batch["error"] = np.array(errors, dtype=object)
        table = result_table(batch, probs, schema=self.schema, classes=self.card.classes,
                             alert_classes=self.card.alert_classes,
                             model_id=self.card.model_id, run_id=self.run_id, scored_at=results.utc_now())
        if self.calls == 1:
            timeline.mark("first forward done", "predictor")
        return table

    def score_faces(self, batch: dict[str, Any]) -> pa.Table:
        """Rows of a :data:`~maskmodel.score.loading.FACE_COLUMNS` batch: faces found, each classified, the
        deciding face's verdict as the row's (:mod:`maskmodel.score.faces`)."""
        n, stage, classes = len(batch["path"]), self.faces, self.card.classes
        errors = column(batch, "error", n)
        ok = [i for i in range(n) if errors[i] is None]
        images = [np.frombuffer(batch["image"][i], np.uint8).reshape(int(batch["image_h"][i]),
                                                                       int(batch["image_w"][i]), 3) for i in ok]
        found = stage.find(images, [(int(batch["width"][i]), int(batch["height"][i])) for i in ok])
        pieces = [stage.cut(im, f.crops) if len(f) else stage.whole(im) for im, f in zip(images, found)
                  if len(f) or stage.auto]
        parts = PartProbs(len(classes))
        crops = torch.cat(pieces) if pieces else None
        step = self.part_rows if self.pipelined else DEFAULT_FACE_ROWS
        for start in range(0, 0 if crops is None else len(crops), step):  # bounded, bucketed forward passes
            parts.add(self.forward(crops[start:start + step]), len(crops[start:start + step]))
        probs = np.asarray(parts)
        verdicts = np.full((len(ok), len(classes)), np.nan, np.float32)
        cols = FaceColumns([None] * n, [None] * n, [None] * n)
        at = 0
        for r, (i, f) in enumerate(zip(ok, found)):
            cols.dropped[i], cols.detector[i], cols.faces[i] = f.dropped, stage.detector_id, []
            if len(f):
                p = probs[at:at + len(f)]
                at += len(f)
                verdicts[r] = verdict(p, self.alert)
                cols.faces[i] = face_records(f, p, classes)
            elif stage.auto:  # no face: the whole image is classified as a crop, and the row says no detector decided
                verdicts[r], cols.detector[i] = probs[at], results.NO_DETECTOR
                at += 1
        batch["error"] = np.array(errors, dtype=object)
        table = result_table(batch, verdicts, schema=self.schema, classes=classes, model_id=self.card.model_id,
                             alert_classes=self.card.alert_classes,
                             run_id=self.run_id, scored_at=results.utc_now(), faces=cols)
        if self.calls == 1:
            timeline.mark("first forward done", "predictor")
        return table


timeline.mark("inference imported", "import")
