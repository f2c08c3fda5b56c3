"""Plots a practitioner expects after training: curves, augmented samples, confusion matrix.

Each function renders to PNG bytes (matplotlib's Agg backend, no display) so
the caller can write them to any storage through :mod:`maskmodel.io.storage`.
"""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_png(history: Sequence[dict]) -> bytes:
    """Four panels, as in the original report: train loss, train accuracy, val loss, val accuracy per epoch."""
    epochs = [h["epoch"] + 1 for h in history]
    panels = [("train_loss", "Train loss"), ("train_acc", "Train accuracy"),
              ("val_loss", "Val loss"), ("val_acc", "Val accuracy")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(epochs, [h[key] for h in history], marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key.endswith("acc"):
            ax.set_ylim(min(0.4, min(h[key] for h in history) - 0.02), 1.005)
    return _png(fig)


def image_grid_png(images: np.ndarray, titles: Sequence[str], *, cols: int = 8,
                   colors: Sequence[str] | None = None, suptitle: str = "") -> bytes:
    """A grid of ``images`` (N, H, W, 3) floats in [0, 1] or uint8, one title each."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i])
            ax.set_title(titles[i], fontsize=8, color=(colors[i] if colors else "black"))
    if suptitle:
        fig.suptitle(suptitle)
    return _png(fig)


def confusion_matrix_png(cm: np.ndarray, classes: Sequence[str], *, title: str = "Confusion matrix") -> bytes:
    """The confusion matrix with counts in each cell; rows are true classes."""
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.4 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if top and cm[i, j] > top / 2 else "black")
    return _png(fig)
