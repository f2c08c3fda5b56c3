"""The detection section of ``jobs.evaluate``: committed face boxes against annotated ones.

Input: the committed scoring rows of one split (a pyarrow table; with the face
stage it has a ``faces`` column, ``list<struct<x0, y0, x1, y1, score, label,
confidence, probs>>`` in original-image pixels, and ``detector``) and the
split's annotations (:func:`maskmodel.data.annotations.read_annotations`:
COCO JSON or Pascal VOC XML). Output: plain numbers for ``report.json``.

- detection ``recall`` and ``precision`` at IoU ``iou`` (0.5) at the operating
  point, i.e. over the faces the scoring run kept (its detector threshold,
  ``--max-faces``, minimum size), and ``ap50`` / ``ap`` (COCO, IoU 0.50:0.95)
  from pycocotools over those same faces, all through
  :mod:`maskmodel.metrics.detection`. AP over kept faces is truncated at the
  run's threshold: score with a lower threshold for the full curve;
- ``face_accuracy``: the classifier's label against the annotated class, on
  matched faces whose class is a model class; ``found_and_right``: the same
  over every annotated face (a missed face counts as wrong); ``by_class``: per
  annotated class of ``classes``, matched faces ``classified`` and ``right``
  (its recall; ``face_accuracy`` also moves with the class mix, these do not);
- ``image_accuracy``: the photo verdict accuracy
  (:func:`maskmodel.metrics.classification.verdict_accuracy`, the one definition
  the demo's split table and the README use): a photo's truth is an alert when
  any annotated face is of an alert class; its prediction is its row's
  ``alert`` verdict (no face found and no whole-image fallback: no alert; the
  whole-image fallback's verdict stands). Error rows count as wrong;
- breakdowns of the annotated faces by an attribute (``variant``: plain,
  surgical, n95, cloth, hand, paper, scarf on the synthetic scenes; by class
  when no face carries it) and by face size (``sqrt(w * h)`` in pixels).

Rows whose faces came from the whole-image fallback (``detector = 'none'``)
hold no detection: their faces are not counted as detections (``whole_image``
counts the rows). Scored rows without a ``faces`` column (scoring without a
face stage) give ``{"available": False, "reason": NO_BOXES}``, never an error.
Ray-free; reads storage only for the annotation file and the sheet's images.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from maskmodel.alert import row_alert, truth_alert
from maskmodel.data.annotations import ImageBoxes, read_annotations
from maskmodel.metrics.classification import verdict_accuracy
from maskmodel.errors import UserError
from maskmodel.metrics.detection import detection_metrics, match
from maskmodel.io import storage
from maskmodel.io.paths import resolve_entry

log = logging.getLogger(__name__)

NO_FACE_STAGE = ("no face boxes to compare: the split was scored with --faces none (each photo classified whole, "
                 "no faces found); score with --faces auto, centerface or a detector directory for detection figures")
NO_BOXES = ("no face boxes in the scored rows: the scoring run wrote no `faces` column (scored without a face "
            "stage), so detection cannot be evaluated; score with --faces auto or a detector")
SIZE_EDGES = (32, 64, 128, 256)  # face size bins, sqrt(w * h) in original pixels: <32, 32-64, ..., >=256
VARIANT_ORDER = ("plain", "surgical", "n95", "cloth", "below_nose", "chin", "hand", "paper", "scarf")
FACE_KINDS = ("right", "wrong", "missed", "false")  # box colours of the sheet: eval_reports.BOX_COLORS


def default_annotations(data: str, split: str) -> str | None:
    """``<data>/<split>.coco.json`` (next to a manifest file: in its folder) when that file exists, else ``None``."""
    base = data.rsplit("/", 1)[0] if data.lower().endswith((".csv", ".parquet")) else data
    uri = storage.join(base, f"{split}.coco.json")
    return uri if storage.exists(uri) else None


def num(value: float | None) -> str:
    """A figure as the job prints and logs it: 4 decimals, ``n/a`` for an undefined one (``None``)."""
    return "n/a" if value is None else f"{value:.4f}"


def summary(d: Mapping[str, Any]) -> str:
    """The headline of an available section (:func:`detection_section`), as printed and logged."""
    return (f"detection recall {num(d['recall'])}, precision {num(d['precision'])} at IoU {d['iou']}, AP50 "
            f"{num(d['ap50'])}, AP {num(d['ap'])} ({d['matched']}/{d['faces']} faces found, {d['detections']} "
            f"detections); per-face accuracy {num(d['face_accuracy'])}, photo verdict accuracy "
            f"{num(d['image_accuracy'])}")


def annotated_paths(records: Sequence[ImageBoxes]) -> list[str]:
    """Each record's photo in the form scoring writes in ``path`` (:func:`maskmodel.io.paths.resolve_entry`)."""
    return [resolve_entry("", rec.path) for rec in records]


def check_matched(uri: str, records: Sequence[ImageBoxes], scored: set[str], splits: Sequence[str]) -> int:
    """How many of the photos annotated in ``uri`` (its ``records``) are among ``scored`` (the URIs the
    ``splits`` will score); a partial match logs a warning with the count.

    Raises :class:`maskmodel.errors.UserError`, naming the folder looked in and the first annotated photo,
    when annotated photos exist and none of them is among ``scored``: the paths do not meet.
    """
    keys = annotated_paths(records)
    missing = [k for k in keys if k not in scored]
    matched = len(keys) - len(missing)
    if keys and not matched:
        first = missing[0]
        folder = first.rsplit("/", 1)[0] if "/" in first else "."
        found = "it exists but is not one of them" if storage.exists(first) else "no such file"
        raise UserError(f"None of the {len(keys)} photo(s) annotated in {uri!r} is among the {len(scored)} photo(s) "
                        f"of split(s) {', '.join(splits)} in --data: the first, {first!r}, was looked for in the "
                        f"folder {folder!r} ({found}); annotation paths are read relative to the annotation "
                        f"file's folder, so give --data the annotated photos or annotations that name them.")
    if missing:
        log.warning("%d of the %d photo(s) annotated in %s are not among the photos of split(s) %s and are left "
                    "out of the faces section (first: %s)", len(missing), len(keys), uri, ", ".join(splits),
                    missing[0])
    return matched


def load_truth(uri: str, paths: Sequence[str]) -> tuple[dict[str, ImageBoxes], int]:
    """The annotated images of ``uri`` among ``paths`` (scored URIs), keyed by those URIs; and how many of the
    file's images are not among them. Raises :class:`maskmodel.errors.UserError` for an unusable file."""
    wanted = set(paths)
    out, outside = {}, 0
    records = read_annotations(uri)
    for rec, key in zip(records, annotated_paths(records)):  # key: the form scoring writes in `path`
        if key in wanted:
            out[key] = rec
        else:
            outside += 1
    return out, outside


def face_rows(table) -> dict[str, dict[str, Any]] | None:
    """Per path: ``status``, ``label``, ``alert``, ``detector`` and ``faces`` (list of dicts) of the rows;
    ``None`` when the table has no ``faces`` column."""
    if "faces" not in table.column_names:
        return None
    names = ("path", "status", "label", "alert", "detector", "faces")
    cols = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows for c in names}
    return {p: {"status": s, "label": lab, "alert": a, "detector": d, "faces": f or []}
            for p, s, lab, a, d, f in zip(*(cols[c] for c in names))}


def size_bin(side: float, edges: Sequence[float] = SIZE_EDGES) -> str:
    """The size bin's name of a face ``side`` px across: ``<32``, ``32-64``, ..., ``>=256``."""
    k = int(np.searchsorted(np.asarray(edges), side, side="right"))
    if k == 0:
        return f"<{edges[0]}"
    return f">={edges[-1]}" if k == len(edges) else f"{edges[k - 1]}-{edges[k]}"


def _table(faces: list[dict[str, Any]], key: str, order: Sequence[str], name: str) -> list[dict[str, Any]]:
    """One row (``name``: the value) per value of ``key`` in ``order``, then any others sorted: faces, found,
    recall, classified (found, of a model class), right, accuracy (on classified), found_and_right."""
    groups = [g for g in order if any(f[key] == g for f in faces)]
    groups += sorted({f[key] for f in faces} - set(groups))
    rows = []
    for g in groups:
        sel = [f for f in faces if f[key] == g]
        found = [f for f in sel if f["found"]]
        judged = [f for f in found if f["right"] is not None]
        right = sum(bool(f["right"]) for f in judged)
        rows.append({name: g, "faces": len(sel), "found": len(found), "recall": len(found) / len(sel),
                     "classified": len(judged), "right": right,
                     "accuracy": right / len(judged) if judged else None, "found_and_right": right / len(sel)})
    return rows


def detection_section(truth: Mapping[str, ImageBoxes], rows: Mapping[str, dict[str, Any]] | None,
                      classes: Sequence[str], alerts: Sequence[str], *, iou: float = 0.5, attribute: str = "variant",
                      size_edges: Sequence[float] = SIZE_EDGES) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The section's numbers (see the module docstring) and, per image, what the sheet draws.

    ``truth``: path -> annotated boxes; ``rows``: :func:`face_rows` (``None``: no ``faces`` column);
    ``alerts``: the model's alert classes. Each
    image's entry: ``path``, ``boxes`` (``[(x0, y0, x1, y1), kind]``, kind in :data:`FACE_KINDS`: a
    matched face's predicted box is right or wrong, a missed face's annotated box, a false detection's box),
    ``problems`` (wrong + missed + false), ``verdict_right`` and ``caption`` (two lines).
    """
    if rows is None:
        return {"available": False, "reason": NO_BOXES, "images": len(truth)}, []
    t_boxes, p_boxes, p_scores, sizes, faces, images = [], [], [], [], [], []
    truths, predicted, errors, whole = [], [], 0, 0
    for path, rec in truth.items():
        row = rows.get(path) or {"status": "missing", "label": None, "alert": None, "detector": None, "faces": []}
        ok = row["status"] == "ok"
        errors += not ok
        whole += bool(ok and row["detector"] == "none")
        found = [f for f in row["faces"] if ok and row["detector"] != "none"]
        pb = np.array([[f["x0"], f["y0"], f["x1"], f["y1"]] for f in found], np.float32).reshape(-1, 4)
        ps = np.array([f["score"] for f in found], np.float32)
        m = match(rec.boxes, pb, ps, iou=iou)
        pred_of = {int(i): int(j) for i, j in m.pairs}
        drawn, problems = [], len(m.spurious)
        for i, (box, cls) in enumerate(zip(rec.boxes.tolist(), rec.classes)):
            attrs = rec.attributes[i] if i < len(rec.attributes) else {}
            j = pred_of.get(i)
            right = None if j is None or cls not in classes else found[j]["label"] == cls
            faces.append({"group": attrs.get(attribute), "class": cls, "found": j is not None, "right": right,
                          "size": size_bin(float(np.sqrt((box[2] - box[0]) * (box[3] - box[1]))), size_edges)})
            kind = "missed" if j is None else ("right" if right or right is None else "wrong")
            problems += kind in ("missed", "wrong")
            drawn.append((tuple(box) if j is None else tuple(pb[j].tolist()), kind))
        drawn += [(tuple(pb[j].tolist()), "false") for j in m.spurious]
        true_alert, said = truth_alert(rec.classes, alerts), row_alert(row["status"], row["label"], row["alert"], alerts)
        right_verdict = said is not None and said == true_alert
        truths.append(true_alert)
        predicted.append(said)
        t_boxes.append(rec.boxes)
        p_boxes.append(pb)
        p_scores.append(ps)
        sizes.append((rec.width, rec.height))
        images.append({"path": path, "boxes": drawn, "problems": problems, "verdict_right": bool(right_verdict),
                       "caption": (f"{len(m.pairs)}/{len(rec)} found, {problems} wrong/missed/false",
                                   f"{row['label'] if ok else row['status']} (true "
                                   f"{'alert' if true_alert else 'no alert'})")})
    by_class = not any(f["group"] is not None for f in faces)
    for f in faces:
        f["group"] = f["class"] if by_class else (f["group"] if f["group"] is not None else "-")
    dm = detection_metrics(t_boxes, p_boxes, p_scores, sizes=sizes, iou=iou, threshold=0.0)
    judged = [f for f in faces if f["found"] and f["right"] is not None]
    right = sum(bool(f["right"]) for f in judged)
    verdict = verdict_accuracy(truths, predicted)
    section = {
        "available": True, "iou": iou, "images": len(truth), "error_rows": errors, "whole_image_rows": whole,
        "faces": dm["faces"], "detections": dm["detections"], "matched": dm["matched"],
        "recall": dm["recall"] if dm["faces"] else None, "precision": dm["precision"] if dm["detections"] else None,
        # pycocotools says -1 for "no annotated face": undefined, like the other ratios
        "ap50": dm["ap50"] if dm["faces"] else None, "ap": dm["ap"] if dm["faces"] else None,
        "classified": len(judged), "face_accuracy": right / len(judged) if judged else None,
        # per annotated class, whatever the breakdown below: the class mix moves face_accuracy, not these
        "by_class": {c: {"classified": sum(f["class"] == c for f in judged),
                         "right": sum(f["class"] == c and bool(f["right"]) for f in judged)} for c in classes},
        "found_and_right": right / len(faces) if faces else None,
        "unclassifiable": sum(f["found"] and f["right"] is None for f in faces),
        "image_accuracy": verdict["accuracy"],
        "image_alerts": {"true": verdict["alerts"], "flagged": verdict["flagged"], "tp": verdict["tp"],
                         "recall": verdict["recall"], "precision": verdict["precision"]},
        "breakdown_by": "class" if by_class else attribute,
        "by_group": _table(faces, "group", list(classes) if by_class else VARIANT_ORDER,
                           "class" if by_class else attribute),
        "by_size": _table(faces, "size", [size_bin(e, size_edges) for e in (0, *size_edges)], "size"),
    }
    return section, images


def sheet_order(images: Sequence[dict[str, Any]], max_tiles: int) -> list[dict[str, Any]]:
    """Images with the most problems first (then wrong verdicts first), at most ``max_tiles``; stable."""
    return sorted(images, key=lambda im: (-im["problems"], im["verdict_right"]))[:max_tiles]


def boxed_sheet(images: Sequence[dict[str, Any]], max_tiles: int) -> tuple[bytes, dict[str, Any]]:
    """The boxed contact sheet of :func:`sheet_order`'s images, read from storage; PNG bytes and layout."""
    from maskmodel.io.decode import decode_image
    from maskmodel.study import eval_reports

    chosen = sheet_order(images, max_tiles)
    pictures = [decode_image(storage.read_bytes(im["path"])) for im in chosen]
    png, layout = eval_reports.boxed_contact_sheet_png(pictures, [im["boxes"] for im in chosen],
                                                       [im["caption"] for im in chosen],
                                                       [im["verdict_right"] for im in chosen])
    layout["paths"] = [im["path"] for im in chosen]
    return png, layout


def evaluate_detection(table, annotations: str | None, paths: Sequence[str], classes: Sequence[str],
                       alerts: Sequence[str], *, iou: float, max_tiles: int, output: str, split: str,
                       faces: str = "auto") -> dict[str, Any]:
    """The detection section of one split, its boxed sheet written to ``<output>/boxes_<split>.png``.

    ``annotations``: the split's COCO/VOC URI (``None``: the section says there are none); ``paths``: the
    split's scored URIs; ``faces``: how the split was scored (``jobs.score --faces``; ``"none"``: no face
    boxes to compare, :data:`NO_FACE_STAGE`). Raises :class:`maskmodel.errors.UserError` for an unusable
    annotation file.
    """
    if annotations is None:  # crops, say: the report leaves the section out
        return {"available": False, "annotations": None,
                "reason": f"no face annotations for {split!r}: pass --annotations (COCO JSON or Pascal VOC XML)"}
    truth, outside = load_truth(annotations, paths)
    if faces == "none":
        section: dict[str, Any] = {"available": False, "reason": NO_FACE_STAGE, "images": len(truth)}
        images: list[dict[str, Any]] = []
    elif not truth:  # the annotations are another split's (evaluate checked that some split has them)
        section, images = {"available": False, "images": 0,
                           "reason": f"none of the photos annotated in {annotations} is in {split!r}"}, []
    else:
        section, images = detection_section(truth, face_rows(table), classes, alerts, iou=iou)
    section.update(annotations=annotations, annotated_images_not_scored=outside,
                   scored_images_not_annotated=len(set(paths) - set(truth)))
    if section["available"]:
        png, section["contact_sheet"] = boxed_sheet(images, max_tiles)
        name = f"boxes_{split}.png"
        storage.write_bytes(storage.join(output, name), png)
        section["files"] = [name]
        log.info("%s faces: %s", split, summary(section))  # the printed line's numbers, rounded alike
    else:
        log.warning("%s: %s", split, section["reason"])
    return section
