"""The built-in demo: synthetic data → training → scoring → a query summary, all local.

What ``make demo`` runs on a fresh machine (local Ray, local disk, no downloads)::

    python -m jobs.demo --out demo-output

It draws the synthetic face-mask dataset, trains from scratch at a small image size for a few
epochs (sized for a couple of CPU cores and a few minutes), scores the held-out ``test`` split and
the not-tightly-cropped ``scene`` split as two runs, and prints the per-run summary. Each step is
one of the real jobs; the commands to run them yourself are printed at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from maskmodel import cli
from maskmodel.config import field, parse_config, resolve_paths
from maskmodel.io import storage
from maskmodel.models.classifier import ARCHITECTURES

log = logging.getLogger("jobs.demo")

ACCURACY_SQL = """
SELECT run_id AS split, count(*) AS images,
       round(avg(CASE WHEN label = regexp_extract(path, '/(mask|no_mask)/[^/]+$', 1) THEN 1 ELSE 0 END), 3)
         AS accuracy
FROM predictions WHERE status = 'ok' GROUP BY run_id ORDER BY run_id DESC
"""


@dataclass(frozen=True)
class DemoConfig:
    out: str = field("demo-output", path=True, help="where the data, the trained model and the results go")
    n_per_class: int = field(300, help="synthetic training images per class")
    image_size: int = field(64, help="image edge in pixels for generation and training")
    epochs: int = field(6, help="training epochs")
    arch: str = field("resnet18", choices=ARCHITECTURES,
                      help="architecture; resnet18 because ResNet-50 without ImageNet weights needs far more "
                           "data and epochs than a 2-core demo allows")

    def __post_init__(self) -> None:
        resolve_paths(self)


def main(argv: list[str] | None = None) -> int:
    from maskmodel.data import synth
    from maskmodel.results import query
    from maskmodel.score import scoring
    from maskmodel.train import training

    cfg = parse_config(DemoConfig, argv, prog="python -m jobs.demo", description=__doc__)
    data, run, scores = (storage.join(cfg.out, p) for p in ("data", "train", "scores"))
    storage.check_writable(cfg.out)
    if not storage.exists(storage.join(data, "dataset.json")):
        synth.write_dataset(synth.DatasetConfig(out=data, n_per_class=cfg.n_per_class, image_size=cfg.image_size))
    trained = training.train(training.TrainConfig(
        data=data, output=run, arch=cfg.arch, weights="none", epochs=cfg.epochs, image_size=cfg.image_size,
        batch_size=32, torch_threads=2))
    for split in ("test", "scene"):
        res = scoring.score(scoring.ScoreConfig(input=storage.join(data, split), model=trained.model_dir,
                                                output=scores, run_id=split))
        print(f"{split}: {res.summary_line()}")
    print(query.format_table(query.summary(scores)))
    # The synthetic folders carry the true label, so the demo can show accuracy per split too.
    print(query.format_table(query.query(scores, ACCURACY_SQL)))
    print(f"\nbest val accuracy {trained.val_acc:.3f}; model {trained.model_dir}")
    print(f"curves, augmented samples, confusion matrix: {run}")
    print(f"try:  python -m jobs.query --results {scores} "
          f"\"SELECT run_id, label, count(*) FROM predictions GROUP BY ALL ORDER BY ALL\"")
    return 0


if __name__ == "__main__":
    cli.run(main)
