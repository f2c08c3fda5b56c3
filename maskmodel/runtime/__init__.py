"""The Ray runtime around the jobs: everything that starts, joins, watches or stops Ray.

Owns: how a job runs from the command line (:mod:`.cli`: logging set up once, a user error as one
sentence and exit code 2, Ray stopped when the work is done), Ray started or joined quietly
(:mod:`.raysession`), every use of Ray's private API behind one module (:mod:`.rayshim`), CPUs and GPUs
a job may reserve (:mod:`.resources`), Ray metrics published by training and scoring (:mod:`.telemetry`),
the start-up timeline of a run (:mod:`.timeline`) and the test-only pause points (:mod:`.testhooks`).

May import: :mod:`maskmodel.io` (the pause points read their markers through storage) and the shared
pieces at the top of ``maskmodel``; nothing of data, models, results, train, score or study.
"""
