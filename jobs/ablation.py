"""The ablation study: learning rate x augmentation (and any extra factor) as parallel Ray Tune trials.

Each trial is a full Ray Train run (the training job's own trainer, metrics forwarded to Tune), and each
trained model is then scored on the data's `scene` split (faces not tightly cropped) through the scoring
pipeline. Writes ablation.csv, ablation.md (one row per configuration: final val accuracy, scene accuracy,
best epoch, first epoch with train accuracy > 99.9 %; failed trials as failed rows), ablation_curves.png,
ablation.json and trials/<trial>/ (each trial's model, curves and scene report)::

    python -m jobs.ablation --data ./data/faces --output ./runs/ablation           # the original 2x2 study
    python -m jobs.ablation --data ./data/faces --output ./runs/ablation-small --arch resnet18 --weights none \\
        --epochs 4 --image-size 64 --batch-size 32 --cpus-per-worker 0.45           # sized for 2 CPU cores
    python -m jobs.ablation --data ./data/faces --output ./runs/ablation-w --weights imagenet none \\
        --lrs 0.01 0.005 0.001 --augment on                                         # a different grid

On a cluster, one GPU per trial (set RAY_AUTH_MODE=token when the cluster has token auth)::

    ray job submit --working-dir . -- python -m jobs.ablation --data s3://bucket/faces \\
        --output s3://bucket/ablation --gpu --cpus-per-worker 4
"""

from __future__ import annotations

from maskmodel.runtime import cli
from maskmodel.config import parse_config
from maskmodel.io import storage
from maskmodel.study.ablation import AblationConfig, run_ablation


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def main(argv: list[str] | None = None) -> int:
    config = parse_config(AblationConfig, argv, prog="python -m jobs.ablation", description=__doc__)
    result = run_ablation(config)
    for r in result.rows:
        print(f"{r['trial']:<28} {r['status']:<6} final val acc {_pct(r['final_val_acc']):>9}  "
              f"{config.scene_split} acc {_pct(r['scene_acc']):>9}", flush=True)
    print(f"{len(result.rows)} trial(s) in {result.elapsed_s / 60:.1f} min; "
          f"table: {storage.join(result.output, 'ablation.md')} (and ablation.csv, ablation_curves.png)")
    return 0


if __name__ == "__main__":
    cli.run(main)
