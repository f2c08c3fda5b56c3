"""``jobs.report``: one committed run next to its baseline, as a self-contained HTML page and its PNGs.

Figures and histograms come from the runs' profiles in the Delta log
(:mod:`maskmodel.results.profile`), so a report over hundreds of runs reads no
rows; only the contact sheets read rows, of the reported run alone (its
alert faces and its least confident faces, cut from the source photos now).
The page embeds its pictures as ``data:`` URIs (they are also written beside
it), loads nothing from the network and shows no configuration, credentials
or webhook URL.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from maskmodel import results
from maskmodel.config import field, resolve_paths
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.results import drift, query
from maskmodel.results import profile as prof
from maskmodel.study import report_plots

log = logging.getLogger(__name__)

#: Faces of the reported run: each face of a photo a detector found faces in, and the whole picture of a photo
#: classified without one (``--faces none``, or ``auto`` where no face was found).
FACES_SQL = """
WITH candidates AS (
    SELECT path, face.x0 AS x0, face.y0 AS y0, face.x1 AS x1, face.y1 AS y1, face.label AS label,
           face.confidence AS confidence
    FROM (SELECT path, unnest(faces) AS face FROM predictions WHERE status = 'ok' AND len(faces) > 0)
    UNION ALL
    SELECT path, NULL::FLOAT, NULL::FLOAT, NULL::FLOAT, NULL::FLOAT, label, confidence FROM predictions
    WHERE status = 'ok' AND label IS NOT NULL AND (faces IS NULL OR len(faces) = 0))
SELECT * FROM candidates WHERE {where} ORDER BY confidence {order}, path LIMIT {n}"""


@dataclass(frozen=True)
class ReportConfig:
    """``jobs.report``: a committed run's figures against a baseline, plots over the last runs, drift checks."""

    results: str = field(path=True, help="URI of the results folder (the --output of jobs.score)")
    out: str = field(path=True, help="folder for report.html, its PNGs and report.json (not inside --results)")
    run_id: str = field("", help="the run to report (default: the latest committed run)")
    baseline: tuple[str, ...] = field((), help="baseline runs (default: the --baseline-runs runs before it)")
    baseline_runs: int = field(0, help="how many runs before the reported one form the default baseline (0: the "
                                       "check file's baseline_runs, else 7)")
    history: int = field(30, help="runs shown on the plots over time")
    check: str = field("", path=True, help="URI of a drift-check file (.toml/.json); a failed check exits 3")
    sheet: bool = field(True, help="cut contact sheets of alert faces and least confident faces from the photos")
    max_tiles: int = field(24, help="faces on each contact sheet")

    def __post_init__(self) -> None:
        resolve_paths(self)
        if self.baseline_runs < 0 or self.history < 1 or self.max_tiles < 1:
            raise ValueError("--baseline-runs must be >= 0, --history and --max-tiles >= 1")
        if self.out.rstrip("/") == self.results.rstrip("/") or self.out.startswith(self.results.rstrip("/") + "/"):
            raise ValueError("--out must not be inside --results (the results folder holds only the table)")


@dataclass(frozen=True)
class ReportResult:
    html: str
    run_id: str
    baseline: tuple[str, ...]
    check: drift.CheckReport | None


def write_report(cfg: ReportConfig) -> ReportResult:
    """Write ``report.html``, its PNGs and ``report.json`` to ``cfg.out``; run the checks of ``cfg.check``.

    Raises :class:`UserError` for a bad check file, no committed run, an unknown run id, or a run
    committed without a profile.
    """
    checks = drift.load_checks(cfg.check) if cfg.check else None
    records = results.list_commits(cfg.results)
    last = cfg.baseline_runs or (checks.baseline_runs if checks else drift.DriftChecks.baseline_runs)
    run, base = drift.select_runs(records, cfg.run_id or None, cfg.baseline, last)
    if not run.raw.get("profile"):
        raise UserError(f"Run {run.run_id!r} was committed without a profile (scored by an older version); "
                        f"re-score it to report it.")
    storage.check_writable(cfg.out)
    profile = run.raw["profile"]
    base = [r for r in base if r.raw.get("profile")]
    pooled = drift.pooled([r.raw["profile"] for r in base])
    check = drift.check_records(run, base, checks) if checks else None
    upto = records.index(run) + 1
    shown = [r for r in records[:upto] if r.raw.get("profile")][-cfg.history:]
    psi = drift.psi(prof.confidence_histogram(profile), prof.confidence_histogram(pooled)) if pooled else None
    ks = drift.ks_distance(prof.confidence_histogram(profile), prof.confidence_histogram(pooled)) if pooled else None
    pngs = {
        "history.png": report_plots.history_png([(r.run_id, prof.figures(r.raw["profile"])) for r in shown],
                                                run_id=run.run_id, baseline=[r.run_id for r in base]),
        "confidence.png": report_plots.confidence_png(profile, pooled, run_id=run.run_id, psi=psi, ks=ks),
    }
    sheets: dict[str, dict] = {}
    if cfg.sheet and profile.get("ok"):
        alerts = prof.profile_alert_classes(profile)
        for name, faces in sheet_faces(cfg.results, run.run_id, alerts, cfg.max_tiles).items():
            png, layout = report_plots.face_sheet(faces, alert_classes=alerts)
            pngs[f"{name}.png"], sheets[name] = png, {**layout, "faces": len(faces)}
    for name, data in pngs.items():
        storage.write_bytes(storage.join(cfg.out, name), data)
    summary = {"run_id": run.run_id, "baseline": [r.run_id for r in base], "figures": prof.figures(profile),
               "baseline_figures": prof.figures(pooled) if pooled else None, "confidence_psi": psi, "confidence_ks": ks,
               "checks": [c.__dict__ for c in check.results] if check else None, "sheets": sheets}
    storage.write_bytes(storage.join(cfg.out, "report.json"), json.dumps(summary, indent=2, default=str).encode())
    page = render_html(run, base, profile, pooled, pngs, check=check, sheets=sheets, psi=psi, ks=ks)
    uri = storage.join(cfg.out, "report.html")
    storage.write_bytes(uri, page.encode())
    log.info("wrote the report of run %s to %s", run.run_id, uri)
    return ReportResult(uri, run.run_id, tuple(r.run_id for r in base), check)


def sheet_faces(results_uri: str, run_id: str, alert_classes: Sequence[str], n: int) -> dict[str, list[dict[str, Any]]]:
    """The reported run's ``alerts`` (most confident alert faces) and ``least_confident`` faces, at most ``n``
    each: DuckDB over that run's partition only, streaming (top-n), never the whole table in memory."""
    con = query.connect(results_uri, run_ids=[run_id])
    try:
        def rows(where: str, order: str, **params: Any) -> list[dict[str, Any]]:
            t = con.sql(FACES_SQL.format(where=where, order=order, n=int(n)), params=params).to_arrow_table()
            return [{"path": r["path"], "label": r["label"], "confidence": float(r["confidence"]),
                     "box": None if r["x0"] is None else (r["x0"], r["y0"], r["x1"], r["y1"])} for r in t.to_pylist()]

        return {"alerts": rows("list_contains($alerts, label)", "DESC", alerts=list(alert_classes)),
                "least_confident": rows("true", "ASC")}
    finally:
        con.close()


# ----------------------------------------------------------------------------- the page

ROWS = (("images", "objects", "{:,.0f}"), ("error_rate", "error rate", "{:.2%}"),
        ("verdict_rate", "alert (verdict) rate", "{:.2%}"), ("no_face_rate", "no face found", "{:.2%}"),
        ("mean_confidence", "mean confidence", "{:.3f}"), ("faces_per_photo", "faces per photo", "{:.2f}"),
        ("images_per_s", "images per second", "{:,.1f}"), ("elapsed_s", "elapsed seconds", "{:,.1f}"))

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{padding:4px 10px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}.muted{color:#777}.fail{color:#b2182b;font-weight:600}
.pass{color:#1a9850}.skip{color:#777}img{max-width:100%;border:1px solid #eee}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;color:#fff;font-weight:600}
.row{display:flex;flex-wrap:wrap;gap:0 48px;align-items:flex-start}"""


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _img(name: str, data: bytes, alt: str) -> str:
    return (f'<img id="{html.escape(name[:-4])}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')


def render_html(run, base: Sequence, profile: Mapping[str, Any], pooled: Mapping[str, Any] | None,
                pngs: Mapping[str, bytes], *, check: drift.CheckReport | None, sheets: Mapping[str, dict],
                psi: float | None, ks: float | None) -> str:
    """The report page: headline figures against the baseline, checks, plots, counts, contact sheets."""
    e = html.escape
    fig, bfig = prof.figures(profile), prof.figures(pooled) if pooled else {}
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>maskmodel run {e(run.run_id)}"
           f"</title><style>{CSS}</style></head><body>",
           f"<h1>Run {e(run.run_id)}</h1><div class='muted'>committed {e(run.committed_at or '?')} as Delta version "
           f"{run.version}; model {e(str(run.raw.get('model_id', '?')))}; faces {e(str(run.raw.get('faces', '?')))}; "
           f"report made {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC</div>"]
    if check is not None:
        color = "#b2182b" if check.failed else "#1a9850"
        out.append(f"<h2>Checks <span class='badge' style='background:{color}'>"
                   f"{len(check.failed)} failed</span></h2><table>")
        for r in check.results:
            out.append(f"<tr><td class='{ {'failed': 'fail', 'passed': 'pass'}.get(r.status, 'skip')}'>"
                       f"{e(r.status)}</td><td style='text-align:left'>{e(r.line)}</td></tr>")
        out.append("</table>")
    names = ", ".join(r.run_id for r in base) or "none (no earlier run with a profile)"
    out.append("<div class='row'><div>")
    out.append(f"<h2>This run against the baseline</h2><div class='muted'>baseline (pooled): {e(names)}</div>"
               "<table><tr><th></th><th>this run</th><th>baseline</th><th>change</th></tr>")
    for key, label, pattern in ROWS:
        a, b = fig.get(key), bfig.get(key)
        change = "" if a is None or b is None or key in ("images", "elapsed_s") else \
            (f"{(a - b) * 100:+.2f} pp" if "%" in pattern else f"{a - b:+.3g}")
        out.append(f"<tr><td>{label}</td><td>{_fmt(a, pattern)}</td><td>{_fmt(b, pattern)}</td><td>{change}</td></tr>")
    if psi is not None and ks is not None:
        out.append(f"<tr><td>confidence PSI / KS</td><td></td><td></td><td>{psi:.3f} / {ks:.3f}</td></tr>")
    out.append("</table></div><div><h2>Counts</h2>" + _counts(profile, pooled) + "</div></div>")
    out.append("<h2>Over the last runs</h2>" + _img("history.png", pngs["history.png"],
                                                   "verdict rate, error rate and mean confidence per run"))
    out.append("<h2>Confidence against the baseline</h2>" + _img("confidence.png", pngs["confidence.png"],
                                                                 "confidence histogram"))
    for name, title in (("alerts", "Faces behind alerts (most confident first)"),
                        ("least_confident", "Least confident faces")):
        if f"{name}.png" in pngs:
            gone = sheets[name].get("unreadable", 0)
            note = f" <span class='muted'>({gone} no longer readable)</span>" if gone else ""
            out.append(f"<h2>{title}{note}</h2>" + _img(f"{name}.png", pngs[f"{name}.png"], title))
    cost = profile.get("cost") or {}
    if cost:
        out.append("<h2>Cost inputs</h2><table>" + "".join(
            f"<tr><td>{e(k)}</td><td>{v:,.2f}</td></tr>" if isinstance(v, float) and not v.is_integer() else
            f"<tr><td>{e(k)}</td><td>{int(v):,}</td></tr>" for k, v in cost.items() if isinstance(v, (int, float)))
            + "</table><div class='muted'>cost per 1,000 photos: <code>SELECT (cluster_cpu_s * cpu_price + "
              "cluster_gpu_s * gpu_price) / 3600 / images * 1000 FROM runs</code> (jobs.query)</div>")
    out.append("</body></html>")
    return "\n".join(out)


def _counts(p: Mapping[str, Any], base: Mapping[str, Any] | None) -> str:
    e = html.escape
    rows = [("photos by verdict", p.get("labels", {}), (base or {}).get("labels", {})),
            ("errors by reason", p.get("error_reasons", {}), (base or {}).get("error_reasons", {})),
            ("faces by label", p.get("face_labels", {}), (base or {}).get("face_labels", {}))]
    out = ["<table><tr><th></th><th>this run</th><th>baseline</th></tr>"]
    for title, mine, theirs in rows:
        for key in sorted(set(mine) | set(theirs)):
            out.append(f"<tr><td>{title}: {e(str(key))}</td><td>{mine.get(key, 0):,}</td>"
                       f"<td>{theirs.get(key, 0):,}</td></tr>")
    faces = p.get("faces_per_photo") or []
    if any(faces):
        out.append("<tr><td>faces per photo (0, 1, 2, ... 8+)</td><td colspan=2>"
                   + " / ".join(f"{v:,}" for v in faces) + "</td></tr>")
    return "".join(out) + "</table>"
