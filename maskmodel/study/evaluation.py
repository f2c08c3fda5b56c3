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
per-face and image-level accuracy, tables by variant and face size, a boxed
contact sheet) from the same committed rows.

Conventions: the *positive* class is the one an alert is raised for (``no_mask``
by default); its probability is the score; an image is flagged when its score
is ``>= threshold``. Undefined ratios (no positives, nothing flagged) are
``None``, never NaN, so the JSON stays valid and "no data" never reads as 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from maskmodel.alert import alert_class
from maskmodel.config import config_to_dict, field, resolve_paths
from maskmodel.errors import UserError
from maskmodel.io import storage

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

# The alert class is the positive class; one rule, shared with scoring (maskmodel.alert).
default_positive_class = alert_class


def _binary(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (drop error rows before computing curves)")
    return y, s


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives flagged at each distinct score, highest score first (ties flagged together)."""
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.empty(0, int)
    tp = np.cumsum(y)[last_of_tie].astype(np.float64)
    fp = np.cumsum(~y)[last_of_tie].astype(np.float64)
    return tp, fp, s[last_of_tie]


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, starting at (0, 0) with threshold +inf; one point per distinct score.

    Raises :class:`ValueError` when ``y_true`` holds only one class (the curve is undefined).
    """
    y, s = _binary(y_true, scores)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        raise ValueError("a ROC curve needs both positive and negative examples")
    tp, fp, thr = _cumulative_counts(y, s)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos], np.r_[np.inf, thr]


def auc(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Area under the piecewise-linear curve through ``(x, y)`` (trapezoid rule); ``x`` must be monotonic."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(abs(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0)))


def roc_auc(y_true, scores) -> float | None:
    """Area under the ROC curve (ties count one half, as in the Mann-Whitney U statistic); ``None`` if one class."""
    try:
        fpr, tpr, _ = roc_curve(y_true, scores)
    except ValueError:
        return None
    return auc(fpr, tpr)


def pr_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` from the highest threshold down, one point per distinct score.

    Raises :class:`ValueError` when there is no positive example (recall is undefined).
    """
    y, s = _binary(y_true, scores)
    pos = int(y.sum())
    if not pos:
        raise ValueError("a precision-recall curve needs at least one positive example")
    tp, fp, thr = _cumulative_counts(y, s)
    return tp / (tp + fp), tp / pos, thr


def average_precision(y_true, scores) -> float | None:
    """Area under the precision-recall step curve: ``sum_k (R_k - R_{k-1}) * P_k``; ``None`` without positives.

    The step sum, not the trapezoid, because linear interpolation between PR
    points over-states precision (Davis & Goadrich 2006).
    """
    try:
        precision, recall, _ = pr_curve(y_true, scores)
    except ValueError:
        return None
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def threshold_table(y_true, scores, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[dict[str, Any]]:
    """One row per threshold: flagged images (score >= threshold), tp, fp, fn, precision, recall.

    ``precision`` is ``None`` when nothing is flagged, ``recall`` when there are
    no positives. This is the table a user reads to pick an alert threshold.
    """
    y, s = _binary(y_true, scores)
    rows = []
    for t in thresholds:
        flagged = s >= t
        tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
        fn = int((~flagged & y).sum())
        rows.append({"threshold": float(t), "flagged": tp + fp, "tp": tp, "fp": fp, "fn": fn,
                     "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)})
    return rows


def calibration(confidence, correct, n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of top-label ``confidence`` against ``correct`` (0/1), with the bins.

    ``n_bins`` equal-width bins over [0, 1]; bin ``i`` holds confidences in
    ``(i/n, (i+1)/n]`` (the first also holds 0). ``ece = sum_b (n_b / N) *
    |accuracy_b - mean confidence_b|``; ``mce`` is the largest such gap over
    non-empty bins. Empty bins are listed with ``count`` 0 and ``None``
    statistics. With no images, ``ece`` and ``mce`` are ``None``.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct).astype(bool).ravel()
    if conf.shape != ok.shape:
        raise ValueError(f"{conf.size} confidences but {ok.size} correctness flags")
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins, ece, mce = [], 0.0, 0.0
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        row = {"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": n, "confidence": None, "accuracy": None,
               "gap": None}
        if n:
            c, a = float(conf[sel].mean()), float(ok[sel].mean())
            row.update(confidence=c, accuracy=a, gap=abs(a - c))
            ece += n / conf.size * abs(a - c)
            mce = max(mce, abs(a - c))
        bins.append(row)
    return {"ece": float(ece) if conf.size else None, "mce": float(mce) if conf.size else None,
            "n_bins": n_bins, "bins": bins}


def curve_points(names: tuple[str, str, str], x: np.ndarray, y: np.ndarray, thresholds: np.ndarray, *,
                 max_points: int = 2000) -> dict[str, list]:
    """A curve as JSON lists under ``names`` (``+inf`` threshold as ``None``), thinned evenly to ``max_points``."""
    keep = np.arange(x.size)
    if x.size > max_points:
        keep = np.unique(np.r_[np.linspace(0, x.size - 1, max_points).round().astype(int), x.size - 1])
    return {names[0]: [round(float(v), 6) for v in x[keep]], names[1]: [round(float(v), 6) for v in y[keep]],
            names[2]: [None if not np.isfinite(v) else round(float(v), 6) for v in thresholds[keep]]}


def binary_report(y_true, scores, *, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """ROC AUC, average precision, both curves (for plots and the JSON) and the threshold table of one class."""
    y, s = _binary(y_true, scores)
    out: dict[str, Any] = {"positives": int(y.sum()), "negatives": int((~y).sum()),
                           "roc_auc": roc_auc(y, s), "average_precision": average_precision(y, s),
                           "roc": None, "pr": None, "thresholds": threshold_table(y, s, thresholds)}
    if out["roc_auc"] is not None:
        out["roc"] = curve_points(("fpr", "tpr", "thresholds"), *roc_curve(y, s))
    if out["average_precision"] is not None:
        out["pr"] = curve_points(("precision", "recall", "thresholds"), *pr_curve(y, s))
    return out


def split_metrics(truth: np.ndarray, ok: np.ndarray, pred: np.ndarray, probs: np.ndarray, *,
                  classes: Sequence[str], positive: str, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                  n_bins: int = 10) -> dict[str, Any]:
    """Every number of one split from joined rows: ``truth``/``pred`` class indices, ``ok`` (scored, not an
    error row), ``probs`` (N, C) class probabilities (ignored where not ``ok``).

    Classification metrics, curves and calibration cover the ``ok`` rows;
    ``images``, ``errors`` and ``accuracy_all_images`` cover every row.
    """
    from maskmodel.metrics import classification_report, confusion_matrix

    truth, ok, pred = np.asarray(truth, int), np.asarray(ok, bool), np.asarray(pred, int)
    probs = np.asarray(probs, np.float64).reshape(len(truth), len(classes))
    t, p, pr = truth[ok], pred[ok], probs[ok]
    out = classification_report(confusion_matrix(t, p, len(classes)), classes)
    correct = int((t == p).sum())
    out.update(images=int(len(truth)), scored=int(ok.sum()), errors=int((~ok).sum()),
               accuracy_all_images=float(correct / len(truth)) if len(truth) else 0.0, positive_class=positive)
    out["binary"] = binary_report(t == classes.index(positive), pr[:, classes.index(positive)],
                                  thresholds=thresholds)
    out["calibration"] = calibration(pr.max(axis=1) if len(pr) else np.empty(0), t == p, n_bins)
    return out


# ----------------------------------------------------------------------------- the jobs.evaluate pipeline

@dataclass(frozen=True)
class EvalConfig:
    """Everything ``jobs.evaluate`` needs; the resolved copy is stored in ``report.json``.

    Local paths become absolute here, on construction in the driver (``path=`` fields,
    :func:`maskmodel.config.resolve_paths`), so no Ray worker resolves them against its own folder.
    """

    model: str = field(path=True, help="URI of a model directory written by jobs.train")
    data: str = field(path=True, help="URI of labelled data: an ImageFolder tree <root>/<split>/<class>/<image> or a "
                           "CSV/Parquet manifest path,label[,split] (the layouts jobs.train reads)")
    output: str = field(path=True, help="URI of the report folder (report.json, report.md, PNGs, scores/)")
    split: tuple[str, ...] = field(("test",), help="split(s) to evaluate, e.g. val test scene (any case; "
                                                   "Validation = val)")
    positive_class: str = field("", help="the alert class for ROC/PR and the threshold table (default: a "
                                         "no_mask / WithoutMask class if present, else the last class)")
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


@dataclass(frozen=True)
class EvalResult:
    """Where the report went, and its contents (``report["splits"][split]`` holds one split's numbers)."""

    output: str
    report_uri: str
    report: dict[str, Any]


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


def _evaluate_split(cfg: EvalConfig, card, items, split: str, positive: str,
                    annotations: str | None) -> dict[str, Any]:
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
    joined = eval_scoring.join_rows(table, truth, classes)
    out = split_metrics(joined["truth"], joined["ok"], joined["pred"], joined["probs"], classes=classes,
                        positive=positive, thresholds=cfg.thresholds, n_bins=cfg.bins)
    out.update(run_id=split, commit=run.commit_uri, model_ids=sorted(set(table.column("model_id").to_pylist())),
               error_rows=joined["errors"])
    pngs = {f"confusion_matrix_{split}.png": reports.confusion_matrix_png(
                np.asarray(out["confusion_matrix"]), classes, title=f"{split}: {out['scored']} images"),
            f"roc_pr_{split}.png": eval_reports.roc_pr_png(out["binary"], positive=positive, title=split),
            f"reliability_{split}.png": eval_reports.reliability_png(out["calibration"], title=split)}
    sheet, out["contact_sheet"] = _contact_sheet(joined, classes, cfg.max_tiles)
    pngs[f"contact_sheet_{split}.png"] = sheet
    for name, data in pngs.items():
        storage.write_bytes(storage.join(cfg.output, name), data)
    out["detection"] = detection_report.evaluate_detection(
        table, annotations, list(truth), classes, positive, iou=cfg.iou, max_tiles=cfg.max_tiles,
        output=cfg.output, split=split)
    out["files"] = sorted([*pngs, *out["detection"].get("files", [])])
    log.info("%s: accuracy %.4f on %d scored image(s), %d error row(s)", split, out["accuracy"], out["scored"],
             out["errors"])
    return out


def evaluate(config: EvalConfig) -> EvalResult:
    """Score the labelled images of ``config.split`` and write the report (see the module docstring).

    Raises :class:`UserError` (one sentence) for an unwritable output, a
    missing or invalid model directory, unreadable data, a requested split
    without labelled images, data classes the model does not know, an
    unknown ``positive_class``, a missing or unusable annotation file, or a
    face option scoring cannot take, all before anything is scored.
    """
    from maskmodel.data.annotations import read_annotations
    from maskmodel.data.discovery import discover
    from maskmodel.models.classifier import load_card
    from maskmodel.study import detection_report, eval_scoring
    from maskmodel.study.eval_reports import report_markdown

    storage.check_writable(config.output)
    card = load_card(config.model)
    positive = config.positive_class or default_positive_class(card.classes)
    if positive not in card.classes:
        raise UserError(f"--positive-class {positive!r} is not a class of the model {config.model!r} "
                        f"(classes: {', '.join(card.classes)}).")
    data = discover(config.data)
    unknown = sorted(set(data.classes) - set(card.classes))
    if unknown:
        raise UserError(f"Classes {unknown} of {config.data!r} are not classes of the model {config.model!r} "
                        f"({', '.join(card.classes)}); evaluate on data with the model's classes.")
    # Re-index labels by the model's class order (the data's order is its own sorted folder names).
    remap = {i: card.classes.index(c) for i, c in enumerate(data.classes)}
    splits = list(dict.fromkeys(_canonical_split(s) for s in config.split))
    for s in splits:
        if not data.splits.get(s):
            raise UserError(f"{config.data!r} has no labelled images in split {s!r} (it has: "
                            f"{', '.join(sorted(data.splits))}); pass --split with one of those.")
    report: dict[str, Any] = {"model": config.model, "model_id": card.model_id, "data": config.data,
                              "classes": list(card.classes), "positive_class": positive,
                              "scores": storage.join(config.output, "scores"), "config": config_to_dict(config),
                              "splits": {}}
    if config.annotations and not storage.exists(config.annotations):
        raise UserError(f"--annotations {config.annotations!r} does not exist; give a COCO .json file or Pascal VOC "
                        f".xml file or folder.")
    boxes = {s: config.annotations or detection_report.default_annotations(config.data, s) for s in splits}
    for uri in dict.fromkeys(u for u in boxes.values() if u):
        read_annotations(uri)  # an unusable file fails here, not after scoring
    eval_scoring.score_config(config, config.model, config.output, "check")  # so do face options scoring lacks
    for s in splits:
        items = [type(it)(it.uri, remap[it.label], it.split) for it in data.splits[s]]
        report["splits"][s] = _evaluate_split(config, card, items, s, positive, boxes[s])
    uri = storage.join(config.output, "report.json")
    storage.write_json(uri, report)
    storage.write_text(storage.join(config.output, "report.md"), report_markdown(report))
    return EvalResult(config.output, uri, report)
