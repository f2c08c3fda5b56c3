"""Occlusion augmentation (``jobs.train --occlusion``) on the synthetic hard negatives, with and without it.

Two classifiers are trained the same way (same data, seed, epochs) on synthetic face crops that hold NO
hard negative (``hard_negative_fraction=0``: no hand, paper or scarf in training), one with
``--occlusion P``. Both are then measured on test crops of a second synthetic set whose ``no_mask``
faces are ALL hard negatives (a skin-coloured hand with fingers, a sheet of paper with text held by two
thumbs, a scarf below the chin; ``maskmodel.data.drawing``), which the augmentation's flat, noisy
blobs and cards do not imitate, and on the ordinary test crops. Reported: accuracy per variant.

::

    python benchmarks/occlusion.py                          # CPU defaults: resnet18, 64 px, 200 per class, 10 epochs
    python benchmarks/occlusion.py --occlusion 0.5 --epochs 15 --n-per-class 300
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from maskmodel.data import synth
from maskmodel.data.transforms import EvalCrop, normalize, preprocess_image
from maskmodel.io import storage
from maskmodel.models.classifier import load_model_dir
from maskmodel.train import training


def predict(model_dir: str, data: str, rows: list[dict]) -> dict[str, str]:
    """path (relative to ``data``) -> predicted class, for ``rows`` of ``variants.csv``."""
    model, card = load_model_dir(model_dir)
    crop = EvalCrop(crop_size=card.input_size, resize_size=card.resize_size)
    out = {}
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            x = torch.stack([torch.from_numpy(preprocess_image(storage.read_bytes(os.path.join(data, r["path"])),
                                                               crop)[0]) for r in chunk])
            labels = model(normalize(x, mean=card.mean, std=card.std)).argmax(1).tolist()
            out.update({r["path"]: card.classes[k] for r, k in zip(chunk, labels)})
    return out


def accuracy_by_variant(model_dir: str, data: str, split: str) -> dict[str, tuple[int, float]]:
    with open(os.path.join(data, "variants.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    got = predict(model_dir, data, rows)
    right: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        ok = got[r["path"]] == r["label"]
        right[r["variant"]].append(ok)
        right["all"].append(ok)
    return {v: (len(x), float(np.mean(x))) for v, x in sorted(right.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-class", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--occlusion", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="occlusion-bench-")
    train_data, hard_data = os.path.join(out, "train-data"), os.path.join(out, "hard-data")
    synth.write_dataset(synth.DatasetConfig(out=train_data, n_per_class=args.n_per_class, image_size=args.image_size,
                                            hard_negative_fraction=0.0, seed=args.seed, overwrite=True))
    synth.write_dataset(synth.DatasetConfig(out=hard_data, n_per_class=args.n_per_class, image_size=args.image_size,
                                            hard_negative_fraction=1.0, seed=args.seed + 1, overwrite=True))
    report = {"config": vars(args), "runs": {}}
    for name, p in (("without", 0.0), ("with", args.occlusion)):
        t0 = time.perf_counter()
        res = training.train(training.TrainConfig(
            data=train_data, output=os.path.join(out, f"train-{name}"), arch="resnet18", weights="none",
            epochs=args.epochs, image_size=args.image_size, batch_size=32, torch_threads=2, seed=args.seed,
            occlusion=p))
        report["runs"][name] = {
            "occlusion": p, "val_acc": res.val_acc, "train_s": round(time.perf_counter() - t0, 1),
            "hard_test": accuracy_by_variant(res.model_dir, hard_data, "test"),
            "plain_test": accuracy_by_variant(res.model_dir, train_data, "test")}
    with open(os.path.join(out, "occlusion.json"), "w") as f:
        json.dump(report, f, indent=2)
    w, o = report["runs"]["without"], report["runs"]["with"]
    print(f"{'test set':<10} {'variant':<10} {'n':>4} {'without':>8} {'with ' + str(args.occlusion):>9}")
    for split in ("hard_test", "plain_test"):
        for v, (n, acc) in w[split].items():
            print(f"{split:<10} {v:<10} {n:>4} {acc:>8.3f} {o[split][v][1]:>9.3f}")
    print(f"val accuracy: without {w['val_acc']:.3f}, with {o['val_acc']:.3f}; report {out}/occlusion.json")


if __name__ == "__main__":
    main()
