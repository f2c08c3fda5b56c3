"""A run's profile: what it found, folded batch by batch while scoring, stored in the run's own Delta commit.

Scoring folds every result batch into a :class:`RunProfile` on the driver as
the batch is written (the rows are never kept or re-read), and the finished
profile goes into the run's commit record (``commitInfo["maskmodel.run"]["profile"]``),
so the run and its profile become visible in the same single commit. Reports
and drift checks read profiles from the Delta log only, never the rows; the
``runs`` view of :mod:`maskmodel.results.query` exposes the main figures as
columns and the whole profile as JSON.

A profile is a plain JSON-safe dict of counts (see :func:`batch_profile` for
its keys); two partial profiles fold with :func:`merge` (counts add,
histograms add bin by bin), so the fold is the same whatever the batching.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from maskmodel.runtime.telemetry import error_kind

PROFILE_VERSION = 1
#: Confidence histograms have this many equal bins over [0, 1] (bin k holds k/N <= c < (k+1)/N; 1.0 is in the last).
CONFIDENCE_BINS = 20
#: ``faces_per_photo[k]`` counts photos with k faces; the last entry counts photos with this many or more.
MAX_FACES_BIN = 8
#: Image size bins by the longer side in pixels: ``sizes[k]`` counts photos with EDGES[k] <= side < EDGES[k+1].
SIZE_EDGES = (0, 256, 512, 1024, 2048, 4096)
#: Keys whose values add as numbers, dicts of numbers, or lists (histograms) when partial profiles fold.
_ADDITIVE = ("images", "ok", "errors", "error_reasons", "labels", "no_face", "alerts", "faces", "photos_with_faces",
             "faces_per_photo", "face_labels", "confidence", "confidence_sum", "sizes", "pixels", "bytes")


def empty_profile(alert_classes: Sequence[str] = ()) -> dict[str, Any]:
    """The profile of no rows (what a run with nothing to score commits)."""
    return {"profile_version": PROFILE_VERSION, "alert_classes": list(alert_classes),
            "confidence_bins": CONFIDENCE_BINS,
            "size_edges": list(SIZE_EDGES), "images": 0, "ok": 0, "errors": 0, "error_reasons": {}, "labels": {},
            "no_face": 0, "alerts": 0, "faces": 0, "photos_with_faces": 0, "faces_per_photo": [0] * (MAX_FACES_BIN + 1),
            "face_labels": {}, "confidence": {}, "confidence_sum": {}, "sizes": [0] * len(SIZE_EDGES),
            "pixels": 0, "bytes": 0}


def batch_profile(table: pa.Table, *, alert_classes: Sequence[str], detected: bool = True) -> dict[str, Any]:
    """The partial profile of one batch of result rows (columns of :data:`maskmodel.results.RESULTS_SCHEMA`).

    Keys (all counts are photos unless named otherwise):

    - ``images``, ``ok``, ``errors``; ``error_reasons``: ``{kind: n}`` (the reason before ``:``);
    - ``labels``: ``{label: n}`` of ok photos with a verdict; ``alerts``: those whose label is one of ``alert_classes``
      (the row's ``alert`` verdict);
      ``no_face``: ok photos in which the detector found no face (with ``--faces auto`` they still get a
      verdict, from the whole picture; with ``centerface`` or a detector they get none);
    - ``faces``: faces found in all; ``photos_with_faces``: ok photos that went through a detector (none when
      ``detected`` is false: a ``--faces none`` run, whose pictures are their own faces);
      ``faces_per_photo``: their histogram over 0..:data:`MAX_FACES_BIN` (last bin open); ``face_labels``:
      ``{label: faces}``;
    - ``confidence``: ``{label: [n per bin]}`` of the photos' confidence (the deciding face's, or the
      whole picture's), :data:`CONFIDENCE_BINS` fixed bins; ``confidence_sum``: ``{label: sum}`` for exact means;
    - ``sizes``: histogram of the longer side (pixels) over :data:`SIZE_EDGES`; ``pixels``: sum of
      width x height; ``bytes``: sum of object sizes (where known).
    """
    out = empty_profile(alert_classes)
    n = table.num_rows
    if not n:
        return out
    status = table.column("status")
    ok_mask = pc.fill_null(pc.equal(status, "ok"), False)
    n_ok = int(pc.sum(ok_mask).as_py() or 0)
    out.update(images=n, ok=n_ok, errors=n - n_ok)
    if n_ok < n:
        reasons = pc.filter(table.column("error"), pc.invert(ok_mask)).to_pylist()
        for r in reasons:
            kind = error_kind(r or "error")
            out["error_reasons"][kind] = out["error_reasons"].get(kind, 0) + 1
    ok = table.filter(ok_mask) if n_ok < n else table
    labels = ok.column("label")
    conf = np.asarray(pc.fill_null(ok.column("confidence"), 0.0).to_numpy(zero_copy_only=False), dtype=np.float64)
    for vc in pc.value_counts(labels).to_pylist():
        label = vc["values"]
        if label is None:
            continue
        out["labels"][label] = int(vc["counts"])
        c = conf[np.asarray(pc.fill_null(pc.equal(labels, label), False))]
        out["confidence"][label] = _bins(c)
        out["confidence_sum"][label] = float(c.sum())
    out["alerts"] = sum(out["labels"].get(c, 0) for c in alert_classes)
    if detected and "faces_found" in ok.column_names:
        found = ok.column("faces_found")
        k = np.asarray(found.drop_null().to_numpy(zero_copy_only=False), dtype=np.int64)
        out["photos_with_faces"] = int(len(k))
        out["faces"] = int(k.sum())
        out["faces_per_photo"] = np.bincount(np.minimum(k, MAX_FACES_BIN), minlength=MAX_FACES_BIN + 1).tolist()
        out["no_face"] = out["faces_per_photo"][0]
        if out["faces"] and "faces" in ok.column_names:
            face_labels = pc.struct_field(pc.list_flatten(ok.column("faces")), "label")
            out["face_labels"] = {vc["values"]: int(vc["counts"]) for vc in pc.value_counts(face_labels).to_pylist()
                                  if vc["values"] is not None}
    w, h = (np.asarray(pc.fill_null(ok.column(c), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
            for c in ("width", "height"))
    sized = (w > 0) & (h > 0)
    side = np.maximum(w, h)[sized]
    out["sizes"] = np.bincount(np.searchsorted(SIZE_EDGES, side, side="right") - 1,
                               minlength=len(SIZE_EDGES)).tolist()
    out["pixels"] = int((w * h)[sized].sum())
    out["bytes"] = int(pc.sum(table.column("size")).as_py() or 0)
    return out


def profile_alert_classes(profile: Mapping[str, Any]) -> list[str]:
    """The alert classes of a committed profile (one ``alert_class`` in profiles written before several could be)."""
    return list(profile.get("alert_classes") or ([profile["alert_class"]] if profile.get("alert_class") else []))


def _bins(conf: np.ndarray) -> list[int]:
    idx = np.clip((conf * CONFIDENCE_BINS).astype(np.int64), 0, CONFIDENCE_BINS - 1)
    return np.bincount(idx, minlength=CONFIDENCE_BINS).tolist()


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two partial profiles folded into one: counts and sums add, histograms add bin by bin, dicts key by key.

    Raises :class:`ValueError` when their bins differ (profiles of another version).
    """
    for key in ("confidence_bins", "size_edges"):
        if a.get(key) != b.get(key):
            raise ValueError(f"profiles with different {key} cannot be merged: {a.get(key)} vs {b.get(key)}")
    out = dict(a)
    for key in _ADDITIVE:
        out[key] = _add(a.get(key), b.get(key))
    out["alert_classes"] = a.get("alert_classes") or b.get("alert_classes") or []
    return out


def _add(x: Any, y: Any) -> Any:
    if x is None:
        return y
    if y is None:
        return x
    if isinstance(x, dict):
        return {k: _add(x.get(k), y.get(k)) for k in {**x, **y}}
    if isinstance(x, list):
        return [_add(p, q) for p, q in zip(x, y)]
    return x + y


class RunProfile:
    """The fold of a run's batches: :meth:`update` with each result batch, :meth:`finish` once at the end."""

    def __init__(self, *, alert_classes: Sequence[str], detected: bool = True) -> None:
        self.alert_classes, self.detected = tuple(alert_classes), detected
        self.profile = empty_profile(self.alert_classes)
        self.fold_s = 0.0  # the driver's seconds spent folding: what the profile costs the run

    def update(self, table: pa.Table) -> None:
        t0 = time.perf_counter()
        self.profile = merge(self.profile, batch_profile(table, alert_classes=self.alert_classes, detected=self.detected))
        self.fold_s += time.perf_counter() - t0

    def finish(self, *, elapsed_s: float, cost: Mapping[str, Any]) -> dict[str, Any]:
        """The profile with the run's elapsed seconds, images per second, ``cost`` inputs and ``fold_s`` (the
        seconds the fold itself took on the driver), JSON-safe."""
        p = self.profile
        return {**p, "elapsed_s": elapsed_s, "images_per_s": p["images"] / elapsed_s if elapsed_s > 0 else None,
                "cost": dict(cost), "fold_s": self.fold_s}


# ----------------------------------------------------------------------------- figures read from a profile

def figures(profile: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline figures of a profile (``None`` where undefined, e.g. a rate over no photos).

    ``error_rate`` = errors / images; ``verdict_rate`` = alerts / photos with a verdict (the photo-verdict alert
    rate); ``no_face_rate`` = photos with no face found / ok photos that went through a detector;
    ``mean_confidence`` over photos with a verdict;
    ``faces_per_photo`` over photos that went through a detector; ``images_per_s``; ``elapsed_s``.
    """
    labelled = sum(profile.get("labels", {}).values())
    conf_sum = sum(profile.get("confidence_sum", {}).values())
    return {
        "images": profile.get("images", 0),
        "error_rate": _ratio(profile.get("errors", 0), profile.get("images", 0)),
        "verdict_rate": _ratio(profile.get("alerts", 0), labelled),
        "no_face_rate": _ratio(profile.get("no_face", 0), profile.get("photos_with_faces", 0)),
        "mean_confidence": _ratio(conf_sum, labelled),
        "faces_per_photo": _ratio(profile.get("faces", 0), profile.get("photos_with_faces", 0)),
        "images_per_s": profile.get("images_per_s"),
        "elapsed_s": profile.get("elapsed_s"),
    }


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def confidence_histogram(profile: Mapping[str, Any], labels: Iterable[str] | None = None) -> np.ndarray:
    """The photo confidence histogram summed over ``labels`` (default: all), float64 ``(CONFIDENCE_BINS,)``."""
    hist = profile.get("confidence", {})
    keys = list(hist) if labels is None else [k for k in labels if k in hist]
    out = np.zeros(int(profile.get("confidence_bins", CONFIDENCE_BINS)))
    for k in keys:
        out += np.asarray(hist[k], dtype=np.float64)
    return out
