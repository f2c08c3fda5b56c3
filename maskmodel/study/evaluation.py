"""Evaluating a trained model on labelled splits: the metrics, and the report built from committed scoring rows.

The metrics are pure numpy (no Ray, no torch): ROC and precision-recall curves
with their areas, an alert-threshold table and calibration (expected
calibration error with its reliability bins). Each takes arrays and returns
plain numbers and lists, so results go straight into ``report.json``, and each
is unit tested against hand-computed values.

:func:`evaluate` is the ``jobs.evaluate`` pipeline. It does not run a second
inference path: it writes a Parquet manifest of the requested split's labelled
images, scores it with :func:`maskmodel.score.scoring.score` (run id = split name),
reads the *committed* rows back with :func:`maskmodel.results.read_results`,
joins them to the true labels by path and computes every number from those
rows. Error rows (unreadable, undecodable) are counted and listed, never
silently dropped: the metrics over scored images say how many images they
cover, and ``accuracy_all_images`` counts an error as a wrong answer.
With face boxes annotated for a split (``--annotations``, or
``<data>/<split>.coco.json``), each split also gets a detection section
(:mod:`maskmodel.study.detection_report`: detection recall, precision and AP,
per-face and photo verdict accuracy, tables by variant and face size, a boxed
contact sheet) from the same committed rows.

Conventions: the model card's alert classes (every class but the compliant
one, :mod:`maskmodel.alert`) are the *positive* side: the ROC / PR curves and
the threshold table are of "any alert class", scored ``1 - p(compliant)``, and
an image is flagged when that score is ``>= threshold``; ``--roc-classes`` adds
one-vs-rest curves per named class. The confusion matrix is C x C with
per-class precision / recall / F1, and ``verdict`` is the photo verdict
accuracy (:func:`maskmodel.metrics.classification.verdict_accuracy`).
Undefined ratios (no positives, nothing flagged) are ``None``, never NaN, so
the JSON stays valid and "no data" never reads as 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from maskmodel.config import config_to_dict, field, resolve_paths
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.metrics.classification import DEFAULT_THRESHOLDS, split_metrics

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the jobs.evaluate pipeline

@dataclass(frozen=True)
class EvalConfig:
    """Everything ``jobs.evaluate`` needs; the resolved copy is stored in ``report.json``.

    Local paths become absolute here, on construction in the driver (``path=`` fields,
    :func:`maskmodel.config.resolve_paths`), so no Ray worker resolves them against its own folder.
    """

    model: str = field(path=True, help="URI of a model directory written by jobs.train")
    data: str = field(path=True, help="URI of labelled data: an ImageFolder tree <root>/<split>/<class>/<image> or a "
                           "CSV/Parquet manifest path,label[,split] (the layouts jobs.train reads; no training "
                           "split needed: entries without a split are the one --split asked, unless train/val)")
    output: str = field(path=True, help="URI of the report folder (report.json, report.md, PNGs, scores/)")
    split: tuple[str, ...] = field(("test",), help="split(s) to evaluate, e.g. val test scene (any case; "
                                                   "Validation = val)")
    roc_classes: tuple[str, ...] = field((), help="classes that also get a one-vs-rest ROC/PR curve and threshold "
                                                  "table (the main ones are of any alert class: 1 - p(compliant))")
    positive_class: str = field("", help="replaced: the model card's alert classes are the positive side; use "
                                         "--roc-classes for one class's curves (passing it is an error)")
    thresholds: tuple[float, ...] = field(DEFAULT_THRESHOLDS, help="thresholds of the alert-threshold table")
    bins: int = field(10, help="equal-width confidence bins for the calibration error and reliability diagram")
    max_tiles: int = field(48, help="images on each contact sheet (misclassified first)")
    num_gpus: float = field(0.0, help="GPUs per scoring actor; 0 scores on CPU")
    annotations: str = field("", path=True, help="face boxes of the split(s), COCO JSON or Pascal VOC XML (file or "
                                                 "folder), for the detection section (default: <data>/<split>.coco"
                                                 ".json where present, as the synthetic scene split has)")
    faces: str = field("auto", path=("none", "auto", "centerface"),
                       help="how scoring finds faces (jobs.score --faces): none, auto, centerface or a detector "
                            "model directory URI")
    detector_weights: str = field("", path=True, help="a CenterFace ONNX file for scoring (jobs.score "
                                                      "--detector-weights)")
    iou: float = field(0.5, help="IoU at which a detected face matches an annotated one (detection recall, "
                                 "precision and per-face accuracy)")

    def __post_init__(self) -> None:
        resolve_paths(self)
        if not self.split:
            raise ValueError("--split needs at least one split name")
        if self.bins < 1 or self.max_tiles < 1:
            raise ValueError("--bins and --max-tiles must be at least 1")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError("--thresholds must lie in [0, 1]")
        if not 0.0 < self.iou <= 1.0:
            raise ValueError("--iou must lie in (0, 1]")
        if self.positive_class:
            raise ValueError(f"--positive-class was replaced: the model card's alert classes (every class but the "
                             f"compliant one) are the positive side of the curves and the threshold table; for "
                             f"{self.positive_class!r} alone pass --roc-classes {self.positive_class}")


@dataclass(frozen=True)
class EvalResult:
    """Where the report went, and its contents (``report["splits"][split]`` holds one split's numbers)."""

    output: str
    report_uri: str
    report: dict[str, Any]


def alert_name(alert_classes: Sequence[str]) -> str:
    """How reports name the positive side: ``any alert class: mask_incorrect, no_mask``, or the one class."""
    return alert_classes[0] if len(alert_classes) == 1 else f"any alert class: {', '.join(alert_classes)}"


def _canonical_split(name: str) -> str:
    from maskmodel.data.discovery import SPLIT_ALIASES

    return SPLIT_ALIASES.get(name.lower(), name.lower())


def _contact_sheet(joined: dict[str, Any], classes: Sequence[str], max_tiles: int) -> tuple[bytes, dict[str, Any]]:
    """Misclassified images first (most confident mistakes first), then correct ones (least confident first)."""
    from maskmodel.io.decode import decode_image
    from maskmodel.study import eval_reports

    ok, truth, pred = joined["ok"], joined["truth"], joined["pred"]
    conf = joined["probs"].max(axis=1)
    wrong = [i for i in np.flatnonzero(ok & (pred != truth))]
    right = [i for i in np.flatnonzero(ok & (pred == truth))]
    order = sorted(wrong, key=lambda i: -conf[i]) + sorted(right, key=lambda i: conf[i])
    chosen = order[:max_tiles]
    images = [decode_image(storage.read_bytes(joined["paths"][i])) for i in chosen]
    captions = [(f"{classes[pred[i]]} {conf[i]:.2f}", f"true {classes[truth[i]]}") for i in chosen]
    png, layout = eval_reports.contact_sheet_png(images, captions, [bool(pred[i] == truth[i]) for i in chosen])
    layout.update(misclassified=int(sum(pred[i] != truth[i] for i in chosen)),
                  paths=[joined["paths"][i] for i in chosen])
    return png, layout


def _evaluate_split(cfg: EvalConfig, card, items, split: str, annotations: str | None) -> dict[str, Any]:
    from maskmodel import reports, results
    from maskmodel.score import pipeline, scoring
    from maskmodel.study import detection_report, eval_reports, eval_scoring

    classes = list(card.classes)
    manifest = storage.join(cfg.output, "manifests", f"{split}.parquet")
    scores = storage.join(cfg.output, "scores")
    listed = eval_scoring.write_manifest(manifest, items, classes)
    run = scoring.score(eval_scoring.score_config(cfg, manifest, scores, split))
    # The truth side goes through the same path resolution as the scoring job's manifest reader.
    base = pipeline.manifest_base(manifest)
    truth = {pipeline.resolve_manifest_path(base, p): it.label for p, it in zip(listed, items)}
    table = results.read_results(scores, run_ids=[split])
    joined = eval_scoring.join_rows(table, truth, classes, card.alert_classes)
    out = split_metrics(joined["truth"], joined["ok"], joined["pred"], joined["probs"], classes=classes,
                        alert_classes=card.alert_classes, roc_classes=cfg.roc_classes, thresholds=cfg.thresholds,
                        n_bins=cfg.bins)
    out.update(run_id=split, commit=run.commit_uri, model_ids=sorted(set(table.column("model_id").to_pylist())),
               error_rows=joined["errors"])
    pngs = {f"confusion_matrix_{split}.png": reports.confusion_matrix_png(
                np.asarray(out["confusion_matrix"]), classes, title=f"{split}: {out['scored']} images"),
            f"roc_pr_{split}.png": eval_reports.roc_pr_png(out["binary"], positive=alert_name(card.alert_classes),
                                                           title=split),
            f"reliability_{split}.png": eval_reports.reliability_png(out["calibration"], title=split)}
    sheet, out["contact_sheet"] = _contact_sheet(joined, classes, cfg.max_tiles)
    pngs[f"contact_sheet_{split}.png"] = sheet
    for name, data in pngs.items():
        storage.write_bytes(storage.join(cfg.output, name), data)
    out["detection"] = detection_report.evaluate_detection(
        table, annotations, list(truth), classes, card.alert_classes, iou=cfg.iou, max_tiles=cfg.max_tiles,
        output=cfg.output, split=split, faces=cfg.faces)
    out["files"] = sorted([*pngs, *out["detection"].get("files", [])])
    log.info("%s: accuracy %.4f on %d scored image(s), %d error row(s); photo verdict accuracy %.4f", split,
             out["accuracy"], out["scored"], out["errors"], out["verdict"]["accuracy"] or 0.0)
    return out


def evaluate(config: EvalConfig) -> EvalResult:
    """Score the labelled images of ``config.split`` and write the report (see the module docstring).

    Raises :class:`UserError` (one sentence) for an unwritable output, a
    missing or invalid model directory, unreadable data, a requested split
    without labelled images, data classes the model does not know, an
    unknown ``roc_classes`` class, a missing or unusable annotation file, one
    whose annotated photos are none of the photos to score, or a face option
    scoring cannot take, all before anything is scored.
    """
    from maskmodel.data.annotations import read_annotations
    from maskmodel.data.discovery import discover_splits
    from maskmodel.models.classifier import load_card
    from maskmodel.study import detection_report, eval_scoring
    from maskmodel.study.eval_reports import report_markdown

    storage.check_writable(config.output)
    card = load_card(config.model)
    unknown_roc = [c for c in config.roc_classes if c not in card.classes]
    if unknown_roc:
        raise UserError(f"--roc-classes {', '.join(unknown_roc)} is not a class of the model {config.model!r} "
                        f"(classes: {', '.join(card.classes)}).")
    splits = list(dict.fromkeys(_canonical_split(s) for s in config.split))
    data = discover_splits(config.data, splits)  # no training split needed: only the photos to evaluate
    unknown = sorted(set(data.classes) - set(card.classes))
    if unknown:
        raise UserError(f"Classes {unknown} of {config.data!r} are not classes of the model {config.model!r} "
                        f"({', '.join(card.classes)}); evaluate on data with the model's classes.")
    # Re-index labels by the model's class order (the data's order is its own sorted folder names).
    remap = {i: card.classes.index(c) for i, c in enumerate(data.classes)}
    report: dict[str, Any] = {"model": config.model, "model_id": card.model_id, "data": config.data,
                              "classes": list(card.classes), "alert_classes": list(card.alert_classes),
                              "alert": alert_name(card.alert_classes),
                              "scores": storage.join(config.output, "scores"), "config": config_to_dict(config),
                              "splits": {}}
    if config.annotations and not storage.exists(config.annotations):
        raise UserError(f"--annotations {config.annotations!r} does not exist; give a COCO .json file, a Pascal VOC "
                        f".xml file or folder, or a YOLO folder.")
    boxes = {s: config.annotations or detection_report.default_annotations(config.data, s) for s in splits}
    items = {s: [type(it)(it.uri, remap[it.label], it.split) for it in data.splits[s]] for s in splits}
    for uri in dict.fromkeys(u for u in boxes.values() if u):
        # An unusable file, or one whose photos are none of the ones to score, fails here, not after scoring.
        users = [s for s in splits if boxes[s] == uri]
        detection_report.check_matched(uri, read_annotations(uri),
                                       {p for s in users for p in eval_scoring.scored_paths(items[s])}, users)
    eval_scoring.score_config(config, config.model, config.output, "check")  # so do face options scoring lacks
    for s in splits:
        report["splits"][s] = _evaluate_split(config, card, items[s], s, boxes[s])
    uri = storage.join(config.output, "report.json")
    storage.write_json(uri, report)
    storage.write_text(storage.join(config.output, "report.md"), report_markdown(report))
    return EvalResult(config.output, uri, report)
