"""One tiny annotated set, written in every format the product reads (COCO, VOC flat and sibling, YOLO).

Drawn from the synthetic scenes (:func:`maskmodel.data.synth.render_scene_sample`): the same photos and the same
integer boxes in each format, so every reader must give the same faces. Shared by the reader, crop and training tests.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

from maskmodel.data import synth
from maskmodel.data.annotations import ImageBoxes, write_coco

CLASSES = ("mask", "no_mask")


def build(root: Path, *, n: int = 8, size: int = 128) -> dict:
    """Write ``n`` scenes (half of each verdict) as JPEGs and their faces in each format under ``root``.

    Returns ``{"coco", "voc", "voc_sibling", "yolo"}`` -> the URI to read, plus ``"faces"`` (the face count),
    ``"classes"`` (sorted), ``"per_class"`` {class: faces} and ``"boxes"`` {photo name: int boxes (K, 4)}.
    """
    photos = root / "photos"
    photos.mkdir(parents=True)
    boxes, classes, names = {}, {}, []
    for i in range(n):
        scene = synth.render_scene_sample(CLASSES[i % 2], i, size=size, incorrect_share=0.0)
        name = f"scene{i:03d}.jpg"
        scene.image.save(photos / name, "JPEG", quality=90)
        b = np.round(np.asarray([f.box for f in scene.faces], np.float64).reshape(-1, 4))
        boxes[name], classes[name] = b.astype(int), [f.label for f in scene.faces]
        names.append(name)
    # COCO: one file next to the photos; each image names its split (photos 2, 3 of every 4 are val), which the
    # training job honours (the other formats are split by hash of the path).
    coco = root / "photos" / "annotations.json"
    write_coco([ImageBoxes(path=str(photos / nm), width=size, height=size, boxes=boxes[nm].astype(np.float32),
                           classes=tuple(classes[nm]), labels=tuple(classes[nm]),
                           extra={"split": "val" if i % 4 in (2, 3) else "train"}) for i, nm in enumerate(names)],
               str(coco))
    # VOC, xml next to the photos; and Kaggle's annotations/ + images/ siblings.
    flat, kaggle = root / "voc", root / "voc_sibling"
    for folder, xml_dir, img_dir in ((flat, flat, flat), (kaggle, kaggle / "annotations", kaggle / "images")):
        xml_dir.mkdir(parents=True, exist_ok=True)
        img_dir.mkdir(parents=True, exist_ok=True)
        for nm in names:
            shutil.copy(photos / nm, img_dir / nm)
            (xml_dir / nm.replace(".jpg", ".xml")).write_bytes(voc_xml(nm, size, size, boxes[nm], classes[nm]))
    # YOLO, the Ultralytics layout: images/ + labels/ + data.yaml.
    yolo = root / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    (yolo / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {c}\n" for i, c in enumerate(CLASSES)))
    for nm in names:
        shutil.copy(photos / nm, yolo / "images" / nm)
        lines = [f"{CLASSES.index(c)} {(x0 + x1) / 2 / size:.10f} {(y0 + y1) / 2 / size:.10f} "
                 f"{(x1 - x0) / size:.10f} {(y1 - y0) / size:.10f}" for (x0, y0, x1, y1), c in zip(boxes[nm], classes[nm])]
        (yolo / "labels" / nm.replace(".jpg", ".txt")).write_text("\n".join(lines) + "\n")
    return {"coco": str(coco), "voc": str(flat), "voc_sibling": str(kaggle / "annotations"), "yolo": str(yolo),
            "faces": sum(len(v) for v in classes.values()), "boxes": boxes,
            "per_class": dict(Counter(c for v in classes.values() for c in v)),
            "classes": sorted({c for v in classes.values() for c in v})}


def voc_xml(name: str, width: int, height: int, boxes, classes) -> bytes:
    """A Pascal VOC annotation: 1-based inclusive ``xmin ymin xmax ymax`` for each ``x0, y0, x1, y1`` box."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = name
    size = ET.SubElement(ann, "size")
    ET.SubElement(size, "width").text, ET.SubElement(size, "height").text = str(width), str(height)
    for (x0, y0, x1, y1), c in zip(boxes, classes):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = c
        bb = ET.SubElement(obj, "bndbox")
        for k, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bb, k).text = str(int(v))
    return ET.tostring(ann)
