"""Evaluate a trained model on labelled splits: metrics, curves, calibration and a contact sheet.

Scores the labelled images of each --split with the scoring pipeline (one committed run per split under
<output>/scores), joins the committed rows to the folder labels by path, and writes report.json (every
number), report.md, and per split confusion_matrix_<split>.png, roc_pr_<split>.png, reliability_<split>.png
and contact_sheet_<split>.png::

    python -m jobs.evaluate --model ./runs/r1/model --data ./data/faces --split val test scene \\
        --output ./runs/r1/evaluation

On a cluster (set RAY_AUTH_MODE=token when the cluster has token auth)::

    ray job submit --working-dir . -- python -m jobs.evaluate --model s3://bucket/runs/r1/model \\
        --data s3://bucket/faces --split test --output s3://bucket/runs/r1/evaluation

--data takes the layouts jobs.train reads (an ImageFolder tree such as Kaggle's Train|Validation|Test/
WithMask|WithoutMask, or a path,label[,split] manifest) but needs no training split: a manifest of only the
photos to evaluate works (rows without a split are the one --split asked, unless that is train or val).
Unreadable images are error rows: counted and listed in the report, never dropped.

With face boxes for a split (--annotations COCO JSON or Pascal VOC XML; by default <data>/<split>.coco.json,
which the synthetic scene split has), each split also gets a detection section: detection recall and precision
at --iou, COCO AP, per-face and photo verdict accuracy, tables by variant and face size, and boxes_<split>.png
(faces found right / wrong, missed, false detections). Scored rows without face boxes say so instead.
"""

from __future__ import annotations

from maskmodel.runtime import cli
from maskmodel.config import parse_config
from maskmodel.io import storage
from maskmodel.study.detection_report import num as _num, summary
from maskmodel.study.evaluation import EvalConfig, evaluate


def _detection_lines(split: str, d: dict) -> list[str]:
    """The detection section of one split: headline numbers (as logged), then the table by variant (or class)."""
    if not d.get("available"):
        return [f"{split} faces: {d['reason']}"]
    lines = [f"{split} faces: {summary(d)}",
             f"  {d['breakdown_by']:<12} faces  found  recall  accuracy"]
    lines += [f"  {r[d['breakdown_by']]:<12} {r['faces']:>5}  {r['found']:>5}  {_num(r['recall']):>6}  "
              f"{_num(r['accuracy']):>8}" for r in d["by_group"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    config = parse_config(EvalConfig, argv, prog="python -m jobs.evaluate", description=__doc__)
    result = evaluate(config)
    for split, r in result.report["splits"].items():
        auc, ece = r["binary"]["roc_auc"], r["calibration"]["ece"]
        print(f"{split}: {r['images']} images, {r['errors']} errors, accuracy {r['accuracy']:.4f}, photo verdict "
              f"accuracy {_num(r['verdict']['accuracy'])}, ROC AUC {_num(auc)} (any alert class), ECE {_num(ece)}",
              flush=True)
        for line in _detection_lines(split, r["detection"]) if r["detection"]["annotations"] else ():
            print(line, flush=True)
    print(f"report: {storage.join(result.output, 'report.md')} (all numbers: {result.report_uri})")
    return 0


if __name__ == "__main__":
    cli.run(main)
