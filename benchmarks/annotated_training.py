"""Training the classifier from boxes on camera-sized photos against training from pre-cut crops of the same faces.

Photos are ``--photos`` 1920x1080 JPEGs (``--distinct`` drawn, the rest copies under other names): a synthetic
scene (``maskmodel.data.synth.render_scene_sample``, 1 to 4 faces with their boxes and classes) pasted on a busy
noisy frame, 300-600 KB each like a camera's. Their boxes go into a COCO file. The same faces, cut once by the
face stage's own crop (``maskmodel.data.facecrop``: margin, clipping, at the decode's resolution) and saved as JPEG
crops in an ImageFolder tree (what a team's cropping script would produce), are the other side. Both sides split
alike (the COCO images carry the split; the crop tree has train/ and val/). Reported, side by side in one run:

- data step, in-process on one core: ms per face to read + decode a photo + cut all its faces (from boxes,
  once per job) against ms per face to read + decode a pre-cut crop (the crop path, every epoch);
- ``jobs.train``'s library function, ``--epochs`` epochs each, wall seconds from boxes against from crops
  (each includes Ray Train's start-up, equal on both sides), and their ratio.

::

    python benchmarks/annotated_training.py                      # 48 photos, resnet18 at 64 px, 2 epochs
    python benchmarks/annotated_training.py --photos 200 --distinct 12 --arch resnet50 --image-size 128
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from maskmodel.data import facecrop, synth
from maskmodel.data.annotations import ImageBoxes, write_coco
from maskmodel.data.drawing import background
from maskmodel.io.decode import decode
from maskmodel.models.spec import DetectOptions
from maskmodel.train.training import TrainConfig, train

WIDTH, HEIGHT = 1920, 1080


def camera_photo(label: str, index: int) -> tuple[bytes, np.ndarray, list[str]]:
    """A 1920x1080 JPEG holding scene ``index`` of ``label``, with its faces' boxes (original pixels) and classes."""
    rng = np.random.default_rng((7, synth.CLASSES.index(label), index))
    scene = synth.render_scene_sample(label, index, size=HEIGHT, split="detect")
    frame = background(WIDTH, rng, busy=True).crop((0, 0, WIDTH, HEIGHT))
    left = int(rng.integers(0, WIDTH - HEIGHT + 1))
    frame.paste(scene.image, (left, 0))
    noisy = np.asarray(frame, np.float32) + rng.normal(0, 3.5, (HEIGHT, WIDTH, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    boxes = np.asarray([f.box for f in scene.faces], np.float32).reshape(-1, 4) + np.float32([left, 0, left, 0])
    return buf.getvalue(), boxes, [f.label for f in scene.faces]


def make_sets(root: str, *, photos: int, distinct: int) -> tuple[str, str, int]:
    """``root/photos`` + ``root/photos/annotations.json`` and ``root/crops/{train,val}/<class>/*.jpg``: the same
    faces. Returns (COCO URI, crop tree URI, faces)."""
    drawn = [camera_photo(synth.CLASSES[i % 2], i) for i in range(distinct)]
    options = DetectOptions()
    os.makedirs(os.path.join(root, "photos"))
    records, faces = [], 0
    for i in range(photos):
        data, boxes, classes = drawn[i % distinct]
        split = "val" if i % 5 == 4 else "train"
        path = os.path.join(root, "photos", f"{i:05d}.jpg")
        with open(path, "wb") as f:
            f.write(data)
        records.append(ImageBoxes(path=path, width=WIDTH, height=HEIGHT, boxes=boxes, classes=tuple(classes),
                                  labels=tuple(classes), extra={"split": split}))
        d = facecrop.decode_photo(data)
        image = np.asarray(d.image, np.uint8)
        keep = facecrop.big_enough(boxes, options.min_face)
        decoded = facecrop.to_decoded(boxes[keep], (d.width, d.height), (image.shape[1], image.shape[0]))
        where = facecrop.crop_boxes(torch.from_numpy(decoded), options.margin, image.shape[:2]).numpy()
        regions = [facecrop.cut(image, where[k:k + 1], lambda t: t, 0)[0] for k in range(len(where))]  # native size
        for k, (region, cls) in enumerate(zip(regions, np.asarray(classes)[keep])):
            folder = os.path.join(root, "crops", split, str(cls))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(region.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:05d}_{k}.jpg"),
                                                                  quality=95)
            faces += 1
    coco = os.path.join(root, "photos", "annotations.json")
    write_coco(records, coco, categories=synth.CLASSES)
    return coco, os.path.join(root, "crops"), faces


def data_step_ms(root: str) -> tuple[float, float]:
    """ms per face on one core: decode each photo whole (at most 4 MP) and cut its faces, against decode each crop."""
    from maskmodel.data.transforms import EvalCrop, TrainCrop

    options, crop = DetectOptions(), EvalCrop(crop_size=64)
    with open(os.path.join(root, "photos", "annotations.json")) as f:
        doc = json.load(f)
    per_image = {}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        per_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    t, n = time.perf_counter(), 0
    for im in doc["images"]:
        boxes = np.asarray(per_image.get(im["id"], []), np.float32).reshape(-1, 4)
        with open(os.path.join(root, "photos", im["file_name"]), "rb") as f:
            d = facecrop.decode_photo(f.read())
        out, _ = facecrop.face_crops(np.asarray(d.image, np.uint8), boxes, (d.width, d.height), margin=options.margin,
                                     min_face=options.min_face, crop=crop, crop_size=64)
        n += len(out)
    boxes_ms = 1000 * (time.perf_counter() - t) / max(1, n)
    train_crop, paths = TrainCrop(crop_size=64), []
    for dirpath, _, files in os.walk(os.path.join(root, "crops")):
        paths += [os.path.join(dirpath, f) for f in files]
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            d = decode(f.read(), reduce_to=train_crop.decode_side)
        train_crop(torch.from_numpy(np.asarray(d.image, np.uint8)).permute(2, 0, 1))
    return boxes_ms, 1000 * (time.perf_counter() - t) / max(1, len(paths))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=48)
    p.add_argument("--distinct", type=int, default=8, help="distinct photos drawn (about 1-2 s each)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the photos and runs (printed)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = tempfile.mkdtemp(prefix="annotated-bench-")
    try:
        t = time.perf_counter()
        coco, crops, faces = make_sets(root, photos=args.photos, distinct=args.distinct)
        made_s = time.perf_counter() - t
        boxes_ms, crops_ms = data_step_ms(root)
        common = dict(arch=args.arch, weights="none", image_size=args.image_size, batch_size=args.batch_size,
                      epochs=args.epochs, cpus_per_worker=1.0)
        walls = {}
        for name, data in (("boxes", coco), ("crops", crops)):
            t = time.perf_counter()
            out = train(TrainConfig(data=data, output=os.path.join(root, f"run-{name}"), **common))
            walls[name] = (time.perf_counter() - t, out.val_acc)
        result = {
            "photos": args.photos, "photo_size": f"{WIDTH}x{HEIGHT}", "faces": faces,
            "photo_kb": round(os.path.getsize(os.path.join(root, "photos", "00000.jpg")) / 1024),
            "sets_made_s": round(made_s, 1),
            "data_step_ms_per_face": {"boxes_decode_photo_and_cut": round(boxes_ms, 2),
                                      "crops_decode_and_train_crop": round(crops_ms, 2),
                                      "ratio": round(boxes_ms / crops_ms, 2)},
            "train_wall_s": {k: round(v[0], 1) for k, v in walls.items()},
            "train_wall_ratio_boxes_over_crops": round(walls["boxes"][0] / walls["crops"][0], 2),
            "val_acc": {k: round(v[1], 3) for k, v in walls.items()},
            "config": common,
        }
        print(json.dumps(result, indent=1))
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
