"""Faces the model doubts, sent to reviewers: ``jobs.review export``.

From the committed rows of a results table (some runs, or a SQL filter over
the ``predictions`` view) the export picks faces: the least confident first
(smallest margin between the two most likely classes), optionally every face
behind an alert, and a seeded random sample of the rest, so reviewers check
more than the model's doubts. A photo scored by several runs counts once, at
its latest row. Every face of a chosen photo is pre-annotated (a reviewer sees
the whole photo and may add, delete or relabel any box); the chosen ones are
named in the task. It writes, into ``--output``:

- ``tasks.json``: Label Studio import tasks (:mod:`maskmodel.data.labelstudio`), the
  image as ``s3://`` (Label Studio's cloud-storage connector signs it) or, with
  ``--presign``, a presigned HTTPS URL; ``labelling-config.xml``;
- ``predictions.coco.json``: the same boxes as COCO (score and face index in each
  annotation's ``attributes``), for CVAT and FiftyOne;
- ``manifest.json``: what was exported (path, version, every face as the model had it)
  and why; ``jobs.review import`` compares the reviewers' work with it.

A face is identified by the photo's path, its version (ETag, or size and
mtime; an archive member's is its archive's) and the face's index in the row.
A photo whose version changed since it was scored is not exported, and named.
An archive member is extracted into ``--review-folder``, since a labelling
tool cannot open a tar member.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from maskmodel.alert import alert_classes
from maskmodel.config import JobConfig, field
from maskmodel.data import labelstudio
from maskmodel.data.annotations import ImageBoxes, write_coco
from maskmodel.errors import UserError
from maskmodel.io import signing, storage
from maskmodel.io.archives import iter_tar, iter_zip
from maskmodel.io.members import archive_kind
from maskmodel.results.query import connect, run_sql

log = logging.getLogger(__name__)

TASKS, CONFIG, COCO, MANIFEST = "tasks.json", "labelling-config.xml", "predictions.coco.json", "manifest.json"
MANIFEST_FORMAT = "maskmodel.review/1"

FACES_SQL = """
CREATE TEMP TABLE review_faces AS
WITH latest AS (
    SELECT path, archive, member, version, width, height, faces, model_id, run_id FROM predictions
    WHERE status = 'ok' AND faces IS NOT NULL AND len(faces) > 0 AND ({where})
    QUALIFY row_number() OVER (PARTITION BY path ORDER BY scored_at DESC, run_id DESC) = 1),
f AS (SELECT *, unnest(faces) AS face, unnest(range(len(faces))) AS face_index FROM latest)
SELECT path, archive, member, version, width, height, model_id, run_id, CAST(face_index AS INTEGER) AS face_index,
       face.x0 AS x0, face.y0 AS y0, face.x1 AS x1, face.y1 AS y1, face.score AS score, face.label AS label,
       face.confidence AS confidence, face.probs AS probs,
       list_sort(face.probs, 'DESC')[1] - coalesce(list_sort(face.probs, 'DESC')[2], 0) AS margin
FROM f
"""


@dataclass(frozen=True)
class ReviewExportConfig(JobConfig):
    """``jobs.review export``: faces of a results table for reviewers, as Label Studio tasks and COCO."""

    results: str = field(path=True, help="URI of the results folder (the --output of jobs.score)")
    output: str = field(path=True, help="folder to write tasks.json, labelling-config.xml, predictions.coco.json "
                                        "and manifest.json to")
    run_id: tuple[str, ...] = field((), help="only these committed runs (default: all)")
    where: str = field("", help="SQL condition over the `predictions` view, e.g. \"scored_at > '2025-03-01'\"")
    least_confident: int = field(100, minimum=0, help="faces to pick, smallest margin between the two most "
                                                      "likely classes first")
    alerts: bool = field(False, help="also every face whose class raises an alert")
    random: int = field(0, minimum=0, help="also this many faces drawn at random from the rest (seeded)")
    seed: int = field(0, help="seed of --random")
    review_folder: str = field("", path=True, help="folder that archive members are extracted into (a "
                                                   "labelling tool cannot open a tar member)")
    presign: int = field(0, minimum=0, maximum=signing.MAX_SECONDS,
                         help="image URLs presigned for this many seconds (0: s3:// URIs, for Label Studio's cloud "
                              "storage connector); the URLs are credentials, written to tasks.json only")

    def validate(self) -> None:
        if not (self.least_confident or self.alerts or self.random):
            raise ValueError("nothing to export: --least-confident 0 without --alerts or --random")


@dataclass(frozen=True)
class ExportSummary:
    output: str
    photos: int
    faces: int  # faces picked for review
    boxes: int  # faces pre-annotated (every face of the picked photos)
    by_reason: dict[str, int]
    changed: list[str]  # photos whose version changed since scoring: not exported
    expiry: str | None  # when presigned URLs stop working

    def summary_line(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in self.by_reason.items())
        line = (f"exported {self.faces} face(s) to review ({reasons}) in {self.photos} photo(s), {self.boxes} "
                f"box(es) pre-annotated, to {self.output}")
        if self.changed:
            line += f"; {len(self.changed)} photo(s) changed since scoring, left out: {', '.join(self.changed[:5])}"
        return line + (f"; presigned URLs valid until {self.expiry}" if self.expiry else "")


def _classes_by_run(con) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """The class names of each committed run (its commit's ``classes``, the order of its faces' ``probs``), and
    ``{run_id, label}`` for each of its alert classes: its profile's (the model card's), else by the rule of
    :func:`maskmodel.alert.alert_classes` for runs committed before profiles named them."""
    from maskmodel.results.profile import profile_alert_classes

    out, alerts = {}, []
    for r in run_sql(con, "SELECT run_id, metadata FROM runs").to_pylist():
        meta = json.loads(r["metadata"] or "{}")
        classes = meta.get("classes")
        if classes:
            out[r["run_id"]] = list(classes)
            named = profile_alert_classes(meta.get("profile") or {}) or alert_classes(classes)
            alerts += [{"run_id": r["run_id"], "label": a} for a in named]
    return out, alerts


def select_faces(config: ReviewExportConfig) -> tuple[pa.Table, pa.Table, dict[str, list[str]]]:
    """``(picked, context, classes by run)``: the picked faces (columns of :data:`FACES_SQL` plus ``reason``), in
    review order, and every face of their photos. Raises :class:`UserError` for a bad ``--where``."""
    con = connect(config.results, run_ids=config.run_id or None)
    try:
        classes, alert_rows = _classes_by_run(con)
        con.register("alert_labels", pa.Table.from_pylist(alert_rows, schema=pa.schema(
            [("run_id", pa.string()), ("label", pa.string())])))
        run_sql(con, FACES_SQL.format(where=config.where or "TRUE"))
        parts = []
        if config.least_confident:
            parts.append(f"(SELECT *, 'least_confident' AS reason, 0 AS part, CAST(margin AS DOUBLE) AS o "
                         f"FROM review_faces ORDER BY margin, path, face_index LIMIT {config.least_confident})")
        if config.alerts:
            parts.append("(SELECT f.*, 'alert' AS reason, 1 AS part, CAST(f.margin AS DOUBLE) AS o "
                         "FROM review_faces f JOIN alert_labels a USING (run_id, label))")
        parts = parts or ["SELECT *, '' AS reason, 0 AS part, CAST(0 AS DOUBLE) AS o FROM review_faces WHERE FALSE"]
        # A face picked for two reasons counts once, for the first (least confident before alert).
        run_sql(con, "CREATE TEMP TABLE picked AS SELECT DISTINCT ON (path, face_index) * FROM ("
                     + " UNION ALL ".join(parts) + ") ORDER BY path, face_index, part")
        if config.random:
            draw = f"CAST(hash({config.seed}, f.path, f.face_index) AS DOUBLE)"
            run_sql(con, f"INSERT INTO picked SELECT f.*, 'random' AS reason, 2 AS part, {draw} AS o "
                         f"FROM review_faces f ANTI JOIN picked p USING (path, face_index) ORDER BY {draw} "
                         f"LIMIT {config.random}")
        picked = run_sql(con, "SELECT * EXCLUDE (part, o) FROM picked ORDER BY part, o, path, face_index")
        context = run_sql(con, "SELECT * FROM review_faces WHERE path IN (SELECT path FROM picked) "
                               "ORDER BY path, face_index")
    finally:
        con.close()
    return picked, context, classes


def _current_versions(uris: list[str], workers: int = 32) -> dict[str, str | None]:
    """The version of each object now (``None``: gone or unreadable), read concurrently."""
    def one(uri: str) -> str | None:
        try:
            return storage.info(uri).version
        except UserError:
            return None
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(uris)))) as pool:
        return dict(zip(uris, pool.map(one, uris)))


def review_copy(review_folder: str, archive: str, key: str) -> str:
    """Where the member ``key`` of ``archive`` is extracted: ``<review_folder>/<archive name>/<key>`` (``#`` of a
    repeated name's key as ``_``)."""
    return storage.join(review_folder, posixpath.basename(archive), key.replace("#", "_"))


def extract_members(archive: str, keys: set[str], review_folder: str) -> dict[str, str]:
    """Copy the members ``keys`` of ``archive`` into ``review_folder``; returns key -> copy's URI (a member that
    cannot be read is missing from it). Reads the archive once, front to back (tar) or by random access (zip)."""
    fs, path = storage.filesystem(archive)
    exts = tuple(sorted({k.rsplit(".", 1)[-1].split("#")[0].lower() for k in keys}))
    out = {}
    with storage.storage_errors(archive, "read"), fs.open(path, "rb") as f:
        reader = iter_zip if archive_kind(archive) == "zip" else iter_tar
        for m in reader(f, extensions=exts, max_bytes=1 << 31, skip=lambda k: k not in keys):
            if getattr(m, "data", None) is not None:
                out[m.key] = review_copy(review_folder, archive, m.key)
                storage.write_bytes(out[m.key], m.data)
    return out


def _photos(picked: pa.Table, context: pa.Table) -> list[dict]:
    """The picked photos in review order, each with every face and the reason each picked face was picked."""
    reasons: dict[str, dict[int, tuple[str, float]]] = defaultdict(dict)
    order: list[str] = []
    for r in picked.to_pylist():
        if r["path"] not in reasons:
            order.append(r["path"])
        reasons[r["path"]][r["face_index"]] = (r["reason"], r["margin"])
    faces: dict[str, list[dict]] = defaultdict(list)
    for r in context.to_pylist():
        faces[r["path"]].append(r)
    out = []
    for path in order:
        first = faces[path][0]
        out.append({k: first[k] for k in ("path", "archive", "member", "version", "width", "height", "run_id",
                                          "model_id")}
                   | {"faces": [{"index": f["face_index"], "box": [f["x0"], f["y0"], f["x1"], f["y1"]],
                                 "label": f["label"], "score": f["score"], "confidence": f["confidence"],
                                 "margin": f["margin"], "review": reasons[path].get(f["face_index"], (None,))[0]}
                                for f in faces[path]]})
    return out


def export_review(config: ReviewExportConfig) -> ExportSummary:
    """Pick faces and write the four files of the module docstring to ``config.output``; see there.

    Raises :class:`UserError` when nothing matches, ``--where`` is not valid SQL, an archive member is picked
    without ``--review-folder``, or ``--presign`` meets a non-S3 image.
    """
    picked, context, classes = select_faces(config)
    if not picked.num_rows:
        raise UserError(f"No scored face in {config.results!r} matches the selection; check --run-id and --where.")
    photos = _photos(picked, context)
    if any(p["member"] is not None for p in photos) and not config.review_folder:
        first = next(p["path"] for p in photos if p["member"] is not None)
        raise UserError(f"{first!r} is an archive member, which a labelling tool cannot open; pass --review-folder "
                        f"to extract the picked members into.")
    now = _current_versions(sorted({p["archive"] or p["path"] for p in photos}))
    changed = [p["path"] for p in photos if now[p["archive"] or p["path"]] != p["version"]]
    if changed:
        log.warning("%d photo(s) changed or gone since they were scored, not exported: %s", len(changed),
                    ", ".join(changed[:10]))
    photos = [p for p in photos if p["path"] not in changed]
    by_archive: dict[str, set[str]] = defaultdict(set)
    for p in photos:
        if p["member"] is not None:
            by_archive[p["archive"]].add(p["path"][len(p["archive"]) + 1:])
    copies = {}
    for archive, keys in by_archive.items():
        copies.update({f"{archive}#{k}": v for k, v in extract_members(archive, keys, config.review_folder).items()})
    for p in photos:
        p["image"] = copies.get(p["path"]) if p["member"] is not None else p["path"]
    photos = [p for p in photos if p["image"] is not None]
    expiry = None
    if config.presign:
        if warning := signing.expiry_warning(config.presign):
            log.warning("%s", warning)
        expiry = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=config.presign)).strftime(
            "%Y-%m-%d %H:%M UTC")
    names = list(dict.fromkeys(c for p in photos for c in classes.get(p["run_id"], ()))) or \
        sorted({f["label"] for p in photos for f in p["faces"]})
    tasks, records = [], []
    for p in photos:
        url = signing.presign(p["image"], config.presign) if config.presign else p["image"]
        w, h = p["width"], p["height"]
        picked_faces = [f for f in p["faces"] if f["review"]]
        regions = [labelstudio.region(f"face{f['index']}", f["box"], f["label"], w, h, f["confidence"])
                   for f in p["faces"]]
        data = {"image": url, "path": p["path"], "version": p["version"], "run_id": p["run_id"],
                "model_id": p["model_id"], "review": [{"face": f["index"], "reason": f["review"],
                                                       "margin": round(f["margin"], 4)} for f in picked_faces]}
        tasks.append({"data": data, "predictions": [{"model_version": p["model_id"], "result": regions,
                                                     "score": min(f["margin"] for f in picked_faces)}]})
        records.append(ImageBoxes(
            path=p["image"], width=w, height=h, boxes=np.asarray([f["box"] for f in p["faces"]], np.float32),
            classes=tuple(f["label"] for f in p["faces"]), labels=tuple(f["label"] for f in p["faces"]),
            attributes=tuple({"face_index": f["index"], "score": f["confidence"], "detector_score": f["score"],
                              **({"review": f["review"]} if f["review"] else {})} for f in p["faces"]),
            extra={"maskmodel_path": p["path"], "maskmodel_version": p["version"], "run_id": p["run_id"],
                   "model_id": p["model_id"]}))
    storage.write_json(storage.join(config.output, TASKS), tasks)
    storage.write_text(storage.join(config.output, CONFIG), labelstudio.labelling_config(names))
    write_coco(records, storage.join(config.output, COCO), categories=names,
               info={"description": "maskmodel review export: the model's faces", "results": config.results})
    storage.write_json(storage.join(config.output, MANIFEST), {
        "format": MANIFEST_FORMAT, "results": config.results, "classes": names,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(), "selection": {
            k: getattr(config, k) for k in ("run_id", "where", "least_confident", "alerts", "random", "seed")},
        "presigned_until": expiry, "photos": photos})
    by_reason: dict[str, int] = defaultdict(int)
    for p in photos:
        for f in p["faces"]:
            if f["review"]:
                by_reason[f["review"]] += 1
    log.info("review export: %d task(s) written to %s", len(tasks), config.output)
    return ExportSummary(output=config.output, photos=len(photos), faces=sum(by_reason.values()),
                         boxes=sum(len(p["faces"]) for p in photos), by_reason=dict(by_reason), changed=changed,
                         expiry=expiry)
