"""Reviewers' corrections back as labels: ``jobs.review import``.

Reads what reviewers made of an export (:mod:`maskmodel.study.review`): a
Label Studio JSON export (:func:`maskmodel.data.labelstudio.read_export`) or a
COCO file (CVAT's export), checks it against the export's ``manifest.json``,
and writes a COCO annotation set with :func:`maskmodel.data.annotations.write_coco`
(the one COCO writer; ``jobs.train --data`` and ``jobs.train_detector`` read it
with the one reader). Each image keeps, in its COCO ``images[]`` entry,
``maskmodel_path`` and ``maskmodel_version`` (which photo, which version of it),
``updated_at`` (when its correction was made) and ``task_id``.

Rules:

- a photo whose version changed since the export (or that is gone) is skipped
  and named: a correction never lands on a replaced photo;
- a task nobody annotated (or whose annotations were all cancelled) changes
  nothing; of several annotations of one task, the latest ``updated_at`` counts;
- ``--merge`` keeps every photo of an earlier set; a photo in both takes the
  correction with the later ``updated_at`` (a COCO file from CVAT has no
  per-image time: its ``info.date_created``, else the time of the import);
- a malformed file is refused whole, in one sentence naming the task,
  annotation or image at fault, so no correction is silently dropped.

Compared with the model's faces (a box keeps its region id ``face<i>`` in
Label Studio; otherwise the model's face it overlaps best, IoU >= 0.5), each
reviewed face is counted as relabelled, added, deleted, or left as the model
had it (class kept; ``moved``: of those, the box redrawn, IoU < 0.9).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np

from maskmodel.config import JobConfig, field
from maskmodel.data import labelstudio
from maskmodel.data.annotations import ImageBoxes, read_coco, write_coco
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.study.review import MANIFEST, MANIFEST_FORMAT, _current_versions

log = logging.getLogger(__name__)

MATCH_IOU, MOVED_IOU = 0.5, 0.9


@dataclass(frozen=True)
class ReviewImportConfig(JobConfig):
    """``jobs.review import``: reviewers' corrections as a COCO annotation set for training."""

    reviewed: str = field(path=True, help="the reviewers' work: a Label Studio JSON export, or a COCO file "
                                          "(CVAT's export)")
    exported: str = field(path=True, help="the folder jobs.review export wrote (its manifest.json says which "
                                          "photo and version each task is)")
    output: str = field(path=True, help="COCO annotation set to write (.json)")
    merge: str = field("", path=True, help="an earlier annotation set to merge with: a photo in both takes the "
                                           "correction with the later updated_at")

    def validate(self) -> None:
        if not self.output.lower().endswith(".json"):
            raise ValueError(f"--output must be a .json file, got {self.output}")


@dataclass
class ImportSummary:
    output: str
    photos: int = 0  # photos in the written set
    reviewed: int = 0  # tasks with a counted annotation
    unreviewed: int = 0
    skipped: list[str] = dc_field(default_factory=list)  # photos changed or gone since the export
    faces: Counter = dc_field(default_factory=Counter)  # relabelled, added, deleted, kept, moved
    merged: Counter = dc_field(default_factory=Counter)  # earlier, replaced, superseded

    def summary_line(self) -> str:
        f, m = self.faces, self.merged
        line = (f"{self.reviewed} reviewed photo(s) ({self.unreviewed} not reviewed): {f['relabelled']} face(s) "
                f"changed class, {f['added']} added, {f['deleted']} deleted, {f['kept']} left as the model had them "
                f"({f['moved']} of those with the box redrawn)")
        if self.skipped:
            line += f"; skipped, changed since the export: {', '.join(self.skipped)}"
        if m:
            line += (f"; merged with {m['earlier']} earlier photo(s): {m['replaced']} replaced by a later "
                     f"correction, {m['superseded']} kept as the earlier one is later")
        return line + f"; {self.photos} photo(s) written to {self.output}"


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` ``(N, 4)`` with every box of ``b`` ``(M, 4)``, ``x0 y0 x1 y1``."""
    import torch
    from torchvision.ops import box_iou

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    return box_iou(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).numpy()


def compare(model_faces: list[dict], regions: list[tuple[str, tuple, str]]) -> Counter:
    """Count how the reviewed ``regions`` (id, box, class) differ from the model's faces (manifest ``faces``)."""
    out: Counter = Counter()
    model = {f"face{f['index']}": f for f in model_faces}
    matched: dict[int, dict] = {}
    for k, (rid, _, _) in enumerate(regions):
        if rid in model:
            matched[k] = model.pop(rid)
    rest = [k for k in range(len(regions)) if k not in matched]
    left = list(model.values())
    iou = _iou(np.asarray([regions[k][1] for k in rest], np.float32).reshape(-1, 4),
               np.asarray([f["box"] for f in left], np.float32).reshape(-1, 4))
    while iou.size and iou.max() >= MATCH_IOU:
        i, j = np.unravel_index(int(iou.argmax()), iou.shape)
        matched[rest[i]] = left[j]
        iou[i, :], iou[:, j] = -1, -1
    for k, (_, box, cls) in enumerate(regions):
        f = matched.get(k)
        if f is None:
            out["added"] += 1
        elif f["label"] != cls:
            out["relabelled"] += 1
        else:
            out["kept"] += 1
            out["moved"] += int(_iou(np.asarray([box], np.float32), np.asarray([f["box"]], np.float32))[0, 0]
                                < MOVED_IOU)
    out["deleted"] += len(model_faces) - len(matched)
    return out


def _from_coco(uri: str, doc: dict, photos: dict[str, dict]) -> list[dict]:
    """CVAT's COCO: each image matched to an exported photo by path, then by file name; regions get no ids."""
    by_image = {p["image"]: p for p in photos.values()}
    by_name: dict[str, list[dict]] = {}
    for p in photos.values():
        by_name.setdefault(posixpath.basename(p["image"]), []).append(p)
    when = str((doc.get("info") or {}).get("date_created") or dt.datetime.now(dt.timezone.utc).isoformat())
    out = []
    for n, r in enumerate(read_coco(uri)):
        p = r.extra.get("maskmodel_path") and photos.get(r.extra["maskmodel_path"]) or by_image.get(r.path)
        if p is None:
            same = by_name.get(posixpath.basename(r.path), [])
            if len(same) != 1:
                raise UserError(f"{uri}: image {n + 1} ({posixpath.basename(r.path)!r}) is "
                                f"{'not' if not same else 'ambiguously'} among the exported photos; import the "
                                f"file made from this export.")
            p = same[0]
        out.append({"photo": p, "task": f"image {n + 1}", "annotation": None, "updated_at": when,
                    "regions": [(f"r{k}", tuple(b), c) for k, (b, c) in enumerate(zip(r.boxes.tolist(),
                                                                                      r.classes))]})
    return out


def _from_label_studio(uri: str, doc: list, photos: dict[str, dict]) -> tuple[list[dict], int]:
    reviewed, unreviewed = labelstudio.read_export(doc, uri)
    out = []
    for t in reviewed:
        p = photos.get(t.data.get("path"))
        if p is None:
            raise UserError(f"{uri}: task {t.task_id!r} is of {t.data.get('path')!r}, which is not in this export; "
                            f"import the export of the project made from it.")
        out.append({"photo": p, "task": t.task_id, "annotation": t.annotation_id, "updated_at": t.updated_at,
                    "regions": list(t.regions), "version": t.data.get("version")})
    return out, len(unreviewed)


def _when(record: ImageBoxes) -> dt.datetime:
    text = record.extra.get("updated_at")
    if not text:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)  # no time: older than any correction
    value = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _key(record: ImageBoxes) -> str:
    return str(record.extra.get("maskmodel_path") or record.path)


def import_review(config: ReviewImportConfig) -> ImportSummary:
    """Write ``config.output`` from the reviewed file, the export's manifest and ``--merge``; see the module
    docstring. Raises :class:`UserError` for a malformed or foreign file, in one sentence naming what is at fault."""
    manifest = storage.read_json_object(storage.join(config.exported, MANIFEST), missing="review export manifest",
                                        fix="point --exported at the --output of jobs.review export")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{config.exported}/{MANIFEST} is not a {MANIFEST_FORMAT} manifest.")
    photos = {p["path"]: p for p in manifest["photos"]}
    classes = list(manifest["classes"])
    try:
        doc = json.loads(storage.read_text(config.reviewed))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{config.reviewed} is not valid JSON ({e}); expected a Label Studio JSON export or a "
                        f"COCO file.") from e
    summary = ImportSummary(output=config.output)
    if isinstance(doc, dict) and "images" in doc:
        items = _from_coco(config.reviewed, doc, photos)
    else:
        items, summary.unreviewed = _from_label_studio(config.reviewed, doc, photos)
    for it in items:
        for rid, _, cls in it["regions"]:
            if cls not in classes:
                where = f"task {it['task']!r}" + (f", annotation {it['annotation']!r}" if it["annotation"] else "")
                raise UserError(f"{config.reviewed}: {where}, box {rid!r} has class {cls!r}, which is not one of the "
                                f"exported classes {classes}.")
    now = _current_versions(sorted({(it["photo"]["archive"] or it["photo"]["path"]) for it in items}))
    records: dict[str, ImageBoxes] = {}
    for it in sorted(items, key=lambda it: str(it["updated_at"])):
        p = it["photo"]
        if now[p["archive"] or p["path"]] != p["version"] or it.get("version", p["version"]) != p["version"]:
            summary.skipped.append(p["path"])
            continue
        summary.faces.update(compare(p["faces"], it["regions"]))
        regions = it["regions"]
        records[p["path"]] = ImageBoxes(
            path=p["image"], width=p["width"], height=p["height"],
            boxes=np.asarray([b for _, b, _ in regions], np.float32).reshape(-1, 4),
            classes=tuple(c for _, _, c in regions), labels=tuple(c for _, _, c in regions),
            attributes=tuple({"source": "review"} for _ in regions),
            extra={"maskmodel_path": p["path"], "maskmodel_version": p["version"], "updated_at": it["updated_at"],
                   "task_id": it["task"], "model_id": p["model_id"], "run_id": p["run_id"]})
    summary.reviewed = len(records)
    if summary.skipped:
        log.warning("skipped %d photo(s) whose version changed since the export: %s", len(summary.skipped),
                    ", ".join(summary.skipped))
    out = dict(records)
    if config.merge:
        earlier = read_coco(config.merge)
        summary.merged["earlier"] = len(earlier)
        for r in earlier:
            key = _key(r)
            if key not in out:
                out[key] = r
            elif _when(r) > _when(out[key]):
                out[key] = r
                summary.merged["superseded"] += 1
            else:
                summary.merged["replaced"] += 1
        classes += [c for c in sorted({c for r in earlier for c in r.classes}) if c not in classes]
    write_coco(out.values(), config.output, categories=classes,
               info={"description": "maskmodel review import: reviewed faces", "reviewed": config.reviewed,
                     "exported": config.exported, "date_created": dt.datetime.now(dt.timezone.utc).isoformat()})
    summary.photos = len(out)
    return summary
