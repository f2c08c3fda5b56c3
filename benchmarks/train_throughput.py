"""Training throughput: the Ray Train job with 1 worker vs. a plain single-process PyTorch loop.

Both train the same model on the same synthetic JPEGs with the same global batch, precision,
augmentation and torch threads, reading the same files from local disk and decoding + augmenting
every epoch. Images/s is measured on the epochs after the first (the first pays for start-up:
Ray's and the model's), train phase only, in both. Prints both and the ratio (target ≥ 0.9 on CPU)::

    python benchmarks/train_throughput.py                        # CPU defaults: resnet50, 64 px
    python benchmarks/train_throughput.py --image-size 224 --gpu --batch-size 256 --n-per-class 4000
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import tempfile
import time

import torch

from maskmodel import storage
from maskmodel.data import discover
from maskmodel.decode import decode_image, to_uint8_chw
from maskmodel.model import build_model
from maskmodel.synth import DatasetConfig, write_dataset
from maskmodel.training import TrainConfig, train
from maskmodel.transforms import TrainPreset


def plain_loop(data_uri: str, *, arch: str, image_size: int, batch_size: int, epochs: int, threads: int,
               device: str, bf16: bool) -> list[float]:
    """Images/s per epoch of the loop a newcomer writes: read, decode, augment, step, in one process."""
    torch.set_num_threads(threads)
    items = discover(data_uri).splits["train"]
    model = build_model(arch, 2).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    tf = TrainPreset(crop_size=image_size)
    rates = []
    for _ in range(epochs):
        order = torch.randperm(len(items)).tolist()
        start, seen = time.perf_counter(), 0
        for b in range(0, len(order), batch_size):
            chunk = [items[i] for i in order[b:b + batch_size]]
            x = torch.stack([tf(torch.from_numpy(to_uint8_chw(decode_image(storage.read_bytes(it.uri)))))
                             for it in chunk]).to(device)
            y = torch.tensor([it.label for it in chunk], device=device)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-per-class", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in both")
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if args.gpu else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        write_dataset(DatasetConfig(out=data, n_per_class=args.n_per_class, image_size=args.image_size))
        plain = plain_loop(data, arch=args.arch, image_size=args.image_size, batch_size=args.batch_size,
                           epochs=args.epochs, threads=args.threads, device=device, bf16=args.gpu)
        out = train(TrainConfig(data=data, output=f"{tmp}/run", arch=args.arch, weights="none",
                                epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
                                num_workers=1, gpu=args.gpu, torch_threads=args.threads,
                                cpus_per_worker=1.0, max_failures=0))
        rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{tmp}/run/metrics.csv"))))
        ray_rates = [float(r["images_per_s"]) for r in rows]
    steady = lambda r: sum(r[1:]) / len(r[1:]) if len(r) > 1 else r[0]  # noqa: E731
    result = {
        "device": torch.cuda.get_device_name() if args.gpu else "cpu", "arch": args.arch,
        "image_size": args.image_size, "batch_size": args.batch_size, "threads": args.threads,
        "train_images": 2 * args.n_per_class, "epochs": args.epochs,
        "plain_img_s": round(steady(plain), 1), "ray_train_img_s": round(steady(ray_rates), 1),
        "ratio": round(steady(ray_rates) / steady(plain), 3), "val_acc": round(out.val_acc, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
