"""Which torchvision detector the demo trains: AP50 after N epochs and seconds per epoch, on the synthetic scenes.

A plain loop (no Ray), the same pieces the job uses (``DecodeBoxes`` + ``train_transform``, the
``TorchvisionFaceNet`` adapter, ``detection_metrics``). From scratch (offline: no COCO or ImageNet weights).

    python -m benchmarks.detector_choice --arch fasterrcnn_mobilenet_v3_large_320_fpn --epochs 6
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch

from maskmodel.data.boxes import DecodeBoxes, pack_boxes, train_transform
from maskmodel.data.synth import CLASSES, render_scene_sample
from maskmodel.detection_metrics import detection_metrics
from maskmodel.models.detect import zoo


def scenes(n: int, seed: int, size: int) -> list[dict]:
    rows = []
    for i in range(n):
        sc = render_scene_sample(CLASSES[i % 2], i, size=size, seed=seed)
        buf = io.BytesIO()
        sc.image.save(buf, format="JPEG", quality=sc.jpeg_quality)
        rows.append({"data": buf.getvalue(), "boxes": pack_boxes(np.asarray([f.box for f in sc.faces], np.float32)),
                     "width": size, "height": size})
    return rows


def batches(rows, decode, bs):
    for k in range(0, len(rows), bs):
        chunk = rows[k:k + bs]
        out = decode({key: np.array([r[key] for r in chunk], dtype=object) for key in chunk[0]})
        yield out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="fasterrcnn_mobilenet_v3_large_320_fpn", choices=sorted(zoo.ZOO))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--val", type=int, default=40)
    ap.add_argument("--scene-size", type=int, default=384)
    ap.add_argument("--input", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-seed", type=int, default=2, help="1: validate on the training scenes (can it learn at all?)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    train, val = scenes(a.train, 1, a.scene_size), scenes(a.val, a.val_seed, a.scene_size)
    net = zoo.build(a.arch)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4) if a.optimizer == "adamw"
           else torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=1e-4))
    aug, plain = DecodeBoxes(size=a.input, augment=train_transform()), DecodeBoxes(size=a.input)
    for epoch in range(a.epochs):
        t0, losses = time.perf_counter(), []
        net.train()
        for b in batches(train, aug, a.batch_size):
            imgs = torch.from_numpy(b["image"]).float()
            targets = [{"boxes": torch.from_numpy(bx[:n]), "labels": torch.ones(n, dtype=torch.int64)}
                       for bx, n in zip(b["boxes"], b["n_boxes"])]
            loss = sum(net(imgs, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        train_s = time.perf_counter() - t0
        net.eval()
        truth, pred, score = [], [], []
        with torch.inference_mode():
            for b in batches(val, plain, a.batch_size):
                out = net(torch.from_numpy(b["image"]).float())
                for o, bx, n in zip(out, b["boxes"], b["n_boxes"]):
                    truth.append(bx[:n])
                    pred.append(o["boxes"].numpy())
                    score.append(o["scores"].numpy())
        m = detection_metrics(truth, pred, score, threshold=0.5)
        print(json.dumps({"arch": a.arch, "epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4),
                          "ap50": round(m["ap50"], 3), "ap": round(m["ap"], 3), "recall": round(m["recall"], 3),
                          "precision": round(m["precision"], 3), "train_s": round(train_s, 1),
                          "eval_s": round(time.perf_counter() - t0 - train_s, 1)}), flush=True)


if __name__ == "__main__":
    main()
