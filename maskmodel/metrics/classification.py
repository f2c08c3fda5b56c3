"""Classification metrics: confusion matrix, per-class precision / recall / F1, ROC and precision-recall
curves, threshold tables and calibration. Pure numpy, no Ray, no torch."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of images of true class ``i`` predicted as ``j``."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def classification_report(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy and per-class precision / recall / F1 / support from ``cm``.

    A class that is never predicted (or never present) gets precision
    (or recall) 0.0 rather than NaN, so the report stays valid JSON.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    pred = cm.sum(axis=0)
    true = cm.sum(axis=1)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(true[i])}
        for i, name in enumerate(classes)
    }
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "images": int(total),
        "per_class": per_class,
        "macro_f1": float(f1.mean()) if len(classes) else 0.0,
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "classes": list(classes),
    }


#: Alert-class probability thresholds of the threshold table.
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


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
                  classes: Sequence[str], alert_classes: Sequence[str], roc_classes: Sequence[str] = (),
                  thresholds: Sequence[float] = DEFAULT_THRESHOLDS, n_bins: int = 10) -> dict[str, Any]:
    """Every number of one split from joined rows: ``truth``/``pred`` class indices, ``ok`` (scored, not an
    error row), ``probs`` (N, C) class probabilities (ignored where not ``ok``).

    Classification metrics (the C x C confusion matrix, per-class precision / recall / F1), curves and
    calibration cover the ``ok`` rows; ``images``, ``errors``, ``accuracy_all_images`` and ``verdict``
    (:func:`verdict_accuracy`: a photo's truth is alert when its true class is one of ``alert_classes``,
    its verdict is alert when its predicted class is; an error row is wrong) cover every row. ``binary``:
    ROC / PR / threshold table of "any alert class", scored ``1 - p(compliant)`` (the sum of the alert
    classes' probabilities); ``one_vs_rest``: the same for each class of ``roc_classes``, against the rest.
    """

    truth, ok, pred = np.asarray(truth, int), np.asarray(ok, bool), np.asarray(pred, int)
    probs = np.asarray(probs, np.float64).reshape(len(truth), len(classes))
    t, p, pr = truth[ok], pred[ok], probs[ok]
    out = classification_report(confusion_matrix(t, p, len(classes)), classes)
    correct = int((t == p).sum())
    out.update(images=int(len(truth)), scored=int(ok.sum()), errors=int((~ok).sum()),
               accuracy_all_images=float(correct / len(truth)) if len(truth) else 0.0,
               alert_classes=list(alert_classes))
    cols = [classes.index(c) for c in alert_classes]
    out["verdict"] = verdict_accuracy(np.isin(truth, cols).tolist(),
                                      [bool(np.isin(q, cols)) if o else None for q, o in zip(pred, ok)])
    out["binary"] = binary_report(np.isin(t, cols), pr[:, cols].sum(1), thresholds=thresholds)
    out["one_vs_rest"] = {c: binary_report(t == classes.index(c), pr[:, classes.index(c)], thresholds=thresholds)
                          for c in roc_classes}
    out["calibration"] = calibration(pr.max(axis=1) if len(pr) else np.empty(0), t == p, n_bins)
    return out


def verdict_accuracy(truth: Sequence[bool], predicted: Sequence[bool | None]) -> dict[str, Any]:
    """The photo verdict accuracy: a photo is right when its verdict (alert or not) matches its truth.

    ``truth``: each photo's true verdict (:func:`maskmodel.alert.truth_alert`: alert when any annotated face
    is of an alert class); ``predicted``: its row's verdict (:func:`maskmodel.alert.row_alert`: the ``alert``
    column; a photo where no face was found and no whole-image fallback ran is ``False``; with ``--faces
    auto``'s fallback the row's verdict stands), ``None`` for an error or missing row, which counts as wrong.
    Returns ``photos``, ``right``, ``accuracy`` (``None`` without photos), ``errors``, and the alert side:
    ``alerts`` (true), ``flagged``, ``tp``, ``recall``, ``precision`` (``None`` when undefined).
    Raises :class:`ValueError` when the two differ in length.
    """
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} true verdicts but {len(predicted)} predicted")
    t = [bool(v) for v in truth]
    right = sum(p is not None and bool(p) == v for v, p in zip(t, predicted))
    tp = sum(bool(p) and v for v, p in zip(t, predicted))
    flagged, alerts = sum(bool(p) for p in predicted), sum(t)
    return {"photos": len(t), "right": right, "accuracy": _ratio(right, len(t)),
            "errors": sum(p is None for p in predicted), "alerts": alerts, "flagged": flagged, "tp": tp,
            "recall": _ratio(tp, alerts), "precision": _ratio(tp, flagged)}
