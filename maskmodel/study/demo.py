"""The demo's own pieces that are not one of the jobs: the shifted second night and the scene-faces line.

``jobs.demo`` (``make demo``) calls these after training and scoring; each uses the real jobs' library
functions (scoring, the run report, the detection evaluation), so what the demo prints is what they give.
"""

from __future__ import annotations

from maskmodel.io import storage
from maskmodel.runtime import cli


#: The demo's drift checks (docs/watching-runs.md): what the shifted night fails.
DEMO_CHECKS = """\
max_label_rate_change = 0.10
max_label_rate_z = 3.0
max_confidence_ks = 0.15
max_error_rate = 0.05
max_no_face_rate = 0.50
"""
#: What the demo writes under its --out besides the data, each with the file that marks it as the demo's own.
DEMO_ENTRIES = {"train": "train_config.json", "detector": "train_config.json", "scores": "_delta_log",
                "scene_faces": "boxes_scene.png", "night-2": "uploads", "report": "report.html", "checks.toml": None}


def forget_earlier_runs(out: str) -> list[str]:
    """Delete the demo's earlier runs under ``out`` (when its data is drawn again: else training would resume
    the older data's finished run and scoring add to its table); returns the entries deleted. Only entries that
    hold the demo's marker file (``checks.toml``: the demo's own text) go; anything else stays."""
    gone = []
    for name, marker in DEMO_ENTRIES.items():
        uri = storage.join(out, name)
        ours = (storage.exists(storage.join(uri, marker)) if marker else
                storage.exists(uri) and storage.read_bytes(uri) == DEMO_CHECKS.encode())
        if ours:
            storage.delete(uri)
            gone.append(name)
    return gone


#: The shifted night: scenes by picture verdict (three in four with an unmasked face), and truncated uploads.
NIGHT_SCENES = {"no_mask": 30, "mask": 10}
NIGHT_TRUNCATED = 4


def shifted_night(out: str, scene_size: int, model: str, faces: str, scores: str) -> str:
    """Draw and score the shifted night (run ``night-2``), report it against run ``scene`` and check it; the
    lines to print: the run, each failed check, the report's path."""
    from maskmodel.data.synth import render_scene_sample
    from maskmodel.score import scoring
    from maskmodel.study.run_report import ReportConfig, write_report

    night = storage.join(out, "night-2")
    for label, n in NIGHT_SCENES.items():  # new pictures: another seed than the dataset's scenes
        for i in range(n):
            scene = render_scene_sample(label, i, size=scene_size, seed=2, split="scene")
            storage.write_bytes(storage.join(night, label, f"{i:06d}.jpg"), _jpeg(scene.image, scene.jpeg_quality))
    for i in range(NIGHT_TRUNCATED):  # uploads cut short: error rows, not a crash
        data = _jpeg(render_scene_sample("mask", 100 + i, size=scene_size, seed=2).image, 90)
        storage.write_bytes(storage.join(night, "uploads", f"cut-{i}.jpg"), data[: len(data) * 2 // 5])
    res = scoring.score(scoring.ScoreConfig(input=night, model=model, output=scores, run_id="night-2", faces=faces))
    checks = storage.join(out, "checks.toml")
    storage.write_bytes(checks, DEMO_CHECKS.encode())
    report = write_report(ReportConfig(results=scores, out=storage.join(out, "report"), run_id="night-2",
                                       baseline=("scene",), check=checks))
    lines = [f"\nnight-2 (shifted): {res.summary_line()}", *report.check.lines(),
             f"report of night-2 against scene: {report.html}",
             f"(jobs.report --check exits {cli.EXIT_CHECK_FAILED} on a failed check: python -m jobs.report --results "
             f"{scores} --run-id night-2 --baseline scene --check {checks} --out {out}/report)"]
    return "\n".join(lines)


def _jpeg(image, quality: int) -> bytes:
    import io

    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


#: Per run (split): images, the class accuracy (the row's label against its folder) and the photo verdict accuracy
#: (:func:`maskmodel.metrics.classification.verdict_accuracy`'s definition: the row's ``alert`` verdict against
#: the folder's alert-ness; an error row is wrong, an ok row without a face found is "no alert").
SPLIT_SQL = """
SELECT run_id AS split, count(*) AS images,
       round(avg(CASE WHEN status = 'ok' AND label = regexp_extract(path, '/([^/]+)/[^/]+$', 1) THEN 1 ELSE 0 END),
             3) AS accuracy,
       round(avg(CASE WHEN status = 'ok' AND coalesce(alert, list_contains($alerts, label), false)
                           = list_contains($alerts, regexp_extract(path, '/([^/]+)/[^/]+$', 1)) THEN 1 ELSE 0 END),
             3) AS verdict_accuracy
FROM predictions WHERE list_contains($classes, regexp_extract(path, '/([^/]+)/[^/]+$', 1))
GROUP BY run_id ORDER BY run_id DESC
"""


def split_table(scores: str, classes, alert_classes):
    """:data:`SPLIT_SQL` over the committed runs of ``scores`` (rows whose folder is one of ``classes``)."""
    from maskmodel.results import query

    con = query.connect(scores)
    try:
        return con.sql(SPLIT_SQL, params={"alerts": list(alert_classes), "classes": list(classes)}).to_arrow_table()
    finally:
        con.close()


#: Per class of the ``test`` run (faces cut as the face stage cuts them, scored whole): rows and rows right.
TEST_CLASS_SQL = """
SELECT regexp_extract(path, '/([^/]+)/[^/]+$', 1) AS truth, count(*) AS faces,
       sum(CASE WHEN status = 'ok' AND label = regexp_extract(path, '/([^/]+)/[^/]+$', 1) THEN 1 ELSE 0 END) AS right
FROM predictions WHERE run_id = $run GROUP BY ALL
"""


def face_accuracy_table(scene: dict, scores: str, classes, *, run_id: str = "test") -> str:
    """Three-class per-face accuracy on the scene faces found (``scene``: :func:`evaluate_detection`'s section)
    next to run ``run_id``'s faces (``test``: cut alike, scored whole), per class (recall), their mean
    (balanced: the class mix does not move it), over all faces (it does: the scenes hold more masked faces,
    the easiest class) and at the scene faces' class mix (each class's recall weighted by its share of the
    scene faces found: what agrees when the faces are cut alike)."""
    from maskmodel.results import query

    con = query.connect(scores)
    try:
        rows = con.sql(TEST_CLASS_SQL, params={"run": run_id}).fetchall()
    finally:
        con.close()
    test = {truth: (int(right), int(n)) for truth, n, right in rows}
    both = {"scene faces found": {c: (v["right"], v["classified"]) for c, v in scene["by_class"].items()},
            f"{run_id} faces": {c: test.get(c, (0, 0)) for c in classes}}

    def ratio(k: int, n: int) -> str:
        return f"{k / n:.3f} ({n})" if n else "n/a"

    lines = [f"{'three-class per-face accuracy':<30}" + "".join(f"{name:>20}" for name in both)]
    for c in classes:
        lines.append(f"{c:<30}" + "".join(f"{ratio(*per[c]):>20}" for per in both.values()))
    found = both["scene faces found"]
    mix = {c: n / max(1, sum(n for _, n in found.values())) for c, (_, n) in found.items()}
    for label, pick in (("balanced (mean of the classes)", "mean"), ("all faces (own class mix)", "all"),
                        ("at the scene faces' class mix", "mix")):
        cells = []
        for per in both.values():
            got = [(k, n) for k, n in per.values() if n]
            if not got:
                value = None
            elif pick == "mean":
                value = sum(k / n for k, n in got) / len(got)
            elif pick == "all":
                value = sum(k for k, _ in got) / sum(n for _, n in got)
            else:  # each class's recall weighted by its share of the scene faces: the same mix on both sides
                value = (sum(mix[c] * k / n for c, (k, n) in per.items() if n)
                         if all(per[c][1] for c in mix if mix[c]) else None)
            cells.append("n/a" if value is None else f"{value:.3f}")
        lines.append(f"{label:<30}" + "".join(f"{v:>20}" for v in cells))
    return "\n".join(lines)


def scene_faces_line(data: str, scores: str, card, output: str, *, run_id: str = "scene",
                     compare_with: str | None = None) -> str:
    """The scene run's faces (run ``run_id``) against ``scene.coco.json``: detection recall/precision and per-face
    accuracy (the photo verdict accuracy is the split table's, the same definition, so it is not printed twice);
    with ``compare_with`` (a run of faces scored whole), :func:`face_accuracy_table` below it."""
    from maskmodel.data.synth import SCENE_ANNOTATIONS
    from maskmodel.results import read_results
    from maskmodel.study.detection_report import evaluate_detection

    table = read_results(scores, [run_id])
    s = evaluate_detection(table, storage.join(data, SCENE_ANNOTATIONS), table.column("path").to_pylist(),
                           list(card.classes), card.alert_classes, iou=0.5, max_tiles=48, output=output,
                           split="scene")
    if not s["available"]:
        return f"scene faces: {s['reason']}"

    def pct(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"
    return (f"scene faces: detection recall {pct(s['recall'])}, precision {pct(s['precision'])} at IoU 0.5 "
            f"({s['faces']} annotated faces); per-face accuracy {pct(s['face_accuracy'])} on {s['classified']} "
            f"matched faces; boxed pictures: {output}/boxes_scene.png"
            + (f"\n{face_accuracy_table(s, scores, card.classes, run_id=compare_with)}" if compare_with else ""))
