"""What a training run leaves behind, shared by the workers' loop and the driver: files and checkpoint state.

Below both :mod:`maskmodel.train.loop` (rank 0 refreshes the curves every
epoch and saves checkpoints) and :mod:`maskmodel.train.training` (the driver checks
a run it resumes and exports the model), so neither imports the other.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from typing import Any, Sequence

from maskmodel import reports
from maskmodel.errors import UserError
from maskmodel.io import storage

STATE_FILE = "state.pt"  # model, optimizer, scheduler, history: what a resumed run continues from
META_FILE = "meta.json"  # what the run was (architecture, classes, input size): checked before resuming
CHECKPOINTS = ("checkpoints", "train")  # under --output: Ray Train's storage path and the fixed run name
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s",
                  "epoch_seconds", "train_images", "val_images", "skipped_train", "skipped_val", "attempt")


def metrics_csv(history: list[dict[str, Any]], columns: Sequence[str] = METRIC_COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow(row)
    return buf.getvalue()


def write_epoch_outputs(output: str, history: list[dict[str, Any]], *, columns: Sequence[str] = METRIC_COLUMNS,
                        panels: Sequence[tuple[str, str]] = reports.CLASSIFIER_PANELS) -> None:
    """Refresh ``metrics.csv`` (``columns``) and ``curves.png`` (``panels``) so a running job can be watched."""
    storage.write_text(storage.join(output, "metrics.csv"), metrics_csv(history, columns))
    storage.write_bytes(storage.join(output, "curves.png"), reports.curves_png(history, panels))


def write_samples_grid(output: str, images, labels, classes: Sequence[str], *, mean: Sequence[float],
                       std: Sequence[float]) -> None:
    """``augmented_samples.png``: the first training batch exactly as the model saw it, de-normalised."""
    from maskmodel.data.transforms import denormalize

    n = min(32, images.shape[0])
    pics = denormalize(images[:n].detach().float().cpu(), mean=mean, std=std).permute(0, 2, 3, 1).numpy()
    titles = [classes[int(i)] for i in labels[:n].cpu()]
    storage.write_bytes(storage.join(output, "augmented_samples.png"),
                        reports.image_grid_png(pics, titles, suptitle="First training batch after augmentation"))


def write_boxes_grid(output: str, images, boxes, counts, *, limit: int = 16) -> None:
    """``augmented_samples.png`` for a detector: the first training batch as the model saw it, boxes drawn.

    ``images`` uint8 ``(N, 3, S, S)``, ``boxes`` float ``(N, B, 4)`` in its pixels, ``counts`` int ``(N,)``.
    """
    n = min(limit, int(images.shape[0]))
    if not n:
        return
    pics = images[:n].detach().cpu().permute(0, 2, 3, 1).numpy()
    drawn = [reports.draw_boxes(p, b[:int(c)].detach().cpu().numpy(), color=(0, 200, 0))
             for p, b, c in zip(pics, boxes[:n], counts[:n])]
    import numpy as np

    storage.write_bytes(storage.join(output, "augmented_samples.png"), reports.image_grid_png(
        np.stack(drawn), [f"{int(c)} face(s)" for c in counts[:n]], cols=4,
        suptitle="First training batch after augmentation, with its boxes"))


def run_meta(arch: str, classes: Sequence[str], image_size: int) -> dict[str, Any]:
    """The part of a run a checkpoint can only be resumed with (saved as :data:`META_FILE` in every checkpoint)."""
    return {"arch": arch, "classes": list(classes), "image_size": int(image_size)}


def latest_checkpoint_meta(output: str) -> dict[str, Any] | None:
    """The :data:`META_FILE` of the newest checkpoint under ``output``, or ``None`` when there is none."""
    root = storage.join(output, *CHECKPOINTS)
    epochs = sorted((n for n in storage.listdir(root) if re.fullmatch(r"epoch_\d+", n)), reverse=True)
    for name in epochs:
        uri = storage.join(root, name, META_FILE)
        if storage.exists(uri):
            return storage.read_json(uri)
    return None


def check_resumable(output: str, meta: dict[str, Any]) -> None:
    """Refuse, in one sentence, to resume a checkpoint of a different architecture, classes or input size."""
    found = latest_checkpoint_meta(output)
    if found is None:
        return
    diff = [f"{k} {found.get(k)!r} (this run: {meta[k]!r})" for k in meta if found.get(k) != meta[k]]
    if diff:
        where = posixpath.join(output, *CHECKPOINTS)
        raise UserError(f"{where} holds checkpoints of another run ({'; '.join(diff)}); resume it with the same "
                        f"settings, or write this run to a new --output.")


def train_alert_classes(classes: Sequence[str], compliant: str) -> tuple[str, ...]:
    """The alert classes a model trained on ``classes`` gets: every class but ``compliant`` (``--compliant-class``;
    empty: :func:`maskmodel.alert.compliant_class`'s rule). Raises :class:`UserError` for a class not in the data."""
    from maskmodel.alert import alert_classes

    try:
        return alert_classes(classes, compliant)
    except ValueError as e:
        raise UserError(f"--compliant-class {compliant!r} is not a class of the training data (classes: "
                        f"{', '.join(classes)}); name one of them.") from e
