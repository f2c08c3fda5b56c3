"""Train the face-mask classifier with Ray Train.

Standalone (starts a local Ray instance)::

    python -m jobs.train --data s3://bucket/faces --output s3://bucket/runs/r1

On a cluster (uses RAY_ADDRESS; set RAY_AUTH_MODE=token when the cluster has token auth)::

    ray job submit --working-dir . -- \\
        python -m jobs.train --data s3://bucket/faces --output s3://bucket/runs/r1 --num-workers 8 --gpu

From annotated photos (a COCO .json, a Pascal VOC folder, a YOLO folder; faces cut as scoring cuts them)::

    python -m jobs.train --data ./data/faces/detect.coco.json --output ./runs/boxes \
        --class-map with_mask=mask,without_mask=no_mask

Re-running the same command with the same --output resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging

from maskmodel.runtime import cli
from maskmodel.config import parse_config
from maskmodel.train.config import TrainConfig

log = logging.getLogger("jobs.train")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(TrainConfig, argv, prog="python -m jobs.train", description=__doc__)
    from maskmodel.train.training import train  # after parsing: --help imports neither torch nor Ray

    out = train(config)
    log.info("best val accuracy %.4f at epoch %d of %d; model %s", out.val_acc, out.best_epoch, out.epochs_run,
             out.model_id)
    print(f"model directory: {out.model_dir}")
    print(f"metrics, curves.png, augmented_samples.png, report.json, confusion_matrix.png: {out.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
