"""Which detector the demo trains: AP50, recall and precision after each epoch, and seconds, on synthetic scenes.

A plain loop (no Ray), the same pieces the job uses (``DecodeBoxes`` + ``train_transform``, the
adapters of :mod:`maskmodel.models.detect.trainable`, the face stage's NMS, ``detection_metrics``).
Offline: CenterFace starts from its packaged WIDER FACE weights (``--weights pretrained``), the
torchvision zoo from scratch (no COCO or ImageNet weights here).

    python -m benchmarks.detector_choice --arch centerface --weights pretrained --epochs 4
    python -m benchmarks.detector_choice --arch fasterrcnn_mobilenet_v3_large_320_fpn --weights none --epochs 6

``--ray`` then runs ``jobs.train_detector``'s library function (1 Ray Train worker, local Ray) on the
same scenes, written as JPEGs with COCO files, with the same model, weights, batch, lr (constant), threads
and augmentation, and prints the training img/s of both side by side (epochs after the first; the first
pays for start-up in both) and their ratio.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from maskmodel.data.boxes import DecodeBoxes, pack_boxes, train_transform
from maskmodel.data.synth import CLASSES, render_scene_sample
from maskmodel.metrics.detection import detection_metrics
from maskmodel.models.detect import trainable
from maskmodel.models.detect.geometry import DetectOptions, place, postprocess
from maskmodel.io import storage


def scenes(n: int, seed: int, size: int) -> list[dict]:
    rows = []
    for i in range(n):
        sc = render_scene_sample(CLASSES[i % 2], i, size=size, seed=seed)
        buf = io.BytesIO()
        sc.image.save(buf, format="JPEG", quality=sc.jpeg_quality)
        rows.append({"data": buf.getvalue(), "boxes": pack_boxes(np.asarray([f.box for f in sc.faces], np.float32)),
                     "width": size, "height": size})
    return rows


def write_coco_scenes(rows: list[dict], root: str, name: str) -> str:
    """``rows`` of :func:`scenes` as JPEGs under ``root/name/`` and their COCO file; returns its path."""
    from maskmodel.data.annotations import ImageBoxes, write_coco
    from maskmodel.data.boxes import unpack_boxes

    records = []
    for i, r in enumerate(rows):
        path = os.path.join(root, name, f"{i:04d}.jpg")
        storage.write_bytes(path, r["data"])
        b = unpack_boxes(r["boxes"]).reshape(-1, 4)
        records.append(ImageBoxes(path=path, width=r["width"], height=r["height"], boxes=b,
                                  classes=tuple("face" for _ in b), labels=tuple("face" for _ in b)))
    uri = os.path.join(root, f"{name}.coco.json")
    write_coco(records, uri, categories=("face",))
    return uri


def ray_train_rates(a, train: list[dict], val: list[dict]) -> list[float]:
    """Training img/s per epoch of ``jobs.train_detector`` (1 worker) on the same scenes and settings."""
    from maskmodel.train.detection import DetectTrainConfig, train_detector

    root = tempfile.mkdtemp(prefix="detector-choice-")
    try:
        cfg = DetectTrainConfig(data=write_coco_scenes(train, root, "train"),
                                val_data=write_coco_scenes(val, root, "val"), output=os.path.join(root, "run"),
                                arch=a.arch, weights=a.weights, epochs=a.epochs, batch_size=a.batch_size,
                                optimizer=a.optimizer, lr=a.lr, lr_schedule="constant", image_size=a.input,
                                torch_threads=a.threads, score_threshold=a.threshold, nms_iou=a.nms_iou,
                                cache_raw="on")
        train_detector(cfg)
        with open(os.path.join(root, "run", "metrics.csv")) as f:
            return [float(r["images_per_s"]) for r in csv.DictReader(f)]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def batches(rows, decode, bs):
    for k in range(0, len(rows), bs):
        chunk = rows[k:k + bs]
        out = decode({key: np.array([r[key] for r in chunk], dtype=object) for key in chunk[0]})
        yield out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="centerface", choices=trainable.ARCHITECTURES)
    ap.add_argument("--weights", default="pretrained", help="pretrained, none, or a state dict path")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--val", type=int, default=40)
    ap.add_argument("--scene-size", type=int, default=256)
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--threshold", type=float, default=0.5, help="operating threshold of recall / precision")
    ap.add_argument("--nms-iou", type=float, default=0.4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-seed", type=int, default=2, help="1: validate on the training scenes (can it learn at all?)")
    ap.add_argument("--ray", action="store_true", help="then the same training through jobs.train_detector (1 worker)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    train, val = scenes(a.train, 1, a.scene_size), scenes(a.val, a.val_seed, a.scene_size)
    net = trainable.initial(a.arch, a.weights, storage.read_bytes)
    decode = trainable.decode(a.arch)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4) if a.optimizer == "adamw"
           else torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=1e-4))
    aug, plain = DecodeBoxes(size=a.input, augment=train_transform()), DecodeBoxes(size=a.input)
    size = (a.input, a.input)
    options = DetectOptions(input_size=size, score_threshold=0.05, nms_iou=a.nms_iou, max_faces=100, min_face=0.0,
                            margin=0.0)

    def evaluate() -> dict:
        net.eval()
        truth, pred, score = [], [], []
        with torch.inference_mode():
            for b in batches(val, plain, a.batch_size):
                bx, sc, idx = decode(net(torch.from_numpy(b["image"]).float()), input_size=size, threshold=0.05,
                                     top_k=1000)
                faces = postprocess(bx, sc, idx, [place(a.input, a.input, size)] * len(b["image"]), options)
                for f, t, n in zip(faces, b["boxes"], b["n_boxes"]):
                    truth.append(t[:n])
                    pred.append(f.boxes)
                    score.append(f.scores)
        return detection_metrics(truth, pred, score, threshold=a.threshold)

    def line(epoch: int, m: dict, **extra) -> None:
        print(json.dumps({"arch": a.arch, "weights": a.weights, "epoch": epoch, "ap50": round(m["ap50"], 3),
                          "ap": round(m["ap"], 3), "recall": round(m["recall"], 3),
                          "precision": round(m["precision"], 3), **extra}), flush=True)

    t0 = time.perf_counter()
    line(0, evaluate(), eval_s=round(time.perf_counter() - t0, 1))
    rates = []
    for epoch in range(a.epochs):
        t0, losses = time.perf_counter(), []
        net.train()
        for b in batches(train, aug, a.batch_size):
            imgs = torch.from_numpy(b["image"]).float()
            loss = sum(net(imgs, [torch.from_numpy(bx[:n]) for bx, n in zip(b["boxes"], b["n_boxes"])]).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        train_s = time.perf_counter() - t0
        rates.append(len(train) / train_s)
        m = evaluate()
        line(epoch + 1, m, loss=round(float(np.mean(losses)), 4), train_s=round(train_s, 1),
             eval_s=round(time.perf_counter() - t0 - train_s, 1))

    if a.ray:
        steady = rates[1:] or rates
        ray_rates = ray_train_rates(a, train, val)
        ray_steady = ray_rates[1:] or ray_rates
        plain, ray = sum(steady) / len(steady), sum(ray_steady) / len(ray_steady)
        print(json.dumps({"plain_loop_img_s": round(plain, 2), "ray_train_1_worker_img_s": round(ray, 2),
                          "ray_over_plain": round(ray / plain, 3), "epochs_compared": len(ray_steady),
                          "load_avg": [round(x, 1) for x in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()
