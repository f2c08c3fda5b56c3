"""Rendering for the evaluation report and the ablation study: figures (PNG bytes) and Markdown.

Plots use matplotlib's Agg backend (no display); the contact sheet is drawn
with Pillow on a fixed grid so its size says exactly how many tiles it holds
(``columns * tile_width`` by ``rows * tile_height``) and each tile's border
colour says whether that prediction was right. Nothing here reads storage.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw, ImageFont, ImageOps  # noqa: E402

RIGHT_COLOR = (26, 152, 80)   # green border: prediction matches the folder label
WRONG_COLOR = (215, 48, 39)   # red border: misclassified
TILE = 112                    # image area of a contact-sheet tile, pixels
BORDER = 4
CAPTION = 28                  # two caption lines under each image


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _undefined(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)


def roc_pr_png(binary: dict[str, Any], *, positive: str, title: str = "") -> bytes:
    """ROC curve (with AUC) and precision-recall curve (with average precision) of ``positive``."""
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.2))
    roc.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    if binary.get("roc"):
        roc.plot(binary["roc"]["fpr"], binary["roc"]["tpr"], lw=2, label=f"AUC {binary['roc_auc']:.4f}")
        roc.legend(loc="lower right")
    else:
        _undefined(roc, "undefined: the split holds one class only")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
            title=f"ROC, positive = {positive}")
    if binary.get("pr"):
        base = binary["positives"] / max(1, binary["positives"] + binary["negatives"])
        pr.axhline(base, ls=":", color="grey", lw=1, label=f"chance {base:.2f}")
        # where="pre": precision P_k holds over (R_{k-1}, R_k], the step area that average precision sums.
        pr.step(binary["pr"]["recall"], binary["pr"]["precision"], where="pre", lw=2,
                label=f"AP {binary['average_precision']:.4f}")
        pr.legend(loc="lower left")
    else:
        _undefined(pr, f"undefined: no {positive} images in the split")
    pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title=f"Precision-recall, {positive}")
    for ax in (roc, pr):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _png(fig)


def reliability_png(cal: dict[str, Any], *, title: str = "") -> bytes:
    """Reliability diagram: accuracy against mean confidence per bin, the diagonal, and the bin counts."""
    bins = cal["bins"]
    width = 1.0 / cal["n_bins"]
    centers = [(b["lower"] + b["upper"]) / 2 for b in bins]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect calibration")
    top.bar(centers, [b["accuracy"] or 0.0 for b in bins], width=width * 0.9, color="#4575b4", alpha=0.8,
            label="accuracy")
    filled = [b for b in bins if b["count"]]
    top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="#d73027", ms=4,
             label="(mean confidence, accuracy)")
    ece = "n/a" if cal["ece"] is None else f"{cal['ece']:.4f}"
    top.set(ylabel="accuracy", ylim=(0, 1.01), title=f"{title + ': ' if title else ''}reliability, ECE {ece}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, [b["count"] for b in bins], width=width * 0.9, color="grey")
    bottom.set(xlabel="confidence (top-label probability)", ylabel="images", xlim=(0, 1))
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return _png(fig)


def contact_sheet_png(images: Sequence[Image.Image], captions: Sequence[tuple[str, str]], correct: Sequence[bool],
                      *, cols: int = 8) -> tuple[bytes, dict[str, Any]]:
    """A grid of one tile per image, in the given order, and its layout.

    Each tile is the image scaled to fit ``TILE`` pixels, over two caption lines,
    framed by a ``BORDER``-pixel border in :data:`RIGHT_COLOR` or
    :data:`WRONG_COLOR`. The PNG is exactly ``columns * tile_width`` by
    ``rows * tile_height`` pixels, as the returned layout says.
    """
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    tw, th = TILE + 2 * BORDER, TILE + CAPTION + 2 * BORDER
    sheet = Image.new("RGB", (cols * tw, rows * th), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (img, (line1, line2), ok) in enumerate(zip(images, captions, correct)):
        x, y = (k % cols) * tw, (k // cols) * th
        draw.rectangle([x, y, x + tw - 1, y + th - 1], outline=RIGHT_COLOR if ok else WRONG_COLOR, width=BORDER)
        thumb = ImageOps.contain(img.convert("RGB"), (TILE, TILE))  # small images are enlarged to the tile
        sheet.paste(thumb, (x + BORDER + (TILE - thumb.width) // 2, y + BORDER + (TILE - thumb.height) // 2))
        draw.text((x + BORDER + 2, y + BORDER + TILE + 1), line1, fill=(0, 0, 0), font=font)
        draw.text((x + BORDER + 2, y + BORDER + TILE + 14), line2, fill=(90, 90, 90), font=font)
    if not n:
        draw.text((BORDER, BORDER), "no scored images", fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue(), {"tiles": n, "columns": cols if n else 0, "rows": rows if n else 0,
                            "tile_width": tw, "tile_height": th, "width": sheet.width, "height": sheet.height,
                            "border": BORDER}


def ablation_curves_png(curves: Sequence[tuple[str, Sequence[dict], bool]]) -> bytes:
    """Val loss and val accuracy per epoch of every trial on shared axes; failed trials dashed."""
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(12, 4.4), sharex=True)
    for label, history, failed in curves:
        epochs = [int(h["epoch"]) + 1 for h in history]
        style = dict(marker="o", ms=3, ls="--" if failed else "-", label=label + (" (failed)" if failed else ""))
        loss.plot(epochs, [h["val_loss"] for h in history], **style)
        acc.plot(epochs, [h["val_acc"] for h in history], **style)
    loss.set(title="Val loss", xlabel="epoch", ylabel="cross-entropy")
    acc.set(title="Val accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (loss, acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _f(v: Any, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the evaluation report's numbers and figures, per split, tied to the model id and data URI."""
    out = [f"# Evaluation of model `{report['model_id']}`", "",
           f"- model: `{report['model']}`", f"- data: `{report['data']}`",
           f"- classes: {', '.join(report['classes'])}; alert (positive) class: `{report['positive_class']}`",
           f"- scoring results (committed runs, one per split): `{report['scores']}`",
           "- every number is computed from the committed scoring rows joined to the folder labels by path; "
           "all numbers are also in `report.json`", ""]
    for split, r in report["splits"].items():
        b, cal = r["binary"], r["calibration"]
        out += [f"## Split `{split}`", "",
                f"{r['images']} labelled images: {r['scored']} scored, **{r['errors']} error rows** "
                f"(counted as wrong in *accuracy, all images*).", "",
                "| metric | value |", "|---|---|",
                f"| accuracy (scored images) | {_f(r['accuracy'])} |",
                f"| accuracy, all images | {_f(r['accuracy_all_images'])} |",
                f"| macro F1 | {_f(r['macro_f1'])} |",
                f"| ROC AUC ({report['positive_class']}) | {_f(b['roc_auc'])} |",
                f"| average precision ({report['positive_class']}) | {_f(b['average_precision'])} |",
                f"| expected calibration error ({cal['n_bins']} bins) | {_f(cal['ece'])} |",
                f"| max calibration error | {_f(cal['mce'])} |", "",
                "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        out += [f"| {c} | {_f(m['precision'])} | {_f(m['recall'])} | {_f(m['f1'])} | {m['support']} |"
                for c, m in r["per_class"].items()]
        out += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                "| true \\ predicted | " + " | ".join(r["classes"]) + " |", "|---" * (len(r["classes"]) + 1) + "|"]
        out += [f"| {c} | " + " | ".join(str(v) for v in row) + " |"
                for c, row in zip(r["classes"], r["confusion_matrix"])]
        out += ["", f"Alert threshold table: an image is flagged as `{report['positive_class']}` when its "
                f"probability is at least the threshold.", "",
                "| threshold | flagged | TP | FP | FN | precision | recall |", "|---|---|---|---|---|---|---|"]
        out += [f"| {t['threshold']:.2f} | {t['flagged']} | {t['tp']} | {t['fp']} | {t['fn']} | "
                f"{_f(t['precision'])} | {_f(t['recall'])} |" for t in b["thresholds"]]
        sheet = r["contact_sheet"]
        out += ["", f"![confusion matrix](confusion_matrix_{split}.png) ![ROC and PR](roc_pr_{split}.png)",
                f"![reliability diagram](reliability_{split}.png)", "",
                f"Contact sheet: {sheet['tiles']} images, the {sheet['misclassified']} misclassified ones first "
                f"(red border; green = right), captions *predicted label, confidence / true label*:", "",
                f"![contact sheet](contact_sheet_{split}.png)", ""]
        if r["error_rows"]:
            out += ["Error rows (not scored):", ""]
            out += [f"- `{e['path']}`: {e['error']}" for e in r["error_rows"][:20]]
            if len(r["error_rows"]) > 20:
                out.append(f"- … and {len(r['error_rows']) - 20} more (all in `report.json`)")
            out.append("")
    return "\n".join(out)
