"""Draw the built-in synthetic face-mask dataset and write it to local disk or object storage.

Writes ``<out>/{train,val,test,scene,detect}/{mask,no_mask,mask_incorrect}/NNNNNN.jpg`` (``train``/``val``:
tight face crops; ``test``: faces cut from busy scenes as the face stage cuts a found face), ``variants.csv``,
``dataset.json``, ``scene.coco.json`` (the box, class and variant of every face of the
``scene`` pictures, which hold 0-4 faces each; see :mod:`maskmodel.data.synth`) and
``detect.coco.json`` (the same for ``detect``, the scenes ``jobs.train_detector`` learns from);
with ``--format webdataset``, tar shards ``<out>/<split>/<split>-NNNNNN.tar`` of
``--shard-size`` images each (``<class>/NNNNNN.jpg`` + ``.cls``), which
``jobs.score`` reads as they are. The same ``--seed`` writes byte-identical files.

Usage::

    python -m jobs.make_dataset --out ./data/faces
    python -m jobs.make_dataset --out ./data/faces --n-per-class 2000 --image-size 64 --seed 1 --overwrite
    python -m jobs.make_dataset --out ./data/faces-shards --format webdataset --shard-size 1000
    ray job submit --working-dir . -- python -m jobs.make_dataset --out s3://bucket/faces

A target that cannot be written (unknown scheme, missing bucket, no
credentials, read-only path) or that already holds a dataset (without
``--overwrite``) is reported in one line, with exit code 2, before any image is drawn.
"""

from __future__ import annotations

from typing import Sequence

from maskmodel.runtime import cli
from maskmodel.config import parse_config
from maskmodel.data import synth
from maskmodel.io import storage


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(synth.DatasetConfig, argv, prog="python -m jobs.make_dataset", description=__doc__)
    storage.check_writable(config.out)
    record = synth.write_dataset(config)
    print(f"wrote {record['total']} images ({record['image_size']} px, seed {record['seed']}) to {config.out}")
    for split, counts in record["splits"].items():
        per_class = ", ".join(f"{label} {n}" for label, n in counts.items())
        if split == "scene":  # several faces per picture: say what the faces are, and where their boxes are
            ann = record["scene_annotations"]
            faces = ", ".join(f"{c} {n}" for c, n in sorted(ann["faces"].items()))
            print(f"  {split:<6} {per_class}  ({record['scene_size']} px, folder = the picture's verdict; faces: "
                  f"{faces}; {ann['images_without_faces']} without a face; boxes: "
                  f"{storage.join(config.out, ann['file'])})")
            continue
        variants = ", ".join(f"{v} {n}" for v, n in sorted(record["variants"][split].items()))
        print(f"  {split:<6} {per_class}  ({variants})")
    print(f"parameters and counts: {storage.join(config.out, 'dataset.json')}")
    return 0


if __name__ == "__main__":
    cli.run(main)
