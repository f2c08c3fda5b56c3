"""Label Studio's formats for face boxes: the labelling config, import tasks with pre-annotations, the JSON export.

Pure functions, no I/O. Label Studio's rectangle ``value`` is in PERCENT of
the original image (``x``, ``y``: the top-left corner, ``width``, ``height``,
each 0-100; ``rotation`` in degrees), with the image's pixel size beside it in
``original_width`` / ``original_height``. Boxes here are ``x0, y0, x1, y1``
float pixels (``x1``/``y1`` exclusive), as in :mod:`maskmodel.data.annotations`.

An import task (https://labelstud.io/guide/predictions) is
``{"data": {"image": <url>, ...}, "predictions": [{"model_version", "score",
"result": [region, ...]}]}``; a region is ``{"id", "from_name": "label",
"to_name": "image", "type": "rectanglelabels", "original_width",
"original_height", "image_rotation": 0, "value": {...,
"rectanglelabels": [<class>]}, "score"}``. The JSON export
(https://labelstud.io/guide/export#Label-Studio-JSON-format-of-annotated-tasks)
is a list of tasks, each with ``"annotations": [{"id", "result": [region, ...],
"was_cancelled", "updated_at", ...}]``; :func:`read_export` reads it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Sequence
from xml.sax.saxutils import quoteattr

from maskmodel.errors import UserError

FROM_NAME = "label"
TO_NAME = "image"
RECTANGLE = "rectanglelabels"


def labelling_config(classes: Sequence[str]) -> str:
    """The labelling config XML: one image (``$image``) and a rectangle tool with one label per class."""
    labels = "\n".join(f"    <Label value={quoteattr(c)}/>" for c in classes)
    return (f"<View>\n  <Image name=\"{TO_NAME}\" value=\"$image\" zoom=\"true\"/>\n"
            f"  <RectangleLabels name=\"{FROM_NAME}\" toName=\"{TO_NAME}\">\n{labels}\n  </RectangleLabels>\n"
            f"</View>\n")


def to_percent(box: Sequence[float], width: int, height: int) -> dict[str, float]:
    """A pixel box ``x0, y0, x1, y1`` of a ``width`` x ``height`` image as Label Studio's percent ``value``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return {"x": 100.0 * x0 / width, "y": 100.0 * y0 / height, "width": 100.0 * (x1 - x0) / width,
            "height": 100.0 * (y1 - y0) / height, "rotation": 0.0}


def from_percent(value: dict[str, Any], width: int, height: int) -> tuple[float, float, float, float]:
    """Label Studio's percent ``value`` back to a pixel box ``x0, y0, x1, y1``; :class:`KeyError` /
    :class:`ValueError` when a coordinate is missing or not a number."""
    x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
    return (x * width / 100.0, y * height / 100.0, (x + w) * width / 100.0, (y + h) * height / 100.0)


def region(region_id: str, box: Sequence[float], cls: str, width: int, height: int,
           score: float | None = None) -> dict[str, Any]:
    """One rectangle of a task's predictions (or annotations), ``box`` in pixels."""
    out = {"id": region_id, "from_name": FROM_NAME, "to_name": TO_NAME, "type": RECTANGLE,
           "original_width": int(width), "original_height": int(height), "image_rotation": 0,
           "value": {**to_percent(box, width, height), RECTANGLE: [cls]}}
    if score is not None:
        out["score"] = float(score)
    return out


@dataclass(frozen=True)
class Reviewed:
    """One reviewed task of a Label Studio export: the task's ``data``, the annotation that counts (the latest
    ``updated_at`` of those not cancelled) and its regions as ``(region id, (x0, y0, x1, y1) pixels, class)``."""

    task_id: Any
    data: dict[str, Any]
    annotation_id: Any
    updated_at: str
    regions: tuple[tuple[str, tuple[float, float, float, float], str], ...]


def _time(text: Any) -> dt.datetime:
    value = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def read_export(doc: Any, where: str) -> tuple[list[Reviewed], list[Any]]:
    """The reviewed tasks of a parsed Label Studio JSON export, and the ids of tasks with no usable annotation
    (none, or every one cancelled: not reviewed, so nothing changes for them).

    Raises :class:`UserError` in one sentence naming ``where`` and the task, annotation or result at fault
    (not a list of tasks, a task without ``data``, a rectangle without coordinates or label, an unreadable
    ``updated_at``...). Regions of other types (a choice, a text area) are passed over.
    """
    if not isinstance(doc, list):
        raise UserError(f"{where} is not a Label Studio JSON export: it must be a list of tasks, got "
                        f"{type(doc).__name__}.")
    out, unreviewed = [], []
    for n, task in enumerate(doc):
        name = f"task {task.get('id', f'#{n + 1}')!r}" if isinstance(task, dict) else f"task #{n + 1}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise UserError(f"{where}: {name} has no \"data\" object; export the project as Label Studio JSON.")
        annotations = task.get("annotations")
        if annotations is None:
            annotations = []
        if not isinstance(annotations, list):
            raise UserError(f"{where}: {name} has \"annotations\" that are not a list.")
        best, best_time = None, None
        for a in annotations:
            aname = f"{name}, annotation {a.get('id')!r}" if isinstance(a, dict) else f"{name}, an annotation"
            if not isinstance(a, dict) or not isinstance(a.get("result"), list):
                raise UserError(f"{where}: {aname} has no \"result\" list.")
            if a.get("was_cancelled"):
                continue
            stamp = a.get("updated_at") or a.get("created_at")
            try:
                when = _time(stamp)
            except (TypeError, ValueError):
                raise UserError(f"{where}: {aname} has updated_at {stamp!r}, which is not an ISO 8601 time.") from None
            if best is None or when >= best_time:
                best, best_time = a, when
        if best is None:
            unreviewed.append(task.get("id", n + 1))
            continue
        aname = f"{name}, annotation {best.get('id')!r}"
        regions = []
        for k, r in enumerate(best["result"]):
            if not isinstance(r, dict) or r.get("type") != RECTANGLE:
                continue
            rname = f"{aname}, result {r.get('id', k + 1)!r}"
            try:
                width, height = int(r["original_width"]), int(r["original_height"])
                if width < 1 or height < 1:
                    raise ValueError("original size must be positive")
                if float(r.get("value", {}).get("rotation") or 0.0) != 0.0:
                    raise ValueError("rotated rectangles are not supported; draw it unrotated")
                x0, y0, x1, y1 = from_percent(r["value"], width, height)
                box = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
                       min(max(y1, 0.0), height))
                if not (box[2] > box[0] and box[3] > box[1]):
                    raise ValueError("it has no area inside the image")
                labels = r["value"][RECTANGLE]
                if not isinstance(labels, list) or len(labels) != 1:
                    raise ValueError(f"it must carry exactly one label, got {labels!r}")
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                what = f"lacks {e}" if isinstance(e, KeyError) else str(e)
                raise UserError(f"{where}: {rname} is not a usable rectangle ({what}).") from None
            regions.append((str(r.get("id", f"r{k}")), box, str(labels[0])))
        out.append(Reviewed(task_id=task.get("id", n + 1), data=task["data"], annotation_id=best.get("id"),
                            updated_at=best_time.isoformat(), regions=tuple(regions)))
    return out, unreviewed


__all__ = ["FROM_NAME", "RECTANGLE", "Reviewed", "TO_NAME", "from_percent", "labelling_config", "read_export",
           "region", "to_percent"]
