"""The loop demo's pieces: a stand-in reviewer (the synthetic ground truth) and the loop itself.

``python -m jobs.demo_loop`` (``make demo-loop``): draw the synthetic data, fine-tune the face detector once
on the ``detect`` scenes (the same detector for every run: the detector is not what the loop is about), train
the classifier on tight face crops, score the ``detect`` scenes (the "night" whose faces go to review) and the
``scene`` scenes (the measure), export the N least confident faces of the night
(:mod:`maskmodel.study.review`), let the ground truth answer as a reviewer would in Label Studio
(:func:`ground_truth_review`: every face of each task's photo, the model's region ids kept where a
box matches), import that merged with the crops the classifier started from
(:mod:`maskmodel.study.review_import`, :func:`crops_as_annotations`, ``--merge``), train the classifier
again on it (``jobs.train --data <merged.json> --weights <model.pt>``), and score the ``scene`` scenes
again. The scenes measured are never the ones reviewed.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import numpy as np

from maskmodel.config import field, resolve_paths
from maskmodel.data import labelstudio
from maskmodel.data.annotations import read_coco
from maskmodel.io import storage
from maskmodel.study.review import MANIFEST

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class LoopDemoConfig:
    out: str = field("demo-loop-output", path=True, help="where the data, models, results and review files go")
    n_per_class: int = field(150, help="synthetic training crops per class")
    image_size: int = field(64, help="crop edge in pixels for generation and training")
    epochs: int = field(10, help="epochs of the first classifier (tight crops only)")
    review: int = field(150, help="faces sent to review (N): the least confident of the night's run (150: +5 points of verdict accuracy in the run measured; 80 gave +3.5 and -2.7 in two)")
    retrain_from: str = field("first", choices=("first", "scratch"),
                              help="the second classifier: fine-tuned from the first one's weights, or trained from "
                                   "scratch (--epochs) on the crops and the reviewed faces")
    retrain_epochs: int = field(4, help="classifier fine-tuning epochs on the crops and the reviewed faces")
    detector_epochs: int = field(4, help="face detector fine-tuning epochs on the detect scenes, once, before any "
                                         "run (the same detector finds the faces before and after)")
    arch: str = field("resnet18", help="classifier architecture")

    def __post_init__(self) -> None:
        resolve_paths(self)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import torch
    from torchvision.ops import box_iou

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    return box_iou(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).numpy()


def ground_truth_review(exported: str, truth: str, *, when: dt.datetime | None = None) -> list[dict]:
    """A Label Studio JSON export of the tasks in ``exported`` as a perfect reviewer would leave them: each
    photo's true faces and classes from the COCO file ``truth`` (the model's region id kept where a true face
    overlaps a model box at IoU >= 0.5, so a relabel counts as one, not as a delete and an add)."""
    manifest = storage.read_json(storage.join(exported, MANIFEST))
    by_path = {r.path: r for r in read_coco(truth)}
    stamp = (when or dt.datetime.now(dt.timezone.utc)).isoformat()
    out = []
    for n, p in enumerate(manifest["photos"], start=1):
        gt = by_path.get(p["path"])
        result = []
        if gt is not None:
            model = np.asarray([f["box"] for f in p["faces"]], np.float32).reshape(-1, 4)
            iou = _iou(gt.boxes, model)
            for k, (box, cls) in enumerate(zip(gt.boxes.tolist(), gt.classes)):
                j = int(iou[k].argmax()) if iou.shape[1] else -1
                rid = f"face{p['faces'][j]['index']}" if j >= 0 and iou[k, j] >= 0.5 else f"gt{k}"
                if j >= 0:
                    iou[:, j] = np.where(iou[k, j] >= 0.5, -1, iou[:, j])
                result.append(labelstudio.region(rid, box, cls, p["width"], p["height"]))
        out.append({"id": n, "data": {"image": p["image"], "path": p["path"], "version": p["version"]},
                    "annotations": [{"id": n, "result": result, "was_cancelled": False, "ground_truth": False,
                                     "created_at": stamp, "updated_at": stamp, "completed_by": 1}]})
    return out


def crops_as_annotations(data: str, uri: str, *, size: int) -> int:
    """The synthetic ``train`` and ``val`` face crops of ``data`` as a COCO annotation set at ``uri``: each crop a
    photo with one face filling it, its folder's class, its split kept (``images[].split``), so that the labels a
    model started from and the reviewed ones can be merged into one set. Returns the number of crops."""
    from maskmodel.data.annotations import ImageBoxes, write_coco

    records = []
    for split in ("train", "val"):
        for f in storage.list_files(storage.join(data, split), extensions=("jpg",)):
            cls = f.uri.rsplit("/", 2)[-2]
            records.append(ImageBoxes(path=f.uri, width=size, height=size,
                                      boxes=np.asarray([[0, 0, size, size]], np.float32), classes=(cls,),
                                      labels=(cls,), extra={"split": split}))
    write_coco(records, uri, info={"description": "the synthetic training crops, one face each"})
    return len(records)
