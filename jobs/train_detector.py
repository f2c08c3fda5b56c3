"""Train a face detector with Ray Train, from photos with annotated face boxes (COCO JSON or Pascal VOC XML).

Standalone (starts a local Ray instance), on the synthetic scenes of jobs.make_dataset::

    python -m jobs.train_detector --data demo-data --output runs/det1 --weights none

On a cluster (uses RAY_ADDRESS)::

    ray job submit --working-dir . -- python -m jobs.train_detector --data s3://bucket/faces/train.coco.json \\
        --val-data s3://bucket/faces/val.coco.json --output s3://bucket/runs/det1 \\
        --arch fasterrcnn_resnet50_fpn --num-workers 8 --gpu

Every class of the files is a face unless --class-map drops it (name=-). Re-running the same command with the same
--output resumes from the latest checkpoint. The detector directory, <output>/detector, is what
`jobs.score --faces <output>/detector` reads.
"""

from __future__ import annotations

import logging

from maskmodel.runtime import cli
from maskmodel.config import parse_config
from maskmodel.train.config import DetectTrainConfig

log = logging.getLogger("jobs.train_detector")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(DetectTrainConfig, argv, prog="python -m jobs.train_detector", description=__doc__)
    from maskmodel.train.detection import train_detector  # after parsing: --help imports neither torch nor Ray

    out = train_detector(config)
    m = out.metrics
    log.info("best val AP50 %.3f at epoch %d of %d (COCO AP %.3f, recall %.3f, precision %.3f at %.2f); detector %s",
             m["val_ap50"], m["epoch"], out.epochs_run, m["val_ap"], m["val_recall"], m["val_precision"],
             config.score_threshold, out.model_id)
    if out.before_training:  # did fine-tuning help? the initial weights' figures on the same photos
        b = out.before_training
        log.info("before training (epoch 0): val AP50 %.3f (COCO AP %.3f, recall %.3f, precision %.3f at %.2f)",
                 b["val_ap50"], b["val_ap"], b["val_recall"], b["val_precision"], config.score_threshold)
    print(f"detector directory: {out.model_dir}")
    print(f"metrics.csv, curves.png, augmented_samples.png, detections.png, report.json: {out.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
