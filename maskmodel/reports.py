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


def figure_png(fig) -> bytes:
    """``fig`` rendered to PNG bytes (110 dpi, tight) and closed; every plot of the product goes through here."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


#: The classifier's curves, as in the original report: (history key, panel title).
CLASSIFIER_PANELS = (("train_loss", "Train loss"), ("train_acc", "Train accuracy"),
                     ("val_loss", "Val loss"), ("val_acc", "Val accuracy"))


def curves_png(history: Sequence[dict], panels: Sequence[tuple[str, str]] = CLASSIFIER_PANELS) -> bytes:
    """One panel per ``(history key, title)`` of ``panels`` against the epoch; keys ending in ``acc``, ``ap``,
    ``ap50``, ``recall`` or ``precision`` are shares (y axis up to 1)."""
    epochs = [h["epoch"] for h in history]  # counted from 1 (a detector's epoch 0: before training)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    axes = axes[0]
    for ax, (key, title) in zip(axes, panels):
        ax.plot(epochs, [np.nan if h[key] is None else h[key] for h in history], marker="o", ms=3)  # None: a gap
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key.endswith("acc"):
            ax.set_ylim(min(0.4, min(h[key] for h in history if h[key] is not None) - 0.02), 1.005)
        elif key.endswith(("ap", "ap50", "recall", "precision")):
            ax.set_ylim(-0.02, 1.02)
    return figure_png(fig)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, *, color: tuple[int, int, int],
               labels: Sequence[str] | None = None, width: int = 2) -> np.ndarray:
    """A copy of uint8 ``(H, W, 3)`` ``image`` with ``(K, 4)`` ``x0, y0, x1, y1`` pixel boxes outlined (and labelled)."""
    from PIL import Image, ImageDraw

    pic = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    draw = ImageDraw.Draw(pic)
    for k, b in enumerate(np.asarray(boxes, np.float32).reshape(-1, 4)):
        draw.rectangle([float(v) for v in b], outline=color, width=width)
        if labels is not None:
            draw.text((float(b[0]) + 2, float(b[1]) + 1), labels[k], fill=color)
    return np.asarray(pic)


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
    return figure_png(fig)


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
    return figure_png(fig)
