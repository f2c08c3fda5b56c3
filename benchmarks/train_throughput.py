"""Training's data path on camera-sized JPEGs, and the Ray Train job against a plain PyTorch loop, side by side.

The images are ``--distinct`` 1920x1080 photo-like JPEGs (``maskmodel.data.synth.render_photo``, 250-550 KB,
like a camera's) copied to ``--n-per-class`` files per class on local disk. Reported:

- data-step CPU ms per training image, in-process on one core: the old path (full-size decode, then
  random resized crop, flip, rotation, colour jitter and normalise on the CPU, float32 out) against the
  new one (decode at the reduced size the random crop needs, random resized crop and flip, uint8 out);
- bytes per image crossing Ray's object store: float32 against uint8;
- training img/s of ``jobs.train``'s library function with 1 Ray Train worker against a plain
  single-process loop doing the same work (read, reduced decode, crop + flip, rotation + jitter +
  normalise with ``DeviceAugment``, step), same model, batch, precision and torch threads; the epochs
  after the first (the first pays for start-up in both).

::

    python benchmarks/train_throughput.py                         # CPU defaults: resnet50, 64 px
    python benchmarks/train_throughput.py --gpu --image-size 224 --batch-size 256 --n-per-class 2000
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from torchvision.transforms import v2

from maskmodel.data import synth
from maskmodel.data.augment import DeviceAugment
from maskmodel.data.discovery import discover
from maskmodel.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainCrop
from maskmodel.io import storage
from maskmodel.io.decode import decode, to_uint8_chw
from maskmodel.models.classifier import build_model
from maskmodel.train.training import TrainConfig, train


def make_photos(root: str, *, n_per_class: int, distinct: int) -> None:
    """``root/{train,val}/{mask,no_mask}/*.jpg``: ``distinct`` photos per class, copied up to ``n_per_class``."""
    for label in synth.CLASSES:
        photos = [synth.render_photo(label, i) for i in range(distinct)]
        for split, n in (("train", n_per_class), ("val", max(4, n_per_class // 8))):
            folder = os.path.join(root, split, label)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
                    f.write(photos[i % distinct])


def data_step_cpu_ms(paths: list[str], image_size: int) -> tuple[float, float]:
    """CPU ms per image on one core: the old CPU augmentation (float32 out) and the new CPU half (uint8 out)."""
    torch.set_num_threads(1)
    old = v2.Compose([v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                      v2.RandomRotation(15), v2.ColorJitter(0.2, 0.2, 0.2), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
    crop = TrainCrop(crop_size=image_size)
    datas = [open(p, "rb").read() for p in paths]

    def timed(fn) -> float:
        fn(datas[0])
        c0 = time.process_time()
        for d in datas:
            fn(d)
        return (time.process_time() - c0) / len(datas) * 1e3

    before = timed(lambda d: old(torch.from_numpy(to_uint8_chw(decode(d).image))))
    after = timed(lambda d: crop(torch.from_numpy(to_uint8_chw(decode(d, reduce_to=crop.decode_side).image))))
    return before, after


def plain_loop(data_uri: str, *, arch: str, image_size: int, batch_size: int, epochs: int, threads: int,
               device: str, bf16: bool) -> list[float]:
    """Images/s per epoch of one process doing the job's work: read, reduced decode, crop, augment, step."""
    torch.set_num_threads(threads)
    items = discover(data_uri).splits["train"]
    model = build_model(arch, 2).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    crop, augment = TrainCrop(crop_size=image_size), DeviceAugment()
    rates = []
    for _ in range(epochs):
        order = torch.randperm(len(items)).tolist()
        start, seen = time.perf_counter(), 0
        for b in range(0, len(order), batch_size):
            chunk = [items[i] for i in order[b:b + batch_size]]
            x = torch.stack([crop(torch.from_numpy(to_uint8_chw(decode(storage.read_bytes(it.uri),
                                                                       reduce_to=crop.decode_side).image)))
                             for it in chunk]).to(device)
            y = torch.tensor([it.label for it in chunk], device=device)
            x = augment(x)
            if device == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(chunk)
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - start))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-per-class", type=int, default=128)
    p.add_argument("--distinct", type=int, default=16, help="distinct photos per class (about 0.8 s each to draw)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in both")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--cache-raw", default="off", choices=("auto", "on", "off"),
                   help="the job's --cache-raw; off (default) reads every epoch from storage, as for data "
                        "larger than the object store")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if args.gpu else "cpu"
    load_before = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="train-bench-")
    try:
        data = f"{tmp}/data"
        make_photos(data, n_per_class=args.n_per_class, distinct=args.distinct)
        sample = [os.path.join(data, "train", c, f"{i:05d}.jpg") for c in synth.CLASSES for i in range(args.distinct)]
        ms_old, ms_new = data_step_cpu_ms(sample, args.image_size)
        ms_old_224, ms_new_224 = data_step_cpu_ms(sample, 224) if args.image_size != 224 else (ms_old, ms_new)
        kb = np.mean([os.path.getsize(f) for f in sample]) / 1e3
        plain = plain_loop(data, arch=args.arch, image_size=args.image_size, batch_size=args.batch_size,
                           epochs=args.epochs, threads=args.threads, device=device, bf16=args.gpu)
        out = train(TrainConfig(data=data, output=f"{tmp}/run", arch=args.arch, weights="none",
                                epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
                                num_workers=1, gpu=args.gpu, torch_threads=args.threads,
                                cpus_per_worker=1.0, max_failures=0, cache_raw=args.cache_raw))
        rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{tmp}/run/metrics.csv"))))
        ray_rates = [float(r["images_per_s"]) for r in rows]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steady = lambda r: sum(r[1:]) / len(r[1:]) if len(r) > 1 else r[0]  # noqa: E731
    s = args.image_size
    print(json.dumps({
        "device": torch.cuda.get_device_name() if args.gpu else f"cpu ({len(os.sched_getaffinity(0))} cores)",
        "arch": args.arch, "image_size": s, "batch_size": args.batch_size, "threads": args.threads,
        "train_images": 2 * args.n_per_class, "epochs": args.epochs, "jpeg_kb": round(kb),
        "data_step_cpu_ms_old": round(ms_old, 2), "data_step_cpu_ms_new": round(ms_new, 2),
        "data_step_cpu_ms_old_224px": round(ms_old_224, 2), "data_step_cpu_ms_new_224px": round(ms_new_224, 2),
        "bytes_per_image_old": 3 * s * s * 4, "bytes_per_image_new": 3 * s * s,
        "plain_img_s": round(steady(plain), 1), "ray_train_img_s": round(steady(ray_rates), 1),
        "ray_over_plain": round(steady(ray_rates) / steady(plain), 3), "val_acc": round(out.val_acc, 3),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }, indent=2))


if __name__ == "__main__":
    main()
