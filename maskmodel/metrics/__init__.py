"""Metrics, in one home: every job that reports a number computes it here, the same way.

Owns: classification figures (:mod:`.classification`: confusion matrix, per-class precision / recall /
F1, ROC and precision-recall curves with AUC and average precision, threshold tables, calibration
error, the photo verdict accuracy) and detection figures (:mod:`.detection`: IoU matching of found to
annotated faces, recall and precision at an operating point, COCO AP through pycocotools).

May import: numpy, pycocotools and the shared pieces at the top of ``maskmodel``; nothing else of it.
"""

from maskmodel.metrics.classification import classification_report, confusion_matrix, verdict_accuracy

__all__ = ["classification_report", "confusion_matrix", "verdict_accuracy"]
