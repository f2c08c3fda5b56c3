"""Training with Ray Train: the job's driver, the per-worker loop and what a run writes.

Owns: the jobs' configs (:mod:`.config`, torch- and Ray-free), the training job (:mod:`.training`:
checks, Ray Train set-up, resume, export; :mod:`.detection` for the face detector), the one engine each
worker runs (:mod:`.engine`: epochs, resume, checkpoints, watchdog, metrics) with what each model adds
to it (:mod:`.loop` the classifier's step, :mod:`.detect_loop` the detector's), the run's outputs
(:mod:`.outputs`: metrics.csv, curves, sample grid, checkpoints) and exact sharding of validation data (:mod:`.sharding`).

May import: :mod:`maskmodel.models`, :mod:`maskmodel.results`, :mod:`maskmodel.data`,
:mod:`maskmodel.io` and the shared pieces; never :mod:`maskmodel.score` (what both need lives lower).
"""
