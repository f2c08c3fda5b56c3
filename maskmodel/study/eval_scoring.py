"""Scoring a labelled split for ``jobs.evaluate``: its manifest, the scoring job's config, the rows joined back.

Evaluation runs no inference path of its own: it writes the split's labelled
images as a Parquet manifest, scores it with the scoring job (face options
passed through when scoring has them) and joins the committed rows to the
labels by path.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from maskmodel.errors import UserError
from maskmodel.io import storage

if TYPE_CHECKING:
    from maskmodel.score.plan import ScoreConfig


def manifest_paths(items) -> list[str]:
    """The ``path`` column of ``items``' manifest: absolute URIs, so that a manifest on object storage does not
    resolve local paths against its own folder."""
    return [it.uri if "://" in it.uri else "file://" + os.path.abspath(it.uri) for it in items]


def scored_paths(items) -> list[str]:
    """The ``path`` each of ``items`` will have in the committed rows (what the manifest's reader makes of
    :func:`manifest_paths`; absolute, so no folder is needed)."""
    from maskmodel.io.paths import resolve_entry

    return [resolve_entry("", p) for p in manifest_paths(items)]


def write_manifest(uri: str, items, classes: Sequence[str]) -> list[str]:
    """Write the Parquet manifest of ``items``; returns its ``path`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = manifest_paths(items)
    buf = io.BytesIO()
    pq.write_table(pa.table({"path": paths, "label": [classes[it.label] for it in items],
                             "split": [it.split for it in items]}), buf)
    storage.write_bytes(uri, buf.getvalue())
    return paths


def score_config(cfg: Any, manifest: str, scores: str, split: str) -> ScoreConfig:
    """The scoring job's config for one split of ``cfg`` (an ``EvalConfig``); the face options (``faces``,
    ``detector_weights``) pass through when ``ScoreConfig`` has those fields.

    Raises :class:`UserError` when a face option other than the default is asked of a scoring job
    without a face stage.
    """
    import dataclasses

    from maskmodel.score.plan import ScoreConfig

    kwargs: dict[str, Any] = dict(input=manifest, model=cfg.model, output=scores, run_id=split, num_gpus=cfg.num_gpus)
    known = {f.name for f in dataclasses.fields(ScoreConfig)}
    for name, default in (("faces", "auto"), ("detector_weights", "")):
        if name in known:
            kwargs[name] = getattr(cfg, name)
        elif getattr(cfg, name) != default:
            raise UserError(f"--{name.replace('_', '-')} needs scoring with a face stage, which this install's "
                            f"jobs.score does not have; leave it at its default.")
    return ScoreConfig(**kwargs)


def join_rows(table, truth: dict[str, int], classes: Sequence[str], alert_classes: Sequence[str]) -> dict[str, Any]:
    """Join committed result rows to ``truth`` (path -> class index), in ``truth``'s order.

    Returns arrays ``paths, truth, ok, pred, probs, confidence`` and ``errors``
    (``[{"path", "error"}]``). A labelled image without a committed row counts
    as an error (``missing: no committed result row``); it is never dropped. An ``ok`` row without a
    label (the face stage found no face and no whole-image fallback ran) is the verdict "no alert": it
    counts as the compliant class (the one class not in ``alert_classes``), with probability 1 for it.
    """
    from maskmodel.results import prob_column

    compliant = next(i for i, c in enumerate(classes) if c not in alert_classes)

    rows = {p: i for i, p in enumerate(table.column("path").to_pylist())}
    status, error, label = (table.column(c).to_pylist() for c in ("status", "error", "label"))
    pcols = [table.column(prob_column(c)).to_pylist() for c in classes]
    n = len(truth)
    ok, pred, probs = np.zeros(n, bool), np.full(n, -1), np.zeros((n, len(classes)))
    errors = []
    for k, path in enumerate(truth):
        i = rows.get(path)
        if i is None or status[i] != "ok":
            errors.append({"path": path, "error": "missing: no committed result row" if i is None else error[i]})
            continue
        if label[i] is None:  # no face found: no alert
            ok[k], pred[k] = True, compliant
            probs[k, compliant] = 1.0
            continue
        ok[k], pred[k] = True, classes.index(label[i])
        probs[k] = [col[i] for col in pcols]
    return {"paths": list(truth), "truth": np.array(list(truth.values()), int), "ok": ok, "pred": pred,
            "probs": probs, "errors": errors}
