"""N classes end to end, in pure functions: the model card's alert classes, the 3 x 3 evaluation, and the one
photo verdict accuracy that the split table, the detection report and evaluation share (issue 27)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from maskmodel import results
from maskmodel.errors import UserError
from maskmodel.metrics.classification import split_metrics, verdict_accuracy
from maskmodel.models.classifier import ModelCard

CLASSES = ("mask", "mask_incorrect", "no_mask")


def test_a_card_without_alert_classes_derives_them_and_a_new_card_keeps_its_own():
    old = {"arch": "resnet18", "classes": ["mask", "no_mask"], "input_size": 32}  # written before the field
    assert ModelCard.from_json(old).alert_classes == ("no_mask",)
    assert ModelCard.from_json({**old, "classes": list(CLASSES)}).alert_classes == ("mask_incorrect", "no_mask")
    # A card that names its own (trained with --compliant-class no_mask, say) is taken as written, in class order.
    own = ModelCard.from_json({**old, "classes": list(CLASSES), "alert_classes": ["mask", "mask_incorrect"]})
    assert own.alert_classes == ("mask", "mask_incorrect")
    assert ModelCard.from_json(own.to_json()).alert_classes == own.alert_classes  # round trip
    for bad in (["hat"], list(CLASSES)):
        with pytest.raises(UserError, match="not a valid model card"):
            ModelCard.from_json({**old, "classes": list(CLASSES), "alert_classes": bad})


def test_train_rejects_a_compliant_class_the_data_lacks():
    from maskmodel.train.outputs import train_alert_classes

    assert train_alert_classes(CLASSES, "") == ("mask_incorrect", "no_mask")
    assert train_alert_classes(("WithMask", "WithoutMask"), "") == ("WithoutMask",)
    with pytest.raises(UserError, match="--compliant-class 'masked' is not a class of the training data"):
        train_alert_classes(CLASSES, "masked")


def test_three_class_evaluation_confusion_per_class_and_any_alert_curves():
    # truth / predicted class indices of 8 photos; photo 7 is an error row (never scored).
    truth = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 2, 0, 2, 2, -1])
    ok = np.array([True] * 7 + [False])
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.7, 0.2], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1],
                      [0.0, 0.1, 0.9], [0.2, 0.2, 0.6], [0, 0, 0]])
    m = split_metrics(truth, ok, pred, probs, classes=list(CLASSES), alert_classes=("mask_incorrect", "no_mask"),
                      roc_classes=("mask_incorrect",), thresholds=(0.5,))
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 1, 1], [0, 0, 2]]
    assert m["per_class"]["mask"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["mask_incorrect"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["mask_incorrect"]["recall"] == pytest.approx(1 / 3)
    assert m["per_class"]["no_mask"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["no_mask"]["recall"] == 1
    assert m["accuracy"] == pytest.approx(4 / 7) and m["accuracy_all_images"] == pytest.approx(4 / 8)
    # Any alert class: score 1 - p(mask); truth alert for photos 2-6. At 0.5: flagged 1, 2, 3, 5, 6 (4 is 0.5 too).
    half = m["binary"]["thresholds"][0]
    assert (half["tp"], half["fp"], half["fn"]) == (5, 1, 0)
    assert m["binary"]["roc_auc"] == pytest.approx(9 / 10)  # of 10 pairs only (0.5 alert, 0.7 not) is misordered
    # One-vs-rest, where asked: mask_incorrect's own column.
    assert m["one_vs_rest"]["mask_incorrect"]["positives"] == 3 and set(m["one_vs_rest"]) == {"mask_incorrect"}
    # The verdict: photo 1 (mask called incorrect) and 4 (incorrect called mask) wrong, 3 right (alert either
    # way), the error row wrong.
    assert m["verdict"] == verdict_accuracy([False, False, True, True, True, True, True, True],
                                            [False, True, True, True, False, True, True, None])
    assert m["verdict"]["accuracy"] == pytest.approx(5 / 8) and m["verdict"]["errors"] == 1


def test_verdict_accuracy_counts_error_rows_wrong_and_the_alert_side():
    v = verdict_accuracy([True, True, False, False], [True, None, True, False])
    assert v == {"photos": 4, "right": 2, "accuracy": 0.5, "errors": 1, "alerts": 2, "flagged": 2, "tp": 1,
                 "recall": 0.5, "precision": 0.5}
    assert verdict_accuracy([], [])["accuracy"] is None
    with pytest.raises(ValueError):
        verdict_accuracy([True], [])


def _row(path, status, label, alert, run="scene"):
    probs = {results.prob_column(c): (0.9 if c == label else 0.05) if label else None for c in CLASSES}
    return {"path": path, "status": status, "error": None if status == "ok" else "truncated image", "label": label,
            "alert": alert, "confidence": 0.9 if label else None, **probs, "model_id": "m", "run_id": run,
            "scored_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)}


def test_the_demos_split_table_counts_the_verdict_as_the_detection_report_does(tmp_path):
    """One definition: the SQL of the demo's split table over committed rows gives what verdict_accuracy gives
    (and so the detection report, which calls it) for the same photos."""
    from maskmodel.alert import row_alert
    from maskmodel.study.demo import split_table

    rows = [_row("/s/mask/0.jpg", "ok", "mask", False), _row("/s/mask/1.jpg", "ok", "no_mask", True),
            _row("/s/mask/2.jpg", "ok", None, False),                 # no face found, no fallback: no alert
            _row("/s/no_mask/0.jpg", "ok", "mask_incorrect", True),   # the wrong alert class: still an alert
            _row("/s/no_mask/1.jpg", "error", None, None),            # an error row: wrong
            _row("/s/mask_incorrect/0.jpg", "ok", "mask_incorrect", True),
            _row("/s/mask_incorrect/1.jpg", "ok", "mask", False)]
    out = str(tmp_path / "scores")
    schema = results.results_schema(CLASSES)
    w = results.AttemptWriter(out, "scene", schema)
    w.write(pa.Table.from_pylist(rows, schema=schema))
    results.commit(w, meta={})
    alerts = ("mask_incorrect", "no_mask")
    table = {r["split"]: r for r in split_table(out, CLASSES, alerts).to_pylist()}
    folder = [r["path"].split("/")[-2] for r in rows]
    expected = verdict_accuracy([f in alerts for f in folder],
                                [row_alert(r["status"], r["label"], r["alert"], alerts) for r in rows])
    assert expected["accuracy"] == pytest.approx(4 / 7)
    assert table["scene"]["verdict_accuracy"] == round(expected["accuracy"], 3)
    assert table["scene"]["images"] == 7 and table["scene"]["accuracy"] == round(2 / 7, 3)


def test_the_demos_face_table_gives_per_class_recall_their_mean_and_the_mix_dependent_accuracy(tmp_path):
    """The demo's comparison of scene faces with the cut-alike test faces: per class, balanced, all faces."""
    from maskmodel.study.demo import face_accuracy_table

    rows = [_row("/t/mask/0.jpg", "ok", "mask", False), _row("/t/mask/1.jpg", "ok", "mask", False),
            _row("/t/no_mask/0.jpg", "ok", "mask", False), _row("/t/no_mask/1.jpg", "ok", "no_mask", True),
            _row("/t/mask_incorrect/0.jpg", "error", None, None)]  # an error row: a face not classified right
    out = str(tmp_path / "scores")
    schema = results.results_schema(CLASSES)
    w = results.AttemptWriter(out, "test", schema)
    w.write(pa.Table.from_pylist([{**r, "run_id": "test"} for r in rows], schema=schema))
    results.commit(w, meta={})
    # Scene faces: 9 of 10 masked right, 1 of 2 unmasked, none incorrect: all faces 10/12, balanced (0.9+0.5)/2.
    scene = {"by_class": {"mask": {"classified": 10, "right": 9}, "mask_incorrect": {"classified": 0, "right": 0},
                          "no_mask": {"classified": 2, "right": 1}}}
    lines = {line[:30].strip(): line[30:].split() for line in
             face_accuracy_table(scene, out, CLASSES).splitlines()[1:]}
    assert lines["mask"] == ["0.900", "(10)", "1.000", "(2)"]
    assert lines["mask_incorrect"] == ["n/a", "0.000", "(1)"]
    assert lines["no_mask"] == ["0.500", "(2)", "0.500", "(2)"]
    assert lines["balanced (mean of the classes)"] == ["0.700", "0.500"]  # test: (1 + 0 + 0.5) / 3
    assert lines["all faces (own class mix)"] == ["0.833", "0.600"]
    # At the scene's mix (mask 10/12, no_mask 2/12, no incorrect face): test's 1.0 and 0.5 weighted alike.
    assert lines["at the scene faces' class mix"] == ["0.833", f"{10 / 12 * 1.0 + 2 / 12 * 0.5:.3f}"]


def test_the_demo_forgets_only_its_own_earlier_runs(tmp_path):
    """A redrawn demo dataset deletes the demo's earlier runs (else training resumes the old data's run), and
    nothing else: a folder or file of the same name without the demo's marker stays."""
    from maskmodel.study.demo import DEMO_CHECKS, forget_earlier_runs

    out = tmp_path / "demo-output"
    (out / "train" / "checkpoints").mkdir(parents=True)
    (out / "train" / "train_config.json").write_text("{}")
    (out / "scores" / "_delta_log").mkdir(parents=True)
    (out / "checks.toml").write_text(DEMO_CHECKS)
    (out / "report").mkdir()
    (out / "report" / "my-notes.txt").write_text("mine")  # a report folder the demo did not write
    (out / "data").mkdir()
    assert forget_earlier_runs(str(out)) == ["train", "scores", "checks.toml"]
    assert sorted(p.name for p in out.iterdir()) == ["data", "report"]
    assert (out / "report" / "my-notes.txt").read_text() == "mine"
    (out / "checks.toml").write_text("max_error_rate = 0.5\n")  # edited by its user: not the demo's text
    assert forget_earlier_runs(str(out)) == [] and (out / "checks.toml").exists()
