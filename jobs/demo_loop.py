"""The review loop, end to end on synthetic data: score, review the least confident faces, retrain, score again.

What ``make demo-loop`` runs (local Ray, local disk, no downloads)::

    python -m jobs.demo_loop --out demo-loop-output --review 60

It trains a classifier on tight synthetic face crops, scores two sets of scenes with the pretrained
CenterFace (``detect``: the night whose faces go to review; ``scene``: the measure, never reviewed),
exports the ``--review`` least confident faces of the night as Label Studio tasks, lets the synthetic
ground truth answer as a reviewer would (a Label Studio JSON export), imports it as a COCO annotation
set, fine-tunes the face detector (``jobs.train_detector --data <set>``: the faces it missed, added by the
reviewer) on that set and the classifier from its weights on it merged with the crops it started from
(``jobs.review import --merge``; ``jobs.train --data <merged set> --weights``), scores
the ``scene`` scenes again and prints the picture and face accuracy before and after, and how many labels
that took. A re-run reuses the first classifier (``<out>/train-1/model``). Each step is one of the real jobs' library functions (docs/review.md).
"""

from __future__ import annotations

import json
import logging

from maskmodel.config import parse_config
from maskmodel.io import storage
from maskmodel.runtime import cli
from maskmodel.study.loop_demo import SCENE_ACCURACY_SQL, LoopDemoConfig

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

    data, scores, review = (storage.join(cfg.out, p) for p in ("data", "scores", "review"))
    storage.check_writable(cfg.out)
    dataset = storage.join(data, "dataset.json")
    old = storage.read_json(dataset).get("version") if storage.exists(dataset) else None
    if old != synth.VERSION:
        synth.write_dataset(synth.DatasetConfig(out=data, n_per_class=cfg.n_per_class, image_size=cfg.image_size,
                                                overwrite=old is not None))
    first_dir = storage.join(cfg.out, "train-1", "model")
    if storage.exists(storage.join(first_dir, "model.json")):  # a re-run reuses the first model (delete to redo)
        first_id = load_card(first_dir).model_id
        print(f"reusing the first classifier {first_id} at {first_dir}", flush=True)
    else:
        first = training.train(training.TrainConfig(
            data=data, output=storage.join(cfg.out, "train-1"), arch=cfg.arch, weights="none", epochs=cfg.epochs,
            image_size=cfg.image_size, batch_size=32, torch_threads=2))
        first_id = first.model_id

    def score(split: str, run_id: str, model: str, faces: str = "centerface") -> None:
        res = scoring.score(scoring.ScoreConfig(input=storage.join(data, split), model=model, output=scores,
                                                run_id=run_id, faces=faces))
        print(f"{run_id}: {res.summary_line()}", flush=True)

    def accuracy(run_id: str, model: str) -> str:
        row = query.query(scores, SCENE_ACCURACY_SQL.format(run=run_id)).to_pylist()[0]
        faces = demo.scene_faces_line(data, scores, load_card(model).classes, storage.join(cfg.out, run_id),
                                      run_id=run_id)
        return f"picture accuracy {row['accuracy']:.3f} on {row['pictures']} scenes; {faces}"

    score("detect", "night-1", first_dir)
    score("scene", "before", first_dir)
    exported = export_review(ReviewExportConfig(results=scores, output=review, run_id=("night-1",),
                                                least_confident=cfg.review))
    print(exported.summary_line(), flush=True)
    reviewed = storage.join(cfg.out, "label-studio-export.json")
    storage.write_text(reviewed, json.dumps(ground_truth_review(review, storage.join(data, synth.DETECT_ANNOTATIONS))))
    labels = storage.join(cfg.out, "labels", "round-1.json")
    imported = import_review(ReviewImportConfig(reviewed=reviewed, exported=review, output=labels))
    print(imported.summary_line(), flush=True)
    # The classifier learns from the crops it started from and the reviewed faces together: the first set's
    # labels as a COCO set, merged with the review (jobs.review import --merge).
    crops = storage.join(cfg.out, "labels", "train-crops.json")
    crops_as_annotations(data, crops, size=storage.read_json(dataset)["image_size"])
    merged = storage.join(cfg.out, "labels", "round-1-with-crops.json")
    print(import_review(ReviewImportConfig(reviewed=reviewed, exported=review, output=merged,
                                           merge=crops)).summary_line(), flush=True)
    # The reviewed set trains both models: the faces the detector missed (added by reviewers) teach it to find
    # them, the corrected classes teach the classifier (fine-tuned from its own weights, gently: few faces).
    detector = detection.train_detector(detection.DetectTrainConfig(
        data=labels, output=storage.join(cfg.out, "detector-2"), epochs=cfg.detector_epochs, batch_size=8,
        torch_threads=2, image_size=storage.read_json(dataset)["scene_size"]))
    second = training.train(training.TrainConfig(
        data=merged, output=storage.join(cfg.out, "train-2"), arch=cfg.arch,
        weights=storage.join(first_dir, "model.pt"), epochs=cfg.retrain_epochs, image_size=cfg.image_size,
        batch_size=32, torch_threads=2))
    score("scene", "after-detector", first_dir, detector.model_dir)
    score("scene", "after", second.model_dir, detector.model_dir)
    before, after = accuracy("before", first_dir), accuracy("after", second.model_dir)
    print(f"\nbefore review (classifier {first_id}, pretrained CenterFace): {before}")
    print(f"the retrained detector alone (classifier {first_id}, detector {detector.model_id}): "
          f"{accuracy('after-detector', first_dir)}")
    print(f"after one round of {exported.faces} reviewed faces in {exported.photos} photos (classifier "
          f"{second.model_id}, detector {detector.model_id}): {after}")
    print(f"labels that took: {exported.faces} faces sent to review in {exported.photos} photos; the reviewer "
          f"relabelled {imported.faces['relabelled']}, added {imported.faces['added']} missed faces, deleted "
          f"{imported.faces['deleted']} and confirmed {imported.faces['kept']}")
    for name, path in (("classifier", storage.join(second.model_dir, "model.json")),
                       ("detector", storage.join(detector.model_dir, "detector.json"))):
        sets = storage.read_json(path)["annotation_sets"]
        print(f"{name} {path} learnt from {[a['uri'] for a in sets]} ({', '.join(a['sha256'][:19] for a in sets)})")
    return 0


if __name__ == "__main__":
    cli.run(main)
