"""Scoring throughput, side by side on the same N synthetic JPEGs, and peak memory at N and 10·N.

(a) the score job end to end: ``python -m jobs.score`` in a subprocess with its own local Ray;
    img/s = images / the run's elapsed time in its commit record (actor start and model load,
    read, decode, predict, write, commit; starting Python and the local Ray instance, which a
    cluster has already done, are reported separately), and the steady rate after the first batch;
(b) the bare model forward pass on pre-decoded, preprocessed tensors, same batch and precision,
    channels_last, all cores;
(c) a plain single-process PyTorch script as a newcomer would write it: PIL decode, torchvision
    transforms, fp32, batch 64, ``torch.no_grad``.

Prints img/s of each, a/b and a/c, and the peak memory (summed PSS of the job's whole process
tree: driver, Ray daemons, workers) of (a) at N and 10·N. Small defaults run on a laptop::

    python benchmarks/score_throughput.py                       # N=512, 224 px, resnet50, CPU
    python benchmarks/score_throughput.py --n 4096 --num-gpus 1 --batch-size 512   # on a GPU node

``--precision auto`` follows the job's policy: on CPU bf16 only when the model card says bf16 gives
the fp32 labels; the benchmark measures that agreement on its own images and records it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # jobs.score runs from here

from maskmodel import inference, results, storage  # noqa: E402
from maskmodel.model import ModelCard, build_model, load_model_dir, save_model_dir, state_dict_bytes  # noqa: E402
from maskmodel.transforms import EvalPreset, resize_for  # noqa: E402

NEWCOMER = textwrap.dedent("""
    import glob, json, sys, time, torch, torchvision
    from PIL import Image
    from torchvision import transforms as T
    images, model_dir, size, resize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    card = json.load(open(model_dir + "/model.json"))
    model = getattr(torchvision.models, card["arch"])(num_classes=len(card["classes"]))
    model.load_state_dict(torch.load(model_dir + "/model.pt", weights_only=True))
    model.eval()
    tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(card["mean"], card["std"])])
    paths = sorted(glob.glob(images + "/*.jpg"))
    t0, c0 = time.perf_counter(), time.process_time()
    labels = []
    with torch.no_grad():
        for i in range(0, len(paths), 64):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + 64]])
            labels += model(x).softmax(1).argmax(1).tolist()
    print(json.dumps({"images": len(labels), "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
""")


def make_images(folder: str, n: int, size: int, seed: int = 0) -> None:
    """``n`` photo-like JPEGs (smooth gradients plus noise, so they compress like photos)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], axis=-1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


TICK = os.sysconf("SC_CLK_TCK")


def tree_stats(root: int, cpu: dict[int, float]) -> int:
    """Summed PSS in bytes of ``root`` and its descendants (Linux /proc; shared pages counted once).

    Also records each process's CPU seconds so far (user + system) into ``cpu``, keyed by pid.
    """
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


def run_job(images: str, model: str, output: str, run_id: str, args: argparse.Namespace) -> dict:
    """(a): the score job in a subprocess; returns img/s from its commit record and its peak memory."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_DISABLE_DOCKER_CPU_WARNING"] = "1"
    cmd = [sys.executable, "-m", "jobs.score", "--input", images, "--model", model, "--output", output,
           "--run-id", run_id, "--precision", args.precision, "--batch-size", str(args.batch_size),
           "--num-gpus", str(args.num_gpus)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, cpu = 0, {}
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_stats(proc.pid, cpu))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"jobs.score failed with exit code {proc.returncode}: {out}")
    record = results.list_commits(output)[-1].raw
    images_done = record["counts"]["images"]
    # Steady state: after the first result batch (actor start and model load are behind us).
    rest = images_done - record["first_batch_rows"]
    steady = rest / (record["elapsed_s"] - record["first_batch_s"]) if rest > 0 else float("nan")
    return {"images": images_done, "img_s": images_done / record["elapsed_s"], "wall_s": wall, "steady_img_s": steady,
            "startup_s": record["first_batch_s"], "ray_start_s": record["ray_start_s"],
            "peak_pss_gib": peak / 2**30, "cpu_s": sum(cpu.values()), "precision": record["precision"], "line": out.strip()}


def bare_forward(model_dir: str, images: str, args: argparse.Namespace, precision: str) -> tuple[float, float]:
    """(b): forward passes only, on tensors decoded and preprocessed beforehand; ``(img/s, CPU s per image)``."""
    model, card = load_model_dir(model_dir)
    device = "cuda" if args.num_gpus else "cpu"
    model = model.to(device, memory_format=torch.channels_last).eval()
    preset = EvalPreset(crop_size=card.input_size, resize_size=card.resize_size, mean=card.mean, std=card.std)
    files = sorted(storage.list_files(images, extensions=("jpg",)), key=lambda o: o.uri)
    x = np.stack([inference.preprocess_image(storage.read_bytes(o.uri), preset)[0] for o in files])
    bs = args.batch_size or (512 if args.num_gpus else 64)
    inference.predict(model, x[:bs], device=device, precision=precision)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(x), bs):
        inference.predict(model, x[i:i + bs], device=device, precision=precision)
    if device == "cuda":
        torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - t0), (time.process_time() - c0) / len(x)


def newcomer(model_dir: str, images: str, size: int) -> tuple[float, float]:
    """(c): the plain script, in its own process; ``(img/s, CPU s per image)``."""
    out = subprocess.run([sys.executable, "-c", NEWCOMER, images, model_dir, str(size), str(resize_for(size))],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["images"] / r["seconds"], r["cpu_s"] / r["images"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=512, help="images for (a), (b), (c); the memory run uses 10·N")
    p.add_argument("--size", type=int, default=224, help="JPEG side and model input size")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--scale", type=int, default=10, help="the memory run scores scale·N images")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="score-bench-")
    small, big = os.path.join(work, f"images-{args.n}"), os.path.join(work, f"images-{args.n * args.scale}")
    make_images(small, args.n, args.size)
    make_images(big, args.n * args.scale, args.size, seed=1)

    model_dir = os.path.join(work, "model")
    torch.manual_seed(0)
    model = build_model(args.arch, 2)
    card = ModelCard(arch=args.arch, classes=("mask", "no_mask"), input_size=args.size,
                     resize_size=resize_for(args.size))
    save_model_dir(model_dir, state_dict_bytes(model), card)  # to read back the exact preprocessing
    _, card = load_model_dir(model_dir)
    preset = EvalPreset(crop_size=card.input_size, resize_size=card.resize_size, mean=card.mean, std=card.std)
    sample = [inference.preprocess_image(storage.read_bytes(o.uri), preset)[0]
              for o in storage.list_files(small)[:128]]
    agreement = inference.label_agreement(model, [np.stack(sample[i:i + 32]) for i in range(0, len(sample), 32)])
    card = ModelCard(**{**card.__dict__, "model_id": "", "metrics": {inference.BF16_AGREEMENT_KEY: agreement}})
    save_model_dir(model_dir, state_dict_bytes(model), card)
    del model

    a = run_job(small, model_dir, os.path.join(work, "out"), "a-n", args)
    precision = a["precision"]
    b, b_cpu = bare_forward(model_dir, small, args, precision)
    c, c_cpu = newcomer(model_dir, small, args.size)
    a10 = run_job(big, model_dir, os.path.join(work, "out"), "a-10n", args)

    cpu = "GPU" if args.num_gpus else f"CPU ({len(os.sched_getaffinity(0))} cores)"
    print(f"\n{args.arch} {args.size}px, batch {args.batch_size}, {precision} "
          f"(bf16/fp32 label agreement {agreement:.3f}), {cpu}, N={args.n}")
    print(f"(a) score job end to end  {a['img_s']:8.1f} img/s   (steady state after the first batch: "
          f"{a['steady_img_s']:.1f} img/s; first rows after {a['startup_s']:.1f} s; local Ray start "
          f"{a['ray_start_s']:.1f} s; whole process incl. Python and Ray start: {args.n / a['wall_s']:.1f} img/s)")
    print(f"(b) bare forward          {b:8.1f} img/s")
    print(f"(c) newcomer script       {c:8.1f} img/s")
    print(f"a/b = {a['img_s'] / b:.2f}   (target >= 0.85; steady state {a['steady_img_s'] / b:.2f})")
    print(f"a/c = {a['img_s'] / c:.2f}   (target >= 2.5)")
    # CPU seconds per image do not depend on what else the machine is running; for (a) the
    # difference between the N and the 10N run cancels start-up (Python, Ray, actor, model load).
    a_cpu = (a10["cpu_s"] - a["cpu_s"]) / (a10["images"] - a["images"])
    print(f"CPU ms per image (whole process tree): (a) {a_cpu * 1e3:.1f}, (b) {b_cpu * 1e3:.1f}, "
          f"(c) {c_cpu * 1e3:.1f} -> b/a = {b_cpu / a_cpu:.2f}, c/a = {c_cpu / a_cpu:.2f}")
    print(f"peak memory of the job: N={args.n}: {a['peak_pss_gib']:.2f} GiB, "
          f"{args.scale}N={args.n * args.scale}: {a10['peak_pss_gib']:.2f} GiB "
          f"-> x{a10['peak_pss_gib'] / a['peak_pss_gib']:.2f} (target <= 1.2); "
          f"{args.scale}N run at {a10['img_s']:.1f} img/s")


if __name__ == "__main__":
    main()
