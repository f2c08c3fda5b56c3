"""Training and evaluation data: finding it, drawing it, and turning images into tensors.

Owns: ImageFolder trees and manifests, splits and the training reads (:mod:`.discovery`), box
annotations in COCO JSON and Pascal VOC XML (:mod:`.annotations`), the synthetic face-mask data
(:mod:`.drawing` draws faces, masks and occluders; :mod:`.synth` writes the dataset; :mod:`.scenes`
composes photos of 0-4 faces with boxes), crops and normalisation (:mod:`.transforms`) and the
device-side augmentation (:mod:`.augment`, occlusion included), Label Studio's task and export formats
(:mod:`.labelstudio`) and the hashes of label files a model card records (:mod:`.lineage`).

May import: :mod:`maskmodel.io` and the shared pieces; no model, results table, Ray job or study.
"""
