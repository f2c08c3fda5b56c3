"""The GPU core of scoring and training, without Ray: img/s per batch size on one device.

Runs where only torch and torchvision are installed (the offline GPU host: no Ray, no s3fs), from
the repository root with ``PYTHONPATH=.``; it imports only Ray-free maskmodel modules. Images are
camera-sized JPEGs (``maskmodel.synth.render_photo``, 1920x1080, 250-550 KB), ``--distinct`` of
them drawn and repeated to fill the batches, held in memory: storage is not part of this measure.

``train`` measures one training step (forward, backward, SGD) on uint8 crops already on the device,
with and without the on-device augmentation (rotation, colour jitter, normalise), and the
augmentation alone, at each ``--batch-sizes``.

``score`` measures, at each ``--batch-sizes``:

- ``gpu-decode``: compressed bytes -> torchvision's batched ``decode_jpeg`` on the device (nvJPEG)
  -> resize + centre crop on the device -> normalise -> forward (bf16 autocast, channels_last):
  what a predictor does with ``--decode gpu``;
- ``cpu-decode``: reduced-size PIL decode + crop to uint8 on ``--cpu-workers`` threads, pinned
  host memory, asynchronous copy -> normalise -> forward: the ``--decode cpu`` path;
- ``forward``: the forward pass alone on uint8 crops already on the device.

::

    PYTHONPATH=. python benchmarks/gpu_core.py score                           # on a GPU
    PYTHONPATH=. python benchmarks/gpu_core.py train --batch-sizes 128 256
    PYTHONPATH=. python benchmarks/gpu_core.py score --device cpu --arch resnet18 --batch-sizes 8 \\
        --distinct 4 --iters 2                                                  # a smoke run on a CPU
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from maskmodel import synth
from maskmodel.inference import decode_on_device
from maskmodel.loading import preprocess_image
from maskmodel.model import build_model
from maskmodel.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalCrop, normalize, resize_for


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(fn, n_images: int, iters: int, device: torch.device) -> float:
    """Images/s of ``fn`` (which handles ``n_images``), after one warm-up call."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return n_images * iters / (time.perf_counter() - t0)


def score(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    photos = [synth.render_photo(synth.CLASSES[i % 2], i) for i in range(args.distinct)]
    crop = EvalCrop(crop_size=args.image_size, resize_size=resize_for(args.image_size))
    model = build_model(args.arch, 2).to(device, memory_format=torch.channels_last).eval()
    bf16 = device.type == "cuda" or args.precision == "bf16"

    def forward(x_uint8: torch.Tensor) -> torch.Tensor:
        x = normalize(x_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x).float().softmax(1)

    pool = ThreadPoolExecutor(max_workers=args.cpu_workers)
    rows = []
    for bs in args.batch_sizes:
        datas = [photos[i % len(photos)] for i in range(bs)]

        def gpu_decode() -> torch.Tensor:
            crops = decode_on_device(datas, crop, device=device)
            return forward(torch.stack(crops))

        def cpu_decode() -> torch.Tensor:
            crops = list(pool.map(lambda d: torch.from_numpy(preprocess_image(d, crop)[0]), datas))
            x = torch.stack(crops)
            if device.type == "cuda":
                x = x.pin_memory().to(device, non_blocking=True)
            return forward(x)

        resident = torch.randint(0, 256, (bs, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
        rows.append((bs, _rate(gpu_decode, bs, args.iters, device), _rate(cpu_decode, bs, args.iters, device),
                     _rate(lambda: forward(resident), bs, args.iters, device)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{name}, torch {torch.__version__}, {args.arch} {args.image_size} px, "
          f"{'bf16' if bf16 else 'fp32'} channels_last, {args.distinct} distinct 1920x1080 JPEGs "
          f"({sum(map(len, photos)) / len(photos) / 1e3:.0f} KB avg), CPU decode on {args.cpu_workers} threads")
    print("| batch | gpu-decode img/s | cpu-decode img/s | forward only img/s |")
    print("|---:|---:|---:|---:|")
    for bs, g, c, f in rows:
        print(f"| {bs} | {g:,.0f} | {c:,.0f} | {f:,.0f} |")


def train(args: argparse.Namespace) -> None:
    """One training step (forward, backward, SGD) with on-device augmentation, img/s per batch size."""
    from maskmodel.augment import DeviceAugment
    from maskmodel.decode import decode, to_uint8_chw
    from maskmodel.transforms import TrainCrop

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bf16 = device.type == "cuda" or args.precision == "bf16"
    crop = TrainCrop(crop_size=args.image_size)
    photos = [synth.render_photo(synth.CLASSES[i % 2], i) for i in range(args.distinct)]
    pool = torch.stack([crop(torch.from_numpy(to_uint8_chw(decode(p, reduce_to=crop.decode_side).image)))
                        for p in photos for _ in range(4)])  # what the CPU side delivers: uint8 crops
    model = build_model(args.arch, 2).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    augment = DeviceAugment()
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for bs in args.batch_sizes:
        x8 = pool[torch.arange(bs) % len(pool)].to(device)
        y = (torch.arange(bs, device=device) % 2)

        def step(aug: bool) -> None:
            x = augment(x8, gen) if aug else normalize(x8, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        with_aug = _rate(lambda: step(True), bs, args.iters, device)
        without = _rate(lambda: step(False), bs, args.iters, device)
        augment_only = _rate(lambda: augment(x8, gen), bs, args.iters, device)
        rows.append((bs, with_aug, without, augment_only))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{name}, torch {torch.__version__}, {args.arch} {args.image_size} px, "
          f"{'bf16' if bf16 else 'fp32'} channels_last, SGD; augmentation = rotation + colour jitter + normalise")
    print("| batch | train step + augmentation img/s | train step only img/s | augmentation only img/s |")
    print("|---:|---:|---:|---:|")
    for bs, a, b, c in rows:
        print(f"| {bs} | {a:,.0f} | {b:,.0f} | {c:,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("score", "train"), help="what to time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--iters", type=int, default=10, help="timed calls per batch size (after one warm-up)")
    p.add_argument("--distinct", type=int, default=16, help="distinct photos drawn (about 0.8 s each)")
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 on a GPU, fp32 on a CPU")
    args = p.parse_args()
    {"score": score, "train": train}[args.mode](args)


if __name__ == "__main__":
    main()
