"""The scoring data path on camera-sized JPEGs from S3, side by side in one run.

N distinct 1920x1080 photo-like JPEGs (``maskmodel.data.synth.render_photo``: busy scene plus sensor
noise, 250-550 KB each, like a camera's) are served by a moto S3 server on loopback, directly and
through a loopback proxy that adds ``--latency-ms`` to every request (real S3/GCS first-byte
latency is 20-100 ms). The 10·N collection repeats the N photos under other keys. Reported:

- load step, CPU ms per image, in-process on one core: the old path (full-size decode, resize,
  crop, float32 normalise) against the new one (reduced-size decode, resize, crop, uint8);
- bytes per image crossing Ray's object store between load and predict: old float32, new uint8,
  and the compressed bytes that GPU decoding ships instead;
- ``jobs.score`` img/s from S3 at 0 ms and at ``--latency-ms``, at N and 10·N, each run a
  ``python -m jobs.score`` process with its own local Ray (img/s excludes starting Ray, includes
  actor start and model load); and the load step in CPU tasks of its own (``--load-tasks``)
  against the default, fused into the predictor actors;
- the bare model forward on the same crops (same batch, precision, threads): end to end / bare;
- peak memory (summed PSS of the job's process tree) at N and 10·N.

Runs on a laptop with the defaults (a few minutes on 2 cores)::

    python benchmarks/data_path.py                    # N=64, resnet50, 224 px, CPU
    python benchmarks/data_path.py --n 256 --num-gpus 1 --batch-size 512    # a GPU node
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import numpy as np
import torch

from maskmodel.data import synth
from maskmodel.data.transforms import EvalCrop, EvalPreset, preprocess_image, resize_for
from maskmodel.io import storage
from maskmodel.io.decode import decode, to_uint8_chw
from maskmodel.io.latency_proxy import LatencyProxy
from maskmodel.models.classifier import ModelCard, build_model, load_model_dir, save_model_dir, state_dict_bytes
from maskmodel.models.precision import BF16_AGREEMENT_KEY, label_agreement, predict, resolve_precision
from maskmodel.score import loading

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}
SUMMARY = re.compile(r"^(\d+) images: \d+ ok, \d+ errors.*?, ([\d.]+) images/s", re.M)
TICK = os.sysconf("SC_CLK_TCK")


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.2)
    raise SystemExit("moto server did not start")


def tree_pss(root: int, cpu: dict[int, float]) -> int:
    """Summed PSS (bytes) of ``root`` and its descendants; records each one's CPU seconds into ``cpu``."""
    children: dict[int, list[int]] = {}
    seconds: dict[int, float] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        seconds[int(entry)] = (int(fields[11]) + int(fields[12])) / TICK
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        cpu[pid] = max(cpu.get(pid, 0.0), seconds.get(pid, 0.0))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except OSError:
            pass
    return total


def score_job(images: str, model: str, output: str, endpoint: str, args: argparse.Namespace,
              *extra: str) -> dict:
    """One ``python -m jobs.score`` run with its own local Ray: img/s from its summary, peak memory, CPU s."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(S3_ENV, AWS_ENDPOINT_URL_S3=endpoint, RAY_DISABLE_DOCKER_CPU_WARNING="1")
    # --faces none: this is the whole-image data path that the bare forward is compared with (the face stage
    # has its own benchmark, face_speed.py).
    cmd = [sys.executable, "-m", "jobs.score", "--input", images, "--model", model, "--output", output,
           "--faces", "none", "--run-id", uuid.uuid4().hex[:8], "--precision", args.precision,
           "--num-gpus", str(args.num_gpus),
           *(["--batch-size", str(args.batch_size)] if args.batch_size else []), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, cpu, stop = 0, {}, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_pss(proc.pid, cpu))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    m = SUMMARY.search(out)
    if proc.returncode or not m:
        raise SystemExit(f"jobs.score failed ({proc.returncode}): {out[-2000:]} {err[-3000:]}")
    return {"images": int(m.group(1)), "img_s": float(m.group(2)), "peak_gib": peak / 2**30,
            "cpu_s": sum(cpu.values())}


def load_step_cpu_ms(photos: list[bytes], card: ModelCard) -> tuple[float, float]:
    """CPU ms per image of the load step's decode+preprocess, old path and new path, one core."""
    torch.set_num_threads(1)
    old = EvalPreset(crop_size=card.input_size, resize_size=card.resize_size, mean=card.mean, std=card.std)
    crop = EvalCrop(crop_size=card.input_size, resize_size=card.resize_size)

    def timed(fn) -> float:
        fn(photos[0])  # warm-up
        c0 = time.process_time()
        for p in photos:
            fn(p)
        return (time.process_time() - c0) / len(photos) * 1e3

    ms_old = timed(lambda p: old(torch.from_numpy(to_uint8_chw(decode(p).image))).numpy())
    ms_new = timed(lambda p: preprocess_image(p, crop))
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return ms_old, ms_new


def bare_forward(model_dir: str, crops: np.ndarray, args: argparse.Namespace, precision: str) -> float:
    model, card = load_model_dir(model_dir)
    device = "cuda" if args.num_gpus else "cpu"
    model = model.to(device, memory_format=torch.channels_last).eval()
    bs = args.batch_size or (512 if args.num_gpus else 64)
    kw = dict(mean=card.mean, std=card.std, device=device, precision=precision)
    predict(model, crops[:bs], **kw)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(crops), bs):
        predict(model, crops[i:i + bs], **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    return len(crops) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="distinct photos; the large collection is scale·N")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--latency-ms", type=float, default=30.0)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224, help="model input size")
    p.add_argument("--batch-size", type=int, default=0, help="0: the job's default")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--num-gpus", type=float, default=0.0)
    args = p.parse_args()
    load_before = os.getloadavg()
    moto, endpoint = start_moto()
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL_S3=endpoint)
    try:
        t0 = time.perf_counter()
        photos = [synth.render_photo(synth.CLASSES[i % 2], i) for i in range(args.n)]
        print(f"{args.n} photos drawn in {time.perf_counter() - t0:.0f} s, "
              f"{np.mean([len(x) for x in photos]) / 1e3:.0f} KB each on average", flush=True)
        bucket = "s3://bench-" + uuid.uuid4().hex[:8]
        storage.filesystem(bucket)[0].mkdir(bucket[5:])
        small, large = f"{bucket}/n", f"{bucket}/n{args.scale}"
        for i, data in enumerate(photos):
            storage.write_bytes(f"{small}/{i:05d}.jpg", data)
            for k in range(args.scale):
                storage.write_bytes(f"{large}/{k:02d}/{i:05d}.jpg", data)

        torch.manual_seed(0)
        model = build_model(args.arch, 2)
        card = ModelCard(arch=args.arch, classes=("mask", "no_mask"), input_size=args.size,
                         resize_size=resize_for(args.size))
        crop = EvalCrop(crop_size=card.input_size, resize_size=card.resize_size)
        crops = np.stack([preprocess_image(x, crop)[0] for x in photos])
        agreement = label_agreement(model, [crops[i:i + 32] for i in range(0, len(crops), 32)],
                                              mean=card.mean, std=card.std)
        card = ModelCard(**{**card.__dict__, "metrics": {BF16_AGREEMENT_KEY: agreement}})
        model_dir = f"{bucket}/model"
        save_model_dir(model_dir, state_dict_bytes(model), card)
        del model

        ms_old, ms_new = load_step_cpu_ms(photos, card)
        batch = loading.load_batch({"path": np.array([f"{small}/{i:05d}.jpg" for i in range(args.n)], object)},
                                     card=card, max_bytes=64 << 20)
        gpu_batch = loading.load_batch({"path": batch["path"]}, card=card, max_bytes=64 << 20, gpu_decode=True)
        bytes_new = batch["pixels"].nbytes / args.n
        bytes_gpu = sum(len(d) for d in gpu_batch["data"]) / args.n
        bytes_old = 3 * args.size * args.size * 4

        out = f"{bucket}/scores"
        with LatencyProxy(endpoint, latency_s=args.latency_ms / 1e3) as proxy:
            runs = {
                "0ms-n": score_job(small, model_dir, out, endpoint, args),
                "lat-n": score_job(small, model_dir, out, proxy.url, args),
                "0ms-10n": score_job(large, model_dir, out, endpoint, args),
                "lat-10n": score_job(large, model_dir, out, proxy.url, args),
                "tasks-10n": score_job(large, model_dir, out, endpoint, args, "--load-tasks"),
            }
        precision = resolve_precision(args.precision, device="cuda" if args.num_gpus else "cpu", card=card)
        bare = bare_forward(model_dir, np.concatenate([crops] * max(1, 256 // args.n)), args, precision)
    finally:
        moto.terminate()
    load_after = os.getloadavg()

    r = runs
    device = "GPU" if args.num_gpus else f"CPU ({len(os.sched_getaffinity(0))} cores)"
    print(f"\n{args.arch} {args.size} px, {precision} (bf16/fp32 label agreement {agreement:.3f}), {device}, "
          f"N={args.n}, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"load step CPU ms/image (1 core): old {ms_old:.1f}, new {ms_new:.1f} (x{ms_old / ms_new:.1f})")
    print(f"bytes/image load -> predict: old float32 {bytes_old / 1e3:.0f} KB, new uint8 {bytes_new / 1e3:.0f} KB, "
          f"GPU decoding ships {bytes_gpu / 1e3:.0f} KB (compressed)")
    print("| run | images | img/s | peak memory GiB |")
    for name, v in r.items():
        print(f"| {name} | {v['images']} | {v['img_s']:.1f} | {v['peak_gib']:.2f} |")
    print(f"bare forward {bare:.1f} img/s")
    print(f"{args.latency_ms:g} ms / 0 ms: N {r['lat-n']['img_s'] / r['0ms-n']['img_s']:.2f}, "
          f"{args.scale}N {r['lat-10n']['img_s'] / r['0ms-10n']['img_s']:.2f} (target >= 0.90)")
    print(f"end to end / bare forward: N {r['0ms-n']['img_s'] / bare:.2f}, "
          f"{args.scale}N {r['0ms-10n']['img_s'] / bare:.2f} (target >= 0.85)")
    print(f"load in separate tasks / fused into the actors ({args.scale}N): "
          f"{r['tasks-10n']['img_s'] / r['0ms-10n']['img_s']:.2f}")
    print(f"peak memory {args.scale}N / N: {r['0ms-10n']['peak_gib'] / r['0ms-n']['peak_gib']:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
