"""Run profiles: the fold of result batches gives exact counts on known mixes, whatever the batching."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from maskmodel import results
from maskmodel.results import profile as prof
from maskmodel.results import query

CLASSES = ("mask", "no_mask")
SCHEMA = results.results_schema(CLASSES)


def face(label: str, conf: float) -> dict:
    return {"x0": 0.0, "y0": 0.0, "x1": 10.0, "y1": 10.0, "score": 0.9, "label": label, "confidence": conf,
            "probs": [conf, 1 - conf] if label == "mask" else [1 - conf, conf]}


def row(i: int, *, status="ok", error=None, label=None, conf=None, faces=None, w=1920, h=1080, size=1000) -> dict:
    return {"path": f"s3://b/p{i}.jpg", "status": status, "error": error, "label": label, "confidence": conf,
            "faces": faces, "faces_found": None if faces is None else len(faces), "width": w if status == "ok" else None,
            "height": h if status == "ok" else None, "size": size, "model_id": "m", "run_id": "r",
            "scored_at": results.utc_now()}


def known_mix() -> pa.Table:
    """10 photos: 4 mask (conf .91, .93, .62, .97), 3 no_mask (.81 twice, .55), 1 no face, 2 errors."""
    rows = [
        row(0, label="mask", conf=0.91, faces=[face("mask", 0.91)]),
        row(1, label="mask", conf=0.93, faces=[face("mask", 0.93), face("mask", 0.88)]),
        row(2, label="mask", conf=0.62, faces=[face("mask", 0.62)], w=640, h=480),
        row(3, label="mask", conf=0.97, faces=[face("mask", 0.97)] * 9, w=300, h=4000),
        row(4, label="no_mask", conf=0.81, faces=[face("no_mask", 0.81), face("mask", 0.7)]),
        row(5, label="no_mask", conf=0.81, faces=[face("no_mask", 0.81)]),
        row(6, label="no_mask", conf=0.55, faces=[face("no_mask", 0.55)], w=200, h=100),
        row(7, faces=[]),
        row(8, status="error", error="undecodable: not a JPEG", size=17),
        row(9, status="error", error="unreadable: not found", size=None),
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def test_the_profile_of_a_known_mix_is_exact():
    p = prof.batch_profile(known_mix(), alert_classes=("no_mask",))
    assert (p["images"], p["ok"], p["errors"]) == (10, 8, 2)
    assert p["error_reasons"] == {"undecodable": 1, "unreadable": 1}
    assert p["labels"] == {"mask": 4, "no_mask": 3} and p["alerts"] == 3 and p["no_face"] == 1
    assert p["faces"] == 1 + 2 + 1 + 9 + 2 + 1 + 1 + 0 and p["photos_with_faces"] == 8
    assert p["faces_per_photo"] == [1, 4, 2, 0, 0, 0, 0, 0, 1]  # nine faces land in the open "8 or more" bin
    assert p["face_labels"] == {"mask": 1 + 2 + 1 + 9 + 1, "no_mask": 3}
    # 20 bins of 0.05: .91 -> 18, .93 -> 18, .62 -> 12, .97 -> 19; .81 -> 16 twice, .55 -> 11
    mask = [0] * 20
    mask[18], mask[12], mask[19] = 2, 1, 1
    no_mask = [0] * 20
    no_mask[16], no_mask[11] = 2, 1
    assert p["confidence"] == {"mask": mask, "no_mask": no_mask}
    assert p["confidence_sum"]["mask"] == pytest.approx(0.91 + 0.93 + 0.62 + 0.97, abs=1e-6)
    # longer sides: 1920 five times (no-face photo too), 640, 4000, 200: bins 0, 256, 512, 1024, 2048, 4096
    assert p["sizes"] == [1, 0, 1, 5, 1, 0]
    assert p["pixels"] == 5 * 1920 * 1080 + 640 * 480 + 300 * 4000 + 200 * 100
    assert p["bytes"] == 8 * 1000 + 17  # the unreadable object has no size
    f = prof.figures(p)
    assert f["error_rate"] == 0.2 and f["verdict_rate"] == pytest.approx(3 / 7)
    assert f["no_face_rate"] == 1 / 8 and f["faces_per_photo"] == 17 / 8
    assert f["mean_confidence"] == pytest.approx((0.91 + 0.93 + 0.62 + 0.97 + 0.81 + 0.81 + 0.55) / 7, abs=1e-6)


@pytest.mark.parametrize("cuts", [(1,), (3, 7), (0, 5, 5, 10), tuple(range(1, 10))])
def test_folding_partial_profiles_equals_the_whole(cuts):
    table = known_mix()
    whole = prof.batch_profile(table, alert_classes=("no_mask",))
    fold = prof.RunProfile(alert_classes=("no_mask",))
    edges = (0, *cuts, table.num_rows)
    for a, b in zip(edges, edges[1:]):
        fold.update(table.slice(a, b - a))
    got = fold.profile
    assert {k: v for k, v in got.items() if k != "confidence_sum"} == \
        {k: v for k, v in whole.items() if k != "confidence_sum"}
    assert got["confidence_sum"] == pytest.approx(whole["confidence_sum"])


def test_a_run_without_faces_and_the_empty_run():
    whole = pa.Table.from_pylist([row(0, label="mask", conf=0.99), row(1, label="no_mask", conf=0.5)], schema=SCHEMA)
    p = prof.batch_profile(whole, alert_classes=("no_mask",))
    assert p["photos_with_faces"] == 0 and p["faces_per_photo"] == [0] * 9 and p["no_face"] == 0
    assert prof.figures(p)["faces_per_photo"] is None and prof.figures(p)["verdict_rate"] == 0.5
    empty = prof.RunProfile(alert_classes=("no_mask",)).finish(elapsed_s=0.0, cost={})
    assert empty["images"] == 0 and empty["images_per_s"] is None
    assert all(v is None for k, v in prof.figures(empty).items() if k not in ("images", "elapsed_s"))


def test_profiles_of_other_bins_do_not_merge():
    a = prof.empty_profile(("no_mask",))
    with pytest.raises(ValueError, match="confidence_bins"):
        prof.merge(a, {**a, "confidence_bins": 10})


def test_the_runs_view_reads_the_profile_from_the_commit_and_sql_gives_cost_per_1000(tmp_path):
    out = str(tmp_path / "out")
    table = known_mix()
    fold = prof.RunProfile(alert_classes=("no_mask",))
    fold.update(table)
    p = fold.finish(elapsed_s=4.0, cost={"cluster_cpu_s": 8.0, "cluster_gpu_s": 0.0, "gpus": 0, "actors": 2})
    writer = results.AttemptWriter(out, "r", SCHEMA)
    writer.write(table)
    results.commit(writer, meta={"counts": {"images": 10, "ok": 8, "errors": 2}, "model_id": "m", "profile": p})
    got = query.query(out, "SELECT alerts, verdict_rate, error_rate, no_face_rate, images_per_s, "
                           "cluster_cpu_s / 3600 * 0.05 / images * 1000 AS usd_per_1000, profile FROM runs")
    r = got.to_pylist()[0]
    assert r["alerts"] == 3 and r["verdict_rate"] == pytest.approx(3 / 7) and r["error_rate"] == 0.2
    assert r["no_face_rate"] == 0.125 and r["images_per_s"] == 2.5
    assert r["usd_per_1000"] == pytest.approx(8.0 / 3600 * 0.05 / 10 * 1000)
    assert json.loads(r["profile"])["labels"] == {"mask": 4, "no_mask": 3}


def _close(a, b) -> bool:
    """``a == b`` for JSON values, floats compared to 1e-12 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    return a == b


def test_compaction_and_vacuum_keep_the_runs_profile(tmp_path):
    from maskmodel.results.maintenance import MaintainConfig, maintain

    out = str(tmp_path / "out")
    table = known_mix()
    fold = prof.RunProfile(alert_classes=("no_mask",))
    fold.update(table)
    p = fold.finish(elapsed_s=2.0, cost={})
    writer = results.AttemptWriter(out, "r", SCHEMA, rows_per_file=2)  # five small files: compaction rewrites them
    writer.write(table)
    results.commit(writer, meta={"counts": {"images": 10}, "model_id": "m", "profile": p})
    done = maintain(MaintainConfig(results=out, retention_hours=0))
    (record,) = results.list_commits(out)
    assert len(record.files) == 1 and done.summary_line()  # compacted: one file now, in a maintenance commit
    # Equal up to the last bit of a float: the log's JSON is re-read by another parser on the way (0.002786092001770158
    # came back once as 0.0027860920017701574, one ulp apart).
    assert _close(record.raw["profile"], json.loads(json.dumps(p)))
    assert query.query(out, "SELECT alerts FROM runs").to_pylist() == [{"alerts": 3}]
