"""Batch scoring with Ray Data: list, load, predict, write, commit.

Owns: the job's config and plan (:mod:`.plan`), the driver (:mod:`.scoring`: checks, incremental
keys, progress, the commit), the Ray Data pipeline (:mod:`.pipeline`), and the Ray-free steps it
wraps: the load step on CPUs (:mod:`.loading`) and the predict step on the model's device
(:mod:`.inference`), with its JPEG decoding on the GPU (:mod:`.gpu_decode`) and its face stage
(:mod:`.faces`: detector, face crops, the deciding face).

May import: :mod:`maskmodel.models`, :mod:`maskmodel.results`, :mod:`maskmodel.data`,
:mod:`maskmodel.io` and the shared pieces; never :mod:`maskmodel.train`. The load step is given the
keys to skip and never reads the results table itself.
"""
