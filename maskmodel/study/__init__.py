"""The study on top of training and scoring: evaluation reports and the ablation grid.

Owns: ``jobs.evaluate`` (:mod:`.evaluation`: metrics, thresholds, calibration, contact sheets;
:mod:`.eval_scoring`: scoring a split and joining the rows back; :mod:`.detection_report`: face boxes
against annotations; :mod:`.eval_reports`: its plots, sheets and Markdown) and ``jobs.ablation``
(:mod:`.ablation`: a Ray Tune grid of training runs, each scored on the scene split) and ``jobs.report``
(:mod:`.run_report`: a committed run against its baseline, from run profiles; :mod:`.report_plots`: its plots and
face contact sheets) and ``jobs.review`` (:mod:`.review`: the faces a model doubts exported for reviewers;
:mod:`.review_import`: their corrections back as a COCO annotation set; :mod:`.loop_demo`: the loop end to end).

May import: every layer below (train, score, models, results, data, io, shared); only ``jobs`` imports it.
"""
