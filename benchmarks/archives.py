"""Loose objects against tar shards: the same camera-sized JPEGs scored from S3 behind a 30 ms latency proxy.

``--n`` images (``--distinct`` 1920x1080 photos from ``maskmodel.data.synth.render_photo``, repeated) are
stored twice on a moto S3 server on loopback: as loose objects, and as WebDataset-style tar shards of
``--shard-size`` images. Each collection is scored by ``python -m jobs.score`` (its own local Ray),
with every request to S3 going through a loopback proxy that adds ``--latency-ms`` and counts
requests. Reported side by side: img/s and GET requests per 100 images, of the image data alone
and in all (the listing, the model and the results table's own requests included).

::

    python benchmarks/archives.py                     # N=2000, shards of 1000, resnet18 at 112 px, CPU
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import time
import uuid

import torch

# Run as `python benchmarks/archives.py`, whose folder is first on sys.path: the sibling's helpers.
from data_path import S3_ENV, score_job, start_moto

from maskmodel.data import synth
from maskmodel.data.transforms import resize_for
from maskmodel.io import storage
from maskmodel.io.latency_proxy import LatencyProxy
from maskmodel.models.classifier import ModelCard, build_model, save_model_dir, state_dict_bytes


def shard(images: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in images:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--distinct", type=int, default=32)
    p.add_argument("--latency-ms", type=float, default=30.0)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=112, help="model input size")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--num-gpus", type=float, default=0.0)
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    moto, endpoint = start_moto()
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL_S3=endpoint)
    try:
        photos = [synth.render_photo(synth.CLASSES[i % 2], i) for i in range(args.distinct)]
        images = [(f"{synth.CLASSES[i % 2]}/{i:06d}.jpg", photos[i % args.distinct]) for i in range(args.n)]
        bucket = "s3://archives-" + uuid.uuid4().hex[:8]
        storage.filesystem(bucket)[0].mkdir(bucket[5:])
        for name, data in images:
            storage.write_bytes(f"{bucket}/loose/{name}", data)
        for k in range(0, args.n, args.shard_size):
            storage.write_bytes(f"{bucket}/shards/shard-{k // args.shard_size:06d}.tar",
                                shard(images[k:k + args.shard_size]))
        torch.manual_seed(0)
        model_dir = f"{bucket}/model"
        save_model_dir(model_dir, state_dict_bytes(build_model(args.arch, 2)),
                       ModelCard(arch=args.arch, classes=synth.CLASSES, input_size=args.size,
                                 resize_size=resize_for(args.size)))
        runs = {}
        with LatencyProxy(endpoint, latency_s=args.latency_ms / 1e3) as proxy:
            for name in ("loose", "shards"):
                proxy.reset()
                t0 = time.perf_counter()
                runs[name] = score_job(f"{bucket}/{name}", model_dir, f"{bucket}/scores-{name}", proxy.url, args)
                # Path-style requests: the image data are the GETs of /<bucket>/<name>/...; the rest is
                # the listing, the model and the results table, the same for both inputs.
                data = sum(n for (method, path), n in proxy.targets.items()
                           if method == "GET" and path.startswith(f"/{bucket[5:]}/{name}/"))
                runs[name].update(gets=proxy.requests["GET"], data_gets=data, heads=proxy.requests["HEAD"],
                                  puts=proxy.requests["PUT"], wall_s=time.perf_counter() - t0)
    finally:
        moto.terminate()
    kb = sum(len(d) for d in photos) / len(photos) / 1e3
    print(f"\n{args.n} images ({kb:.0f} KB average, 1920x1080), {args.arch} {args.size} px, "
          f"{args.latency_ms:g} ms added to every S3 request, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print("| input | images scored | img/s | GETs of image data | per 100 images | all GETs | all per 100 | HEAD |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        label = "loose objects" if name == "loose" else f"tar shards of {args.shard_size}"
        print(f"| {label} | {r['images']} | {r['img_s']:.1f} | {r['data_gets']} "
              f"| {100 * r['data_gets'] / r['images']:.2f} | {r['gets']} | {100 * r['gets'] / r['images']:.2f} "
              f"| {r['heads']} |")
    s = runs["shards"]
    print(f"shards / loose img/s: {s['img_s'] / runs['loose']['img_s']:.2f} (target >= 1.0); GETs per 100 images "
          f"with shards: {100 * s['data_gets'] / s['images']:.2f} of image data, {100 * s['gets'] / s['images']:.2f} "
          f"in all (target <= 1)")


if __name__ == "__main__":
    main()
