"""COCO AP and IoU matching of face boxes (pycocotools underneath), on hand-built boxes."""

from __future__ import annotations

import numpy as np
import pytest

from maskmodel.metrics.detection import detection_metrics, match


def test_match_takes_predictions_in_score_order_and_each_truth_box_once():
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    pred = np.array([[1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    m = match(truth, pred, np.array([0.6, 0.9, 0.8]))
    assert m.pairs.tolist() == [[0, 1]]  # the higher-scoring duplicate wins the box
    assert m.missed.tolist() == [1] and sorted(m.spurious.tolist()) == [0, 2]
    # IoU 81/100 = 0.81: matched at 0.5, not at 0.9.
    assert len(match(truth[:1], pred[:1], iou=0.5).pairs) == 1 and len(match(truth[:1], pred[:1], iou=0.9).pairs) == 0
    empty = match(np.zeros((0, 4)), pred)
    assert empty.pairs.shape == (0, 2) and empty.spurious.tolist() == [0, 1, 2]


def test_perfect_detections_score_one_and_misses_lower_recall_and_ap():
    truth = [np.array([[10, 10, 50, 50]], np.float32), np.array([[5, 5, 25, 25], [60, 60, 90, 90]], np.float32)]
    perfect = detection_metrics(truth, truth, [np.ones(1), np.ones(2)], sizes=[(100, 100)] * 2)
    assert perfect["ap50"] == pytest.approx(1.0) and perfect["ap"] == pytest.approx(1.0)
    assert (perfect["recall"], perfect["precision"], perfect["faces"], perfect["matched"]) == (1.0, 1.0, 3, 3)
    # One face missed and one false alarm (scored below the real ones): recall 2/3, precision 2/3.
    pred = [truth[0], np.array([[5, 5, 25, 25], [0, 70, 10, 80]], np.float32)]
    got = detection_metrics(truth, pred, [np.ones(1), np.array([0.9, 0.3])], sizes=[(100, 100)] * 2)
    assert got["recall"] == pytest.approx(2 / 3) and got["precision"] == pytest.approx(2 / 3)
    assert 0.5 < got["ap50"] < 1.0
    # The operating threshold drops the false alarm from precision, not from AP.
    high = detection_metrics(truth, pred, [np.ones(1), np.array([0.9, 0.3])], sizes=[(100, 100)] * 2, threshold=0.5)
    assert high["precision"] == 1.0 and high["ap50"] == got["ap50"] and high["detections"] == 2


def test_no_predictions_and_no_faces():
    truth = [np.array([[10, 10, 50, 50]], np.float32)]
    none = detection_metrics(truth, [np.zeros((0, 4))], [np.zeros(0)])
    assert (none["ap50"], none["recall"], none["precision"]) == (0.0, 0.0, 0.0)
    nothing = detection_metrics([np.zeros((0, 4))], [np.array([[0, 0, 5, 5]])], [np.ones(1)])
    assert nothing["ap50"] == -1.0 and nothing["faces"] == 0 and nothing["precision"] == 0.0
