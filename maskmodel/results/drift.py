"""Drift checks: a run's profile against thresholds and a baseline of earlier runs, and the alert when one fails.

Everything here reads run profiles (:mod:`maskmodel.results.profile`) from the
Delta log, never the rows, so checking a run costs the same whatever its size.
The checks are declared in a small TOML or JSON file of flat keys (every key
optional; a check whose key is absent does not run)::

    baseline_runs = 7              # baseline: the 7 runs committed before the checked one (pooled)
    label = "no_mask"              # the rate watched (default: the alert rate, over all the model's alert classes)
    max_label_rate_change = 0.10   # |rate - baseline rate| above this fails
    max_label_rate_z = 3.0         # |two-proportion z| above this fails (the change is not chance)
    max_confidence_psi = 0.25      # population stability index of the confidence histogram (fixed bins)
    max_confidence_ks = 0.15       # Kolmogorov-Smirnov distance of the same histograms (largest CDF gap)
    max_error_rate = 0.05          # error rows / objects
    max_no_face_rate = 0.30        # photos with no face found / ok photos through a detector
    min_images_per_s = 5.0         # throughput floor
    webhook = "https://hooks.example.com/T000/B000"   # optional: a JSON POST when a check fails
    webhook_timeout_s = 5.0

A check that needs a baseline (label rate, confidence) and has none (the first
run) or a rate over no photos is reported as skipped, not failed. A failed
check is exit code :data:`maskmodel.runtime.cli.EXIT_CHECK_FAILED` in ``jobs.score``
and ``jobs.report``. The webhook never fails the run: any error (refused,
HTTP error, slow: bounded by ``webhook_timeout_s``) is a warning.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.results import profile as prof
from maskmodel.results.commit import CommitRecord

log = logging.getLogger(__name__)

#: Shares below this count as this in the PSI (an empty bin would make it infinite); with it, a bin the
#: baseline never saw weighs ln(share / 1e-4), so a small night reads as a large shift (the KS distance does not).
PSI_FLOOR = 1e-4


@dataclass(frozen=True)
class DriftChecks:
    """The thresholds of a check file (see the module docstring); ``None`` turns a check off."""

    baseline_runs: int = 7
    label: str | None = None
    max_label_rate_change: float | None = None
    max_label_rate_z: float | None = None
    max_confidence_psi: float | None = None
    max_confidence_ks: float | None = None
    max_error_rate: float | None = None
    max_no_face_rate: float | None = None
    min_images_per_s: float | None = None
    webhook: str = ""
    webhook_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.baseline_runs < 1:
            raise ValueError(f"baseline_runs must be >= 1, got {self.baseline_runs}")
        if not 0 < self.webhook_timeout_s <= 60:
            raise ValueError(f"webhook_timeout_s must be in (0, 60] seconds, got {self.webhook_timeout_s}")
        if self.webhook and urllib.parse.urlsplit(self.webhook).scheme not in ("http", "https"):
            raise ValueError("webhook must be an http:// or https:// URL")


def load_checks(uri: str) -> DriftChecks:
    """The checks of a ``.toml`` or ``.json`` file (any storage URI); :class:`UserError` for anything wrong with it."""
    data = storage.read_bytes(uri)
    try:
        raw = json.loads(data) if uri.lower().endswith(".json") else tomllib.loads(data.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"Check file {uri!r} is not valid {'JSON' if uri.endswith('.json') else 'TOML'} "
                        f"({str(e).splitlines()[0]}); fix it.") from e
    if not isinstance(raw, dict):
        raise UserError(f"Check file {uri!r} must hold one table of keys; fix it.")
    known = {f.name: f for f in fields(DriftChecks)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise UserError(f"Check file {uri!r} has unknown key {unknown[0]!r}; known keys: {', '.join(known)}.")
    try:
        for key, value in raw.items():
            want = str if key in ("label", "webhook") else int if key == "baseline_runs" else float
            if not isinstance(value, want) and not (want is float and isinstance(value, int)) \
                    or isinstance(value, bool):
                raise ValueError(f"{key} must be a {want.__name__}, got {value!r}")
        return DriftChecks(**{k: float(v) if isinstance(v, int) and k != "baseline_runs" else v
                              for k, v in raw.items()})
    except ValueError as e:
        raise UserError(f"Check file {uri!r}: {e}.") from e


@dataclass(frozen=True)
class CheckResult:
    """One check of one run: ``status`` is ``passed``, ``failed`` or ``skipped``; ``line`` says it with the numbers."""

    name: str
    status: str
    value: float | None
    limit: float | None
    line: str


@dataclass(frozen=True)
class CheckReport:
    run_id: str
    baseline: tuple[str, ...]
    results: tuple[CheckResult, ...]

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "failed"]

    def lines(self) -> list[str]:
        """One line per failed check (``CHECK FAILED run <id>: ...``), else one line saying all passed."""
        if self.failed:
            return [f"CHECK FAILED run {self.run_id}: {r.line}" for r in self.failed]
        ran = sum(r.status == "passed" for r in self.results)
        return [f"checks passed for run {self.run_id}: {ran} passed, {len(self.results) - ran} skipped "
                f"(baseline: {', '.join(self.baseline) or 'none'})"]


def select_runs(records: Sequence[CommitRecord], run_id: str | None, baseline: Sequence[str] = (),
                last: int = 7) -> tuple[CommitRecord, list[CommitRecord]]:
    """The run to look at (``run_id``, default the latest commit) and its baseline.

    The baseline is the runs named in ``baseline``, else the ``last`` runs committed before it. Raises
    :class:`UserError` for a run id that is not committed, or a table without runs.
    """
    if not records:
        raise UserError("The results hold no committed run; run jobs.score first.")
    by_id = {r.run_id: r for r in records}
    for name in (run_id, *baseline):
        if name and name not in by_id:
            raise UserError(f"No committed run {name!r} in the results; committed runs: "
                            f"{', '.join(r.run_id for r in records[-10:])}{' ...' if len(records) > 10 else ''}.")
    run = by_id[run_id] if run_id else records[-1]
    if baseline:
        return run, [by_id[b] for b in baseline if b != run.run_id]
    before = list(records[:list(records).index(run)])  # records come oldest commit first
    return run, before[-last:]


def pooled(profiles: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The profiles folded into one (the baseline's pooled counts); ``None`` for none."""
    out = None
    for p in profiles:
        out = dict(p) if out is None else prof.merge(out, p)
    return out


def psi(actual: np.ndarray, expected: np.ndarray) -> float | None:
    """Population stability index of two histograms over the same bins; ``None`` when either is empty."""
    if actual.sum() <= 0 or expected.sum() <= 0:
        return None
    a = np.maximum(actual / actual.sum(), PSI_FLOOR)
    e = np.maximum(expected / expected.sum(), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_distance(actual: np.ndarray, expected: np.ndarray) -> float | None:
    """Kolmogorov-Smirnov distance of two histograms over the same bins: the largest gap between their
    cumulative shares at the bin edges, in [0, 1]; ``None`` when either is empty. Unlike the PSI it needs no
    smoothing, so a small night whose photos fall in bins the baseline never saw is not a huge shift."""
    if actual.sum() <= 0 or expected.sum() <= 0:
        return None
    return float(np.max(np.abs(np.cumsum(actual) / actual.sum() - np.cumsum(expected) / expected.sum())))


def two_proportion_z(x1: int, n1: int, x0: int, n0: int) -> float | None:
    """The two-proportion z statistic of x1/n1 against x0/n0 (pooled variance); ``None`` when undefined."""
    if not n1 or not n0:
        return None
    p = (x1 + x0) / (n1 + n0)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n0))
    return 0.0 if se == 0 else (x1 / n1 - x0 / n0) / se


def evaluate(checks: DriftChecks, run: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> list[CheckResult]:
    """Every configured check of profile ``run`` against the pooled ``baseline`` profile (or none)."""
    out: list[CheckResult] = []
    # The watched rate: one label's when the checks name it, else the alert (verdict) rate over all alert classes.
    watched = [checks.label] if checks.label else prof.profile_alert_classes(run)
    label = watched[0] if len(watched) == 1 else f"alert ({', '.join(watched)})"
    x1, n1 = sum(run.get("labels", {}).get(c, 0) for c in watched), sum(run.get("labels", {}).values())
    x0, n0 = (sum(baseline.get("labels", {}).get(c, 0) for c in watched), sum(baseline.get("labels", {}).values())) \
        if baseline else (0, 0)
    r1, r0 = (x1 / n1 if n1 else None), (x0 / n0 if n0 else None)

    def add(name: str, value: float | None, limit: float | None, fails: bool, text: str, why: str = "") -> None:
        if limit is None:
            return
        if value is None:
            out.append(CheckResult(name, "skipped", None, limit, f"{name}: skipped ({why})"))
        else:
            out.append(CheckResult(name, "failed" if fails else "passed", value, limit, f"{name}: {text}"))

    rates = f"{label} rate {_f(r1)} ({x1}/{n1}) vs baseline {_f(r0)} ({x0}/{n0})"
    no_rate = "no baseline runs" if not baseline else "a rate over no photos"
    change = None if r1 is None or r0 is None else r1 - r0
    lim = checks.max_label_rate_change
    add("label_rate_change", change, lim, change is not None and lim is not None and abs(change) > lim,
        f"{rates}, change {_f(change, sign=True)} (limit {_f(lim)})", no_rate)
    z = None if r1 is None or r0 is None else two_proportion_z(x1, n1, x0, n0)
    lim = checks.max_label_rate_z
    add("label_rate_z", z, lim, z is not None and lim is not None and abs(z) > lim,
        f"{rates}, two-proportion z {_f(z, 2, sign=True)} (limit |z| {_f(lim, 2)})", no_rate)
    value = psi(prof.confidence_histogram(run), prof.confidence_histogram(baseline)) if baseline else None
    lim = checks.max_confidence_psi
    add("confidence_psi", value, lim, value is not None and lim is not None and value > lim,
        f"confidence PSI {_f(value)} over {run.get('confidence_bins')} bins vs baseline (limit {_f(lim)})",
        "no baseline runs" if not baseline else "no photo with a verdict")
    value = ks_distance(prof.confidence_histogram(run), prof.confidence_histogram(baseline)) if baseline else None
    lim = checks.max_confidence_ks
    add("confidence_ks", value, lim, value is not None and lim is not None and value > lim,
        f"confidence KS distance {_f(value)} over {run.get('confidence_bins')} bins vs baseline (limit {_f(lim)})",
        "no baseline runs" if not baseline else "no photo with a verdict")
    fig = prof.figures(run)
    for name, key, lim, what in (("error_rate", "error_rate", checks.max_error_rate,
                                  f"{run.get('errors', 0)}/{run.get('images', 0)} objects"),
                                 ("no_face_rate", "no_face_rate", checks.max_no_face_rate,
                                  f"{run.get('no_face', 0)}/{run.get('photos_with_faces', 0)} "
                                  f"photos through a detector")):
        add(name, fig[key], lim, fig[key] is not None and lim is not None and fig[key] > lim,
            f"{_f(fig[key])} ({what}) above the ceiling {_f(lim)}" if fig[key] is not None and lim is not None
            and fig[key] > lim else f"{_f(fig[key])} ({what}), ceiling {_f(lim)}", "a rate over no objects")
    rate, lim = fig["images_per_s"], checks.min_images_per_s
    add("throughput", rate, lim, rate is not None and lim is not None and rate < lim,
        f"{_f(rate, 2)} images/s ({run.get('images', 0)} in {_f(run.get('elapsed_s'), 1)} s), floor {_f(lim, 2)}",
        "no images scored")
    return out


def _f(v: float | None, digits: int = 3, *, sign: bool = False) -> str:
    return "n/a" if v is None else f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def check_run(records: Sequence[CommitRecord], checks: DriftChecks, *, run_id: str | None = None,
              baseline: Sequence[str] = ()) -> CheckReport:
    """Check a committed run (default: the latest) against ``checks``; raises :class:`UserError` for an unknown
    run id or a run committed without a profile."""
    run, base = select_runs(records, run_id, baseline, checks.baseline_runs)
    return check_records(run, base, checks)


def check_records(run: CommitRecord, base: Sequence[CommitRecord], checks: DriftChecks) -> CheckReport:
    """:func:`check_run` with the run and its baseline chosen (runs without a profile in ``base`` are left out)."""
    if not run.raw.get("profile"):
        raise UserError(f"Run {run.run_id!r} was committed without a profile (scored by an older version); "
                        f"re-score it to check it.")
    base = [r for r in base if r.raw.get("profile")]
    report = CheckReport(run.run_id, tuple(r.run_id for r in base),
                         tuple(evaluate(checks, run.raw["profile"], pooled([r.raw["profile"] for r in base]))))
    if report.failed and checks.webhook:
        post_webhook(checks.webhook, alert_payload(report, run.raw["profile"]), timeout_s=checks.webhook_timeout_s)
    return report


def alert_payload(report: CheckReport, profile: Mapping[str, Any]) -> dict[str, Any]:
    """The webhook's JSON body: the run, its failed checks with their numbers, and its headline figures."""
    return {"run_id": report.run_id, "baseline": list(report.baseline), "failed": len(report.failed),
            "text": "\n".join(report.lines()), "checks": [asdict(r) for r in report.results],
            "figures": prof.figures(profile)}


def post_webhook(url: str, payload: Mapping[str, Any], *, timeout_s: float) -> bool:
    """POST ``payload`` as JSON to ``url``; ``True`` on a 2xx answer. Never raises: a failure is a warning.

    ``timeout_s`` bounds the connection and each read, and the whole exchange takes at most twice that:
    a server that answers byte by byte is left behind (in a daemon thread). The URL may carry a token, so
    only its host is logged.
    """
    host = urllib.parse.urlsplit(url).netloc.rsplit("@", 1)[-1]
    outcome: list[str | None] = []  # the worker's failure, or None for delivered; logged here, never after
    worker = threading.Thread(target=lambda: outcome.append(_post(url, payload, timeout_s)), daemon=True,
                              name="webhook")
    worker.start()
    worker.join(2 * timeout_s)
    failure = outcome[0] if outcome else f"no answer within {2 * timeout_s:.1f} s"
    if failure is None:
        log.info("alert posted to the webhook at %s", host)
        return True
    log.warning("the webhook at %s %s; the alert was not delivered", host, failure)
    return False


def _post(url: str, payload: Mapping[str, Any], timeout_s: float) -> str | None:
    """POST and read the answer; ``None`` when delivered (2xx), else what went wrong (no URL in it)."""
    request = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:  # noqa: S310 - http(s) checked on load
            answer.read(1024)
        return None
    except urllib.error.HTTPError as e:
        return f"answered HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:  # refused, unresolvable, timed out
        return f"could not be reached ({getattr(e, 'reason', e)})"
