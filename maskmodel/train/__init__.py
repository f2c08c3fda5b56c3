"""Training with Ray Train: the job's driver, the per-worker loop and what a run writes.

Owns: the training job (:mod:`.training`: checks, Ray Train set-up, resume, export), the loop each
worker runs (:mod:`.loop`), the run's outputs (:mod:`.outputs`: metrics.csv, curves, sample grid,
checkpoints) and exact sharding of validation data (:mod:`.sharding`).

May import: :mod:`maskmodel.models`, :mod:`maskmodel.results`, :mod:`maskmodel.data`,
:mod:`maskmodel.io` and the shared pieces; never :mod:`maskmodel.score` (what both need lives lower).
"""
