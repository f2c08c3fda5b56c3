"""The review loop, end to end on synthetic data: score, review the least confident faces, retrain, score again.

What ``make demo-loop`` runs (local Ray, local disk, no downloads): ``python -m jobs.demo_loop --out demo-loop-output``.

The face detector is not the subject: it is fine-tuned once, up front, on the ``detect`` scenes' boxes (as
``make demo`` does) and the same detector finds the faces of every run, before and after, so the comparison
isolates what the reviewed labels do to the classifier. The first classifier learns from tight synthetic face
crops (``<data>/train``: the "studio crops" a team starts with, unlike faces cut from camera pictures by the
face stage). The night's run scores the ``detect`` scenes; the ``--review`` least confident faces of it go to
review as Label Studio tasks; the synthetic ground truth answers as a reviewer would (a Label Studio JSON
export); ``jobs.review import --merge`` adds them to the crops the classifier started from, and the
classifier is trained again on that (``jobs.train --data <merged set> --weights``, or from scratch with
``--retrain-from scratch``). The ``scene`` scenes (never reviewed) are scored before and after; the job prints
both runs' verdict and class accuracy (the split table of ``make demo``: one definition), the per-face
accuracy, and how many labels that took. A re-run reuses the first classifier (``<out>/train-1/model``) and
the detector (``<out>/detector``). Each step is one of the real jobs' library functions (docs/review.md).
"""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from maskmodel.config import parse_config
from maskmodel.io import storage
from maskmodel.runtime import cli
from maskmodel.study.loop_demo import LoopDemoConfig

log = logging.getLogger("jobs.demo_loop")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(LoopDemoConfig, argv, prog="python -m jobs.demo_loop", description=__doc__)
    from maskmodel.data import synth
    from maskmodel.models.classifier import load_card
    from maskmodel.results import query
    from maskmodel.score import scoring
    from maskmodel.study import demo
    from maskmodel.study.loop_demo import crops_as_annotations, ground_truth_review
    from maskmodel.study.review import ReviewExportConfig, export_review
    from maskmodel.study.review_import import ReviewImportConfig, import_review
    from maskmodel.train import detection, training

    started = time.monotonic()
    data, scores, review = (storage.join(cfg.out, p) for p in ("data", "scores", "review"))
    storage.check_writable(cfg.out)
    dataset = storage.join(data, "dataset.json")
    old = storage.read_json(dataset).get("version") if storage.exists(dataset) else None
    if old != synth.VERSION:
        synth.write_dataset(synth.DatasetConfig(out=data, n_per_class=cfg.n_per_class, image_size=cfg.image_size,
                                                overwrite=old is not None))
    # One face detector for every run, fine-tuned once on the detect scenes' boxes (a re-run reuses it).
    detector_dir = storage.join(cfg.out, "detector", "detector")
    if not storage.exists(storage.join(detector_dir, "detector.json")):
        detection.train_detector(detection.DetectTrainConfig(
            data=data, output=storage.join(cfg.out, "detector"), epochs=cfg.detector_epochs, batch_size=8,
            torch_threads=2, image_size=storage.read_json(dataset)["scene_size"]))
    else:
        print(f"reusing the face detector at {detector_dir}", flush=True)
    first_dir = storage.join(cfg.out, "train-1", "model")
    if not storage.exists(storage.join(first_dir, "model.json")):  # a re-run reuses the first model (delete to redo)
        training.train(training.TrainConfig(
            data=data, output=storage.join(cfg.out, "train-1"), arch=cfg.arch, weights="none", epochs=cfg.epochs,
            image_size=cfg.image_size, batch_size=32, torch_threads=2))
    else:
        print(f"reusing the first classifier at {first_dir}", flush=True)
    card = load_card(first_dir)

    def score(split: str, run_id: str, model: str) -> None:
        res = scoring.score(scoring.ScoreConfig(input=storage.join(data, split), model=model, output=scores,
                                                run_id=run_id, faces=detector_dir))
        print(f"{run_id}: {res.summary_line()}", flush=True)

    score("detect", "night-1", first_dir)
    score("scene", "before", first_dir)
    exported = export_review(ReviewExportConfig(results=scores, output=review, run_id=("night-1",),
                                                least_confident=cfg.review))
    print(exported.summary_line(), flush=True)
    reviewed = storage.join(cfg.out, "label-studio-export.json")
    storage.write_text(reviewed, json.dumps(ground_truth_review(review, storage.join(data, synth.DETECT_ANNOTATIONS))))
    # The classifier learns from the crops it started from and the reviewed faces together: the first set's
    # labels as a COCO set, merged with the review (jobs.review import --merge).
    crops = storage.join(cfg.out, "labels", "train-crops.json")
    crops_as_annotations(data, crops, size=storage.read_json(dataset)["image_size"])
    merged = storage.join(cfg.out, "labels", "round-1-with-crops.json")
    imported = import_review(ReviewImportConfig(reviewed=reviewed, exported=review, output=merged, merge=crops))
    print(imported.summary_line(), flush=True)
    second = training.train(training.TrainConfig(
        data=merged, output=storage.join(cfg.out, "train-2"), arch=cfg.arch,
        weights="none" if cfg.retrain_from == "scratch" else storage.join(first_dir, "model.pt"),
        epochs=cfg.epochs if cfg.retrain_from == "scratch" else cfg.retrain_epochs, image_size=cfg.image_size,
        batch_size=32, torch_threads=2))
    score("scene", "after", second.model_dir)
    table = demo.split_table(scores, card.classes, card.alert_classes)
    print("\nthe scene scenes (never reviewed), scored with the same detector before and after "
          "(verdict_accuracy: the picture's alert against its folder's; accuracy: the picture's label):")
    print(query.format_table(table.filter(pc.is_in(table["split"], pa.array(["before", "after"])))))
    for run_id, model, what in (("before", first_dir, f"first classifier {card.model_id} (tight crops)"),
                                ("after", second.model_dir, f"retrained classifier {second.model_id}")):
        faces = demo.scene_faces_line(data, scores, load_card(model), storage.join(cfg.out, run_id), run_id=run_id)
        print(f"{run_id} ({what}): {faces}")
    print(f"labels that took: {exported.faces} faces sent to review in {exported.photos} photos (N = {cfg.review}); "
          f"the reviewer relabelled {imported.faces['relabelled']}, added {imported.faces['added']} missed faces, "
          f"deleted {imported.faces['deleted']} and confirmed {imported.faces['kept']}")
    for name, path in (("classifier", storage.join(second.model_dir, "model.json")),
                       ("detector", storage.join(detector_dir, "detector.json"))):
        sets = storage.read_json(path).get("annotation_sets") or []
        print(f"{name} {path} learnt from {[a['uri'] for a in sets] or data} "
              f"({', '.join(a['sha256'][:19] for a in sets)})")
    print(f"wall time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
