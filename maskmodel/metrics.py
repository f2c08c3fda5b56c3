"""Classification metrics from a confusion matrix. Pure numpy, no Ray, no torch."""

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
