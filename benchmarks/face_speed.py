"""Scoring speed with and without the face stage, side by side in one run, without Ray.

On N camera-like 1920x1080 JPEGs (``maskmodel.data.synth.render_photo``), read from local files, the
product's own per-batch steps as a CPU actor runs them (load step fused, all threads):

- ``--faces none``: :func:`~maskmodel.score.loading.load_batch` (reduced-size decode + crop) then
  :class:`~maskmodel.score.inference.Predictor` (the classifier);
- ``--faces auto``: ``load_batch(max_pixels=...)`` (one whole decode per photo) then the predictor's face
  stage: detector (letterbox + CenterFace + decode + NMS), face crops cut and resized, the classifier on them.

Prints img/s for both, detector ms/image at its input size, and the share of time per stage (load, detect,
cut, classify) of the face path. The model has seeded random weights (speed does not depend on them)::

    PYTHONPATH=. python benchmarks/face_speed.py                 # 32 photos, resnet18 at 128 px
    PYTHONPATH=. python benchmarks/face_speed.py --n 64 --arch resnet50 --image-size 224
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from maskmodel.data import synth
from maskmodel.data.transforms import resize_for
from maskmodel.models.classifier import ModelCard, build_model, save_model_dir, state_dict_bytes
from maskmodel.models.detect import DetectOptions
from maskmodel.score import faces as face_stage
from maskmodel.score.inference import Predictor
from maskmodel.score.loading import load_batch
from maskmodel.score.plan import DEFAULT_MAX_PIXELS

CLASSES = ("mask", "no_mask")


class Timed:
    """Wraps a callable and adds its wall seconds to ``totals[name]``."""

    def __init__(self, fn, name: str, totals: dict[str, float]) -> None:
        self.fn, self.name, self.totals = fn, name, totals

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.totals[self.name] = self.totals.get(self.name, 0.0) + time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32, help="photos per pass")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="photos per predictor call")
    p.add_argument("--threads", type=int, default=0, help="torch and decode threads (0: all cores)")
    p.add_argument("--passes", type=int, default=2, help="timed passes over the photos (after one warm-up batch)")
    args = p.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="face-speed-") as root:
        torch.manual_seed(0)
        card = ModelCard(arch=args.arch, classes=CLASSES, input_size=args.image_size,
                         resize_size=resize_for(args.image_size))
        model = os.path.join(root, "model")
        save_model_dir(model, state_dict_bytes(build_model(args.arch, len(CLASSES))), card)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            datas = list(pool.map(lambda i: synth.render_photo(CLASSES[i % 2], i), range(args.n)))
        paths = []
        for i, d in enumerate(datas):
            paths.append(os.path.join(root, f"{i}.jpg"))
            with open(paths[-1], "wb") as f:
                f.write(d)
        batches = [{"path": np.array(paths[i:i + args.batch], dtype=object)} for i in range(0, len(paths), args.batch)]
        results = {}
        for mode in ("none", "auto"):
            totals: dict[str, float] = {}
            pred = Predictor(model, run_id="bench", precision="fp32", device="cpu", threads=threads, faces=mode,
                             detect_options=DetectOptions())
            if pred.faces is not None:  # time the stage's steps where the predictor calls them
                pred.faces.find = Timed(pred.faces.find, "detect", totals)
                pred.faces.cut = Timed(pred.faces.cut, "cut", totals)
                pred.faces.whole = Timed(pred.faces.whole, "cut", totals)
            extra = {"max_pixels": DEFAULT_MAX_PIXELS} if mode != "none" else {}
            load = Timed(lambda b: load_batch(b, card=card, max_bytes=64 << 20, decode_threads=threads, **extra),
                         "load", totals)
            call = Timed(pred, "predict", totals)
            call(load(batches[0]))  # warm-up: first-call allocations, oneDNN kernel choice
            totals.clear()
            faces_found, image_bytes = 0, []
            t0 = time.perf_counter()
            for _ in range(args.passes):
                for b in batches:
                    rows = load(b)
                    if "image" in rows:
                        image_bytes += [len(x) for x in rows["image"]]
                    table = call(rows)
                    faces_found += sum(table.column("faces_found").to_pylist())
            wall = time.perf_counter() - t0
            images = args.passes * args.n
            totals["classify"] = totals["predict"] - totals.get("detect", 0) - totals.get("cut", 0)
            results[mode] = (images / wall, totals, wall, faces_found, image_bytes)
        det_ms = results["auto"][1]["detect"] / (args.passes * args.n) * 1000
        print(f"{args.n} JPEGs 1920x1080 x {args.passes} passes, {args.arch} {args.image_size} px fp32, CPU "
              f"{threads} threads (os.getloadavg {os.getloadavg()[0]:.1f}), detector batch "
              f"{face_stage.DETECT_BATCH['cpu']} at {DetectOptions().input_size[0]}x{DetectOptions().input_size[1]}")
        print("| faces | img/s | load % | detect % | cut % | classify % | faces found |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for mode, (rate, totals, wall, found, _) in results.items():
            share = {k: 100 * totals.get(k, 0.0) / wall for k in ("load", "detect", "cut", "classify")}
            print(f"| {mode} | {rate:.1f} | {share['load']:.0f} | {share['detect']:.0f} | {share['cut']:.0f} | "
                  f"{share['classify']:.0f} | {found} |")
        sizes = results["auto"][4]
        print(f"detector: {det_ms:.1f} ms/image (letterbox + forward + decode + NMS); a decoded picture of the face "
              f"path is {np.mean(sizes) / 1e6:.1f} MB uint8 (what would cross the object store with GPUs)")


if __name__ == "__main__":
    main()
