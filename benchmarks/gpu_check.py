"""The product's own GPU code on one CUDA device, without Ray: checks (one line each: ok, or the failure), then img/s.

Runs where only torch, torchvision, numpy, Pillow, pyarrow and fsspec are installed (the offline GPU host:
no Ray, no s3fs), from the repository root with ``PYTHONPATH=.``. Everything it drives is what the jobs run:

- ``score-decode``: :func:`maskmodel.score.loading.load_batch` and :class:`maskmodel.score.inference.Predictor` with
  ``--decode gpu`` and ``--decode cpu`` on the same photos (camera-sized JPEGs, the same photos EXIF-rotated,
  as PNG, and a cut-off JPEG), from local files: the rows must agree (status, error, width, height, route);
  labels agree on at least 99 % of the photos, any other label being a near-tie; the largest probability
  difference (nvJPEG's full decode against libjpeg's scaled decode) is printed.
- ``face-stage``: ``load_batch(max_pixels=...)`` (one whole decode per photo) and the predictor with
  ``--faces centerface`` on the device and on the CPU, on Grace Hopper's photograph (matplotlib's sample) pasted
  into camera-sized frames: the same faces found (box IoU >= 0.9), the same labels up to near-ties; prints the
  detector's ms/image on the device and the decoded bytes/image that would cross the object store.
- ``device-identity``: a predictor made with ``cuda`` takes a batch already on ``cuda:0`` without a copy.
- ``train-step``: :func:`maskmodel.train.loop._run_epoch` with :class:`maskmodel.data.augment.DeviceAugment`
  on the device (bf16, channels_last, SGD), fed uint8 crops as Ray Data's ``iter_torch_batches`` would.
- then a table: decode + preprocess + forward img/s at a few batch sizes (bf16, channels_last): the
  predictor with GPU decoding, the load step decoding on CPU threads plus the predictor, and the forward alone.

The model directory is written at start, with seeded random weights. Without CUDA it says it needs a GPU and
exits 0 having run nothing; ``--device cpu`` runs every check tiny on a CPU (the smoke test does).

::

    PYTHONPATH=. python benchmarks/gpu_check.py                      # on a GPU host: about 2-3 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --arch resnet18 --image-size 32 \\
        --photo-size 160x120 --distinct 2 --batch-sizes 4 --iters 1  # the smoke run on a CPU
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from maskmodel.data import synth
from maskmodel.data.augment import DeviceAugment
from maskmodel.data.transforms import TrainCrop, resize_for
from maskmodel.models.classifier import ModelCard, build_model, save_model_dir, state_dict_bytes
from maskmodel.models.precision import predict, same_device
from maskmodel.score.inference import Predictor
from maskmodel.score.loading import load_batch
from maskmodel.train.loop import _run_epoch

CLASSES = ("mask", "no_mask")
FAILED: list[str] = []


def report(name: str, problem: str | None, detail: str = "") -> None:
    """One line per check: ``ok`` or the failure."""
    print(f"{name}: {'ok' if problem is None else 'FAILED: ' + problem}{'  (' + detail + ')' if detail else ''}",
          flush=True)
    if problem is not None:
        FAILED.append(name)


def check(name: str, fn: Callable[[], tuple[str | None, str]]) -> None:
    try:
        report(name, *fn())
    except Exception as e:  # noqa: BLE001 - a crash is this check's failure; the others still run
        report(name, f"{type(e).__name__}: {e}"[:500])


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


def png(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def photos(args: argparse.Namespace) -> dict[str, bytes]:
    """Camera-sized JPEGs of both classes, the same turned and EXIF-tagged, some as PNG, one cut off."""
    w, h = (int(v) for v in args.photo_size.split("x"))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        plain = list(pool.map(lambda i: synth.render_photo(CLASSES[i % 2], i, width=w, height=h), range(args.distinct)))
    out = {f"plain/{i}.jpg": d for i, d in enumerate(plain)}
    for i, d in enumerate(plain):
        out[f"exif/{i}.jpg"] = rotated(d, (6, 3, 8)[i % 3])
    for i, d in enumerate(plain[: max(1, len(plain) // 4)]):
        out[f"png/{i}.png"] = png(d)
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
        return f"routed to the device: {sorted(routed)} (only upright JPEGs belong there)", ""
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


def face_stage(model_uri: str, root: str, card: ModelCard, device: torch.device, args: argparse.Namespace):
    """The face path (detector + face crops + classifier) on ``device`` against the CPU: (problem, detail)."""
    import io

    from matplotlib import cbook
    from PIL import Image
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
    tables = {}
    for dev in (device, torch.device("cpu")):
        pred = Predictor(model_uri, run_id="check", precision=args.precision if dev.type == "cuda" else "fp32",
                         device=str(dev), faces="centerface", detect_options=DetectOptions())
        pred(dict(batch))  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        images = [np.frombuffer(b, np.uint8).reshape(hh, ww, 3)
                  for b, ww, hh in zip(batch["image"], batch["image_w"], batch["image_h"])]
        pred.faces.find(images, list(zip(batch["width"], batch["height"])))
        sync(dev)
        ms = (time.perf_counter() - t0) * 1000 / len(paths)
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
    return None, (f"{len(paths)} photos, one face each found on both; detector {ms_dev:.1f} ms/image on {device}, "
                  f"{ms_cpu:.1f} on the CPU; {crossing / 1e6:.2f} MB uint8 per decoded photo crosses to a GPU actor")


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
    """What :func:`_run_epoch` reads from a Ray Data shard: uint8 crops and labels, on the device, pinned on the way."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def iter_torch_batches(self, *, batch_size: int, device: torch.device, pin_memory: bool = False, **_: Any):
        for i in range(0, len(self.images), batch_size):
            x, y = self.images[i:i + batch_size], self.labels[i:i + batch_size]
            if pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            yield {"image": x.to(device, non_blocking=True), "label": y.to(device, non_blocking=True)}


def train_crops(datas: list[bytes], size: int, n: int) -> torch.Tensor:
    from maskmodel.io.decode import decode, to_uint8_chw

    crop = TrainCrop(crop_size=size)
    one = [crop(torch.from_numpy(to_uint8_chw(decode(d, reduce_to=crop.decode_side).image))) for d in datas]
    return torch.stack([one[i % len(one)] for i in range(n)])


def train_step(args: argparse.Namespace, plain: list[bytes], device: torch.device):
    model = build_model(args.arch, len(CLASSES)).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    bs = args.batch_sizes[0]
    n = bs * max(2, args.iters)
    shard = Shard(train_crops(plain, args.image_size, n), torch.arange(n) % 2)
    gen = torch.Generator(device=device).manual_seed(0)
    augment = DeviceAugment()
    before = [p.detach().clone() for p in model.parameters()][:3]
    out = _run_epoch(model, shard, device=device, batch_size=bs, prepare=lambda x: augment(x, gen), optimizer=opt,
                     precision=args.precision, num_classes=len(CLASSES), channels_last=True)
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    rate = out["images"] / out["seconds"]
    detail = f"{out['images']} images, loss {out['loss']:.3f}, {rate:,.0f} img/s at batch {bs} (first batch included)"
    if out["images"] != n or not np.isfinite(out["loss"]) or not changed:
        return f"images {out['images']} of {n}, loss {out['loss']}, weights changed: {changed}", detail
    return None, detail


def throughput(model_uri: str, args: argparse.Namespace, paths: list[str], card: ModelCard, device: torch.device):
    """img/s of decode + preprocess + forward per batch size: GPU decode, CPU decode, forward alone."""
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
        for fn in (gpu, cpu, lambda: predict(pred.model, resident, mean=card.mean, std=card.std, device=device,
                                             precision=args.precision)):
            fn()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            sync(device)
            rates.append(bs * args.iters / (time.perf_counter() - t0))
        rows.append((bs, *rates))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{name}, torch {torch.__version__}, {args.arch} {args.image_size} px, {args.precision} channels_last, "
          f"{args.photo_size} JPEGs ({args.distinct} distinct), CPU decode on {threads} threads")
    print("| batch | decode on GPU + forward img/s | decode on CPU + forward img/s | forward only img/s |")
    print("|---:|---:|---:|---:|")
    for bs, g, c, f in rows:
        print(f"| {bs} | {g:,.0f} | {c:,.0f} | {f:,.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--photo-size", default="1920x1080", help="WIDTHxHEIGHT of the rendered photos")
    p.add_argument("--distinct", type=int, default=24, help="distinct photos rendered (each also EXIF-rotated)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--iters", type=int, default=5, help="timed calls per batch size (after one warm-up)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
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
        print(f"{len(files)} photos and a {args.arch} model written in {time.perf_counter() - t0:.0f} s", flush=True)
        check("score-decode", lambda: score_decode(model_uri, batch, card, device, args.precision))
        check("face-stage", lambda: face_stage(model_uri, root, card, device, args))
        check("device-identity", lambda: device_identity(model_uri, card, device))
        check("train-step", lambda: train_step(args, plain, device))
        try:
            throughput(model_uri, args, [os.path.join(root, n) for n in files if n.startswith("plain/")], card, device)
        except Exception as e:  # noqa: BLE001
            report("throughput", f"{type(e).__name__}: {e}"[:500])
    print(f"\n{'all checks ok' if not FAILED else 'FAILED: ' + ', '.join(FAILED)} in {time.perf_counter() - t0:.0f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
