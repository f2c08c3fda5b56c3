"""The built-in demo: synthetic data → training → scoring → a query summary, all local.

What ``make demo`` runs on a fresh machine (local Ray, local disk, no downloads)::

    python -m jobs.demo --out demo-output

It draws the synthetic face-mask dataset (three classes: ``mask``, ``no_mask``, ``mask_incorrect``),
trains the classifier from scratch at a small image size for a few epochs on the faces of the
``detect`` scenes' boxes (``detect.coco.json``, cut by the face stage's own crop, as a team's
annotated photos would be), fine-tunes the CenterFace face detector on the ``detect`` scenes (sized for a
couple of CPU cores and a few minutes in all), then scores the ``test`` faces (cut from scenes of their
own as the face stage cuts a face) with ``--faces none`` and the ``scene`` pictures with the trained
detector as two runs, and prints the per-run summary, the accuracy per split with the one photo verdict
accuracy, the detector's recall and precision on the scenes, and the three-class per-face accuracy of the
scene faces found next to the ``test`` faces' (per class, their mean, and over all faces, which the class
mix moves: the scenes hold more masked faces) and the held-out ``detect`` faces'. Then a second "night" of scenes with a
shifted mix (three in four pictures
with an unmasked face instead of one in two, and some truncated uploads) is scored as run
``night-2``, and ``jobs.report`` compares it with the ``scene`` run: the report page
(``<out>/report/report.html``) and the drift checks of ``<out>/checks.toml``, which fail. Each step
is one of the real jobs; the commands to run them yourself are printed at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from maskmodel.runtime import cli
from maskmodel.config import field, parse_config, resolve_paths
from maskmodel.io import storage
from maskmodel.models.spec import CLASSIFIER_ARCHITECTURES

log = logging.getLogger("jobs.demo")


@dataclass(frozen=True)
class DemoConfig:
    out: str = field("demo-output", path=True, help="where the data, the trained model and the results go")
    n_per_class: int = field(300, help="synthetic training images per class")
    image_size: int = field(64, help="image edge in pixels for generation and training")
    epochs: int = field(15, help="classifier training epochs (15: the scene pictures hold up to four faces, and "
                                 "one misclassified face makes the picture wrong; in two runs each, 6 epochs gave "
                                 "0.81-0.85 per face and 0.73-0.79 per picture, 15 gave 0.87-0.90 and 0.81-0.87)")
    detector_epochs: int = field(4, help="face detector fine-tuning epochs (0: score scenes with the pretrained "
                                         "CenterFace, --faces auto, instead)")
    arch: str = field("resnet18", choices=CLASSIFIER_ARCHITECTURES,
                      help="architecture; resnet18 because ResNet-50 without ImageNet weights needs far more "
                           "data and epochs than a 2-core demo allows")

    def __post_init__(self) -> None:
        resolve_paths(self)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DemoConfig, argv, prog="python -m jobs.demo", description=__doc__)
    # After parsing: --help imports neither torch nor Ray.
    from maskmodel.data import synth
    from maskmodel.models.classifier import load_card
    from maskmodel.results import query
    from maskmodel.score import scoring
    from maskmodel.study import demo
    from maskmodel.train import detection, training

    data, run, det_run, scores = (storage.join(cfg.out, p) for p in ("data", "train", "detector", "scores"))
    storage.check_writable(cfg.out)
    dataset = storage.join(data, "dataset.json")
    old = storage.read_json(dataset).get("version") if storage.exists(dataset) else None
    if old != synth.VERSION:  # none yet, or drawn by an older generator: (re)draw it, and start the runs afresh
        if old is not None:  # else training would resume the older data's finished run and scoring add to its table
            log.info("the dataset in %s was drawn by generator version %s (now %s): drawing it again and starting "
                     "the demo's runs afresh (deleted: %s)", data, old, synth.VERSION,
                     ", ".join(demo.forget_earlier_runs(cfg.out)) or "nothing")
        synth.write_dataset(synth.DatasetConfig(out=data, n_per_class=cfg.n_per_class, image_size=cfg.image_size,
                                                overwrite=old is not None))
    # The classifier learns from the faces of the detect scenes' boxes, cut as the face stage cuts them at scoring
    # time (docs/training.md, "Training from annotated photos"), as a team's own annotated photos would be used.
    trained = training.train(training.TrainConfig(
        data=storage.join(data, synth.DETECT_ANNOTATIONS), output=run, arch=cfg.arch, weights="none", epochs=cfg.epochs, image_size=cfg.image_size,
        batch_size=32, torch_threads=2))
    faces = "auto"
    if cfg.detector_epochs:
        detector = detection.train_detector(detection.DetectTrainConfig(
            data=data, output=det_run, epochs=cfg.detector_epochs, batch_size=8, torch_threads=2,
            image_size=storage.read_json(dataset)["scene_size"]))
        faces = detector.model_dir
    for split, split_faces in (("test", "none"), ("scene", faces)):
        res = scoring.score(scoring.ScoreConfig(input=storage.join(data, split), model=trained.model_dir,
                                                output=scores, run_id=split, faces=split_faces))
        print(f"{split}: {res.summary_line()}")
    print(query.format_table(query.summary(scores)))
    # The synthetic folders carry the true label, so the demo can show accuracy per split too.
    card = load_card(trained.model_dir)
    print(query.format_table(demo.split_table(scores, card.classes, card.alert_classes)))
    print(demo.scene_faces_line(data, scores, card, storage.join(cfg.out, "scene_faces"), compare_with="test"))
    print(f"\nheld-out faces of the detect scenes (cut from their boxes as scoring cuts): accuracy "
          f"{trained.val_acc:.3f} at epoch {trained.best_epoch} of {trained.epochs_run}; the `test` row above: "
          f"faces of other scenes cut alike, scored whole; model {trained.model_dir}")
    print(f"curves, augmented samples, confusion matrix: {run}")
    if cfg.detector_epochs:
        print(f"face detector {detector.model_id}: val AP50 {detector.metrics['val_ap50']:.3f}, recall "
              f"{detector.metrics['val_recall']:.3f}, precision {detector.metrics['val_precision']:.3f}; "
              f"curves and detections.png: {det_run}")
    print(demo.shifted_night(cfg.out, storage.read_json(dataset)["scene_size"], trained.model_dir, faces, scores))
    print(f"try:  python -m jobs.query --results {scores} "
          f"\"SELECT run_id, label, count(*) FROM predictions GROUP BY ALL ORDER BY ALL\"")
    return 0


if __name__ == "__main__":
    cli.run(main)
