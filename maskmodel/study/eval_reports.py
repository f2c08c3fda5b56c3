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
from maskmodel.reports import figure_png  # noqa: E402

RIGHT_COLOR = (26, 152, 80)   # green border: prediction matches the folder label
WRONG_COLOR = (215, 48, 39)   # red border: misclassified
TILE = 112                    # image area of a contact-sheet tile, pixels
BORDER = 4
CAPTION = 28                  # two caption lines under each image
# Face boxes on the boxed sheet (detection_report.FACE_KINDS): colours apart for colour-blind readers too.
BOX_COLORS = {"right": RIGHT_COLOR, "wrong": WRONG_COLOR, "missed": (254, 196, 79), "false": (69, 117, 180)}
BOX_LEGEND = {"right": "found, right class", "wrong": "found, wrong class", "missed": "missed (annotated box)",
              "false": "false detection"}
BOX_TILE = 224                # scene pictures hold faces down to 24 px: a bigger tile keeps their boxes visible
BOX_WIDTH = 2
LEGEND = 20                   # height of the legend strip above a boxed sheet


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
    return figure_png(fig)


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
    return figure_png(fig)


def contact_sheet_png(images: Sequence[Image.Image], captions: Sequence[tuple[str, str]], correct: Sequence[bool],
                      *, cols: int = 8, tile: int = TILE,
                      legend: Sequence[tuple[str, tuple[int, int, int]]] = ()) -> tuple[bytes, dict[str, Any]]:
    """A grid of one tile per image, in the given order, and its layout.

    Each tile is the image scaled to fit ``tile`` pixels, over two caption lines,
    framed by a ``BORDER``-pixel border in :data:`RIGHT_COLOR` or
    :data:`WRONG_COLOR`. With a ``legend`` (``(text, colour)`` pairs) a strip of
    ``legend_height`` pixels above the grid names the colours. The PNG is exactly
    ``columns * tile_width`` by ``legend_height + rows * tile_height`` pixels, as
    the returned layout says (wider only if the legend needs it).
    """
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    tw, th, top = tile + 2 * BORDER, tile + CAPTION + 2 * BORDER, LEGEND if legend else 0
    font = ImageFont.load_default()
    width = max(cols * tw, sum(int(font.getlength(t)) + 26 for t, _ in legend))
    sheet = Image.new("RGB", (width, top + rows * th), "white")
    draw = ImageDraw.Draw(sheet)
    x = BORDER
    for text, color in legend:  # a filled swatch, then its meaning
        draw.rectangle([x, 5, x + 10, 15], fill=color)
        draw.text((x + 14, 4), text, fill=(0, 0, 0), font=font)
        x += int(font.getlength(text)) + 26
    for k, (img, (line1, line2), ok) in enumerate(zip(images, captions, correct)):
        x, y = (k % cols) * tw, top + (k // cols) * th
        draw.rectangle([x, y, x + tw - 1, y + th - 1], outline=RIGHT_COLOR if ok else WRONG_COLOR, width=BORDER)
        thumb = ImageOps.contain(img.convert("RGB"), (tile, tile))  # small images are enlarged to the tile
        sheet.paste(thumb, (x + BORDER + (tile - thumb.width) // 2, y + BORDER + (tile - thumb.height) // 2))
        draw.text((x + BORDER + 2, y + BORDER + tile + 1), line1, fill=(0, 0, 0), font=font)
        draw.text((x + BORDER + 2, y + BORDER + tile + 14), line2, fill=(90, 90, 90), font=font)
    if not n:
        draw.text((BORDER, top + BORDER), "no scored images", fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue(), {"tiles": n, "columns": cols if n else 0, "rows": rows if n else 0,
                            "tile_width": tw, "tile_height": th, "width": sheet.width, "height": sheet.height,
                            "border": BORDER, "legend_height": top}


def boxed_contact_sheet_png(images: Sequence[Image.Image], boxes: Sequence[Sequence[tuple[Sequence[float], str]]],
                            captions: Sequence[tuple[str, str]], correct: Sequence[bool], *,
                            cols: int = 4) -> tuple[bytes, dict[str, Any]]:
    """:func:`contact_sheet_png` of ``BOX_TILE`` tiles with face boxes drawn, under a legend of :data:`BOX_COLORS`.

    ``boxes[k]``: ``((x0, y0, x1, y1), kind)`` in pixels of ``images[k]``, kind a key of
    :data:`BOX_COLORS`; each is outlined ``BOX_WIDTH`` pixels wide on the image scaled to the tile,
    so a box's top-left corner lands at ``tile origin + BORDER + offset + scale * (x0, y0)``.
    The tile's border is the image-level verdict (right/wrong).
    """
    thumbs = []
    for img, faces in zip(images, boxes):
        thumb = ImageOps.contain(img.convert("RGB"), (BOX_TILE, BOX_TILE))
        sx, sy = thumb.width / img.width, thumb.height / img.height
        draw = ImageDraw.Draw(thumb)
        for (x0, y0, x1, y1), kind in faces:
            draw.rectangle([round(x0 * sx), round(y0 * sy), round(x1 * sx) - 1, round(y1 * sy) - 1],
                           outline=BOX_COLORS[kind], width=BOX_WIDTH)
        thumbs.append(thumb)
    return contact_sheet_png(thumbs, captions, correct, cols=cols, tile=BOX_TILE,
                             legend=[(BOX_LEGEND[k], c) for k, c in BOX_COLORS.items()])


def ablation_curves_png(curves: Sequence[tuple[str, Sequence[dict], bool]]) -> bytes:
    """Val loss and val accuracy per epoch of every trial on shared axes; failed trials dashed."""
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(12, 4.4), sharex=True)
    for label, history, failed in curves:
        epochs = [int(h["epoch"]) for h in history]  # counted from 1
        style = dict(marker="o", ms=3, ls="--" if failed else "-", label=label + (" (failed)" if failed else ""))
        loss.plot(epochs, [h["val_loss"] for h in history], **style)
        acc.plot(epochs, [h["val_acc"] for h in history], **style)
    loss.set(title="Val loss", xlabel="epoch", ylabel="cross-entropy")
    acc.set(title="Val accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (loss, acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc.legend(fontsize=8, loc="lower right")
    return figure_png(fig)


def _f(v: Any, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _group_rows(rows: Sequence[dict[str, Any]], key: str) -> list[str]:
    out = [f"| {key} | faces | found | recall | classified | right | accuracy (found) | found and right |",
           "|---|---|---|---|---|---|---|---|"]
    return out + [f"| {r[key]} | {r['faces']} | {r['found']} | {_f(r['recall'])} | {r['classified']} | "
                  f"{r['right']} | {_f(r['accuracy'])} | {_f(r['found_and_right'])} |" for r in rows]


def detection_markdown(det: dict[str, Any], split: str, alert: str) -> list[str]:
    """The detection section of one split (:mod:`maskmodel.study.detection_report`) as Markdown lines."""
    out = [f"### Faces: detection and per-face classification (`{split}`)", ""]
    if not det.get("available"):
        return out + [f"**{det['reason']}.**", ""]
    a = det["image_alerts"]
    out += [f"Annotations: `{det['annotations']}`: {det['images']} annotated images scored "
            f"({det['error_rows']} error rows, {det['whole_image_rows']} scored whole because no face was found), "
            f"{det['faces']} annotated faces, {det['detections']} detections. Matching at IoU {det['iou']}.", "",
            "| metric | value |", "|---|---|",
            f"| detection recall (faces found / annotated) | {_f(det['recall'])} ({det['matched']}/{det['faces']}) |",
            f"| detection precision (found / detections) | {_f(det['precision'])} "
            f"({det['matched']}/{det['detections']}) |",
            f"| AP50 (COCO, over the run's kept faces) | {_f(det['ap50'])} |",
            f"| AP 0.50:0.95 (COCO) | {_f(det['ap'])} |",
            f"| per-face accuracy (matched faces) | {_f(det['face_accuracy'])} ({det['classified']} faces) |",
            f"| faces found and classified right / annotated | {_f(det['found_and_right'])} |",
            f"| photo verdict accuracy (alert: {alert}) | {_f(det['image_accuracy'])} |",
            f"| image alerts: recall / precision | {_f(a['recall'])} / {_f(a['precision'])} "
            f"({a['tp']} of {a['true']} true, {a['flagged']} flagged) |", "",
            f"By {det['breakdown_by']}:", ""]
    out += _group_rows(det["by_group"], det["breakdown_by"]) + ["", "By face size (sqrt of box area, pixels):", ""]
    out += _group_rows(det["by_size"], "size") + [""]
    if det.get("files"):
        sheet = det["contact_sheet"]
        out += [f"Boxed contact sheet: {sheet['tiles']} images, most problems first; boxes green = found and "
                "right, red = found and wrong class, amber = missed (the annotated box), blue = false detection; "
                "the tile's border is the image-level verdict:", "", f"![boxed contact sheet]({det['files'][0]})", ""]
    return out


def report_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the evaluation report's numbers and figures, per split, tied to the model id and data URI."""
    out = [f"# Evaluation of model `{report['model_id']}`", "",
           f"- model: `{report['model']}`", f"- data: `{report['data']}`",
           f"- classes: {', '.join(report['classes'])}; alert (positive) classes: "
           f"{', '.join(f'`{c}`' for c in report['alert_classes'])}",
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
                f"| photo verdict accuracy (alert or not; error rows wrong) | {_f(r['verdict']['accuracy'])} |",
                f"| ROC AUC ({report['alert']}) | {_f(b['roc_auc'])} |",
                f"| average precision ({report['alert']}) | {_f(b['average_precision'])} |",
                *[f"| ROC AUC / average precision ({c} vs rest) | {_f(o['roc_auc'])} / {_f(o['average_precision'])} |"
                  for c, o in r.get("one_vs_rest", {}).items()],
                f"| expected calibration error ({cal['n_bins']} bins) | {_f(cal['ece'])} |",
                f"| max calibration error | {_f(cal['mce'])} |", "",
                "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        out += [f"| {c} | {_f(m['precision'])} | {_f(m['recall'])} | {_f(m['f1'])} | {m['support']} |"
                for c, m in r["per_class"].items()]
        out += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                "| true \\ predicted | " + " | ".join(r["classes"]) + " |", "|---" * (len(r["classes"]) + 1) + "|"]
        out += [f"| {c} | " + " | ".join(str(v) for v in row) + " |"
                for c, row in zip(r["classes"], r["confusion_matrix"])]
        out += ["", f"Alert threshold table: an image is flagged ({report['alert']}) when its "
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
        if r.get("detection", {}).get("annotations"):  # a split without face annotations has no faces section
            out += detection_markdown(r["detection"], split, report["alert"])
        if r["error_rows"]:
            out += ["Error rows (not scored):", ""]
            out += [f"- `{e['path']}`: {e['error']}" for e in r["error_rows"][:20]]
            if len(r["error_rows"]) > 20:
                out.append(f"- … and {len(r['error_rows']) - 20} more (all in `report.json`)")
            out.append("")
    return "\n".join(out)
