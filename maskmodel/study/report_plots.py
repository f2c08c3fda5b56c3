"""The run report's pictures: figures over the last runs, the confidence histogram against the baseline, and
contact sheets of faces cut from the source photos. PNG bytes out; only :func:`face_sheet` reads storage."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from maskmodel.io import storage
from maskmodel.io.decode import decode_image
from maskmodel.models.detect.geometry import grow
from maskmodel.results import profile as prof
from maskmodel.study import eval_reports
from maskmodel.reports import figure_png, plt

log = logging.getLogger(__name__)

RUN_COLOR, BASE_COLOR, OTHER_COLOR = "#d73027", "#4575b4", "#999999"
#: Face crops on the sheets grow by this share of the box on each side, as the classifier's crops do by default.
SHEET_MARGIN = 0.25


def history_png(runs: Sequence[tuple[str, Mapping[str, Any]]], *, run_id: str, baseline: Sequence[str]) -> bytes:
    """Verdict rate, error rate and mean confidence of ``runs`` (``(run_id, figures)``, oldest first), one panel
    each; the reported run in red, its baseline in blue. Undefined values are gaps."""
    keys = (("verdict_rate", "alert (verdict) rate"), ("error_rate", "error rate"),
            ("mean_confidence", "mean confidence"))
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 6.6), sharex=True)
    x = np.arange(len(runs))
    colors = [RUN_COLOR if r == run_id else BASE_COLOR if r in baseline else OTHER_COLOR for r, _ in runs]
    for ax, (key, title) in zip(axes, keys):
        y = np.array([np.nan if f.get(key) is None else f[key] for _, f in runs], dtype=float)
        ax.plot(x, y, "-", color="#cccccc", lw=1.2, zorder=1)
        ax.scatter(x, y, c=colors, s=28, zorder=2)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    step = max(1, len(runs) // 12)
    axes[-1].set_xticks(x[::step], [r for r, _ in runs][::step], rotation=30, ha="right", fontsize=8)
    axes[0].set_title(f"last {len(runs)} runs (red: {run_id}; blue: baseline)")
    return figure_png(fig)


def confidence_png(run: Mapping[str, Any], baseline: Mapping[str, Any] | None, *, run_id: str,
                   psi: float | None, ks: float | None = None) -> bytes:
    """The run's photo confidence histogram (share of photos per fixed bin) against the pooled baseline's."""
    n = int(run.get("confidence_bins", prof.CONFIDENCE_BINS))
    edges = np.linspace(0, 1, n + 1)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for p, name, color in ((baseline, "baseline", BASE_COLOR), (run, run_id, RUN_COLOR)):
        if not p:
            continue
        h = prof.confidence_histogram(p)
        if h.sum():
            ax.stairs(h / h.sum(), edges, label=name, color=color, lw=2, fill=name == "baseline", alpha=0.35
                      if name == "baseline" else 1.0)
    ax.set(xlabel="confidence of the photo's verdict", ylabel="share of photos", xlim=(0, 1),
           title="confidence" + (f" against the baseline: PSI {psi:.3f}, KS {ks:.3f}" if psi is not None and
                                  ks is not None else ""))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left")
    return figure_png(fig)


def cut_face(image: Image.Image, box: Sequence[float] | None, margin: float = SHEET_MARGIN) -> Image.Image:
    """The face ``box`` (x0, y0, x1, y1 in the decoded photo's pixels) grown by ``margin``, clipped; the whole
    photo for ``None`` (runs without a detector)."""
    if box is None:
        return image
    x0, y0, x1, y1 = grow(torch.tensor([box], dtype=torch.float32), margin)[0].tolist()
    w, h = image.size
    x0, y0, x1, y1 = max(0, int(x0)), max(0, int(y0)), min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


def face_sheet(faces: Sequence[Mapping[str, Any]], *, alert_classes: Sequence[str], cols: int = 8) -> tuple[bytes, dict]:
    """A contact sheet of ``faces`` (dicts: ``path``, ``box`` or ``None``, ``label``, ``confidence``), each cut
    from its photo read now; an alert face gets a red border. A photo that cannot be read or decoded any more
    is left out (counted in the layout's ``unreadable``)."""
    images, captions, calm, cache, unreadable = [], [], [], {}, 0
    for f in faces:
        path = f["path"]
        if path not in cache:
            try:
                cache[path] = decode_image(storage.read_bytes(path))
            except Exception as e:  # noqa: BLE001 - a photo gone or changed since scoring is not the report's end
                log.warning("left %s off the contact sheet: %s", path, str(e).splitlines()[0] if str(e) else e)
                cache[path] = None
        if cache[path] is None:
            unreadable += 1
            continue
        images.append(cut_face(cache[path], f.get("box")))
        captions.append((f"{f['label']} {f['confidence']:.2f}", path.rsplit("/", 1)[-1][-18:]))
        calm.append(f["label"] not in alert_classes)
    png, layout = eval_reports.contact_sheet_png(images, captions, calm, cols=cols)
    layout["unreadable"] = unreadable
    return png, layout
