"""Drift checks: thresholds against a baseline of run profiles, the exit code and lines, the webhook that never hangs."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

from maskmodel import results
from maskmodel.runtime import cli
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.results import drift
from maskmodel.results import profile as prof

CHECKS = drift.DriftChecks(max_label_rate_change=0.1, max_label_rate_z=3.0, max_confidence_psi=0.25,
                           max_confidence_ks=0.15, max_error_rate=0.05, max_no_face_rate=0.3, min_images_per_s=5.0)


def night(*, mask: int, no_mask: int, errors: int = 0, no_face: int = 0, conf_bin: int = 18,
          seconds: float = 10.0) -> dict:
    """A profile of ``mask`` + ``no_mask`` photos with a verdict (all confidences in one bin), plus errors and
    photos without a face."""
    p = prof.empty_profile(("no_mask",))
    ok = mask + no_mask + no_face
    hist = [0] * prof.CONFIDENCE_BINS
    hist[conf_bin] = 1
    p.update(images=ok + errors, ok=ok, errors=errors, labels={"mask": mask, "no_mask": no_mask}, alerts=no_mask,
             no_face=no_face, photos_with_faces=ok, faces=mask + no_mask,
             error_reasons={"truncated image": errors} if errors else {},
             confidence={"mask": [v * mask for v in hist], "no_mask": [v * no_mask for v in hist]},
             confidence_sum={"mask": 0.9 * mask, "no_mask": 0.9 * no_mask})
    return {**p, "elapsed_s": seconds, "images_per_s": (ok + errors) / seconds, "cost": {}}


def test_an_unshifted_night_passes_every_check():
    base = drift.pooled([night(mask=800, no_mask=200), night(mask=790, no_mask=210)])
    got = drift.evaluate(CHECKS, night(mask=395, no_mask=105, errors=5), base)
    assert [r.name for r in got] == ["label_rate_change", "label_rate_z", "confidence_psi", "confidence_ks",
                                     "error_rate", "no_face_rate", "throughput"]
    assert all(r.status == "passed" for r in got), [r.line for r in got]
    z = drift.two_proportion_z(105, 500, 410, 2000)
    assert got[1].value == pytest.approx(z) and abs(z) < 1


def test_a_shifted_night_fails_with_the_numbers():
    base = drift.pooled([night(mask=800, no_mask=200), night(mask=800, no_mask=200)])
    shifted = night(mask=250, no_mask=250, errors=70, no_face=400, conf_bin=12, seconds=200.0)
    got = {r.name: r for r in drift.evaluate(CHECKS, shifted, base)}
    assert all(r.status == "failed" for r in got.values()), [r.line for r in got.values()]
    assert got["label_rate_change"].line == ("label_rate_change: no_mask rate 0.500 (250/500) vs baseline 0.200 "
                                             "(400/2000), change +0.300 (limit 0.100)")
    p, n1, n0 = 650 / 2500, 500, 2000
    z = (0.5 - 0.2) / np.sqrt(p * (1 - p) * (1 / n1 + 1 / n0))
    assert got["label_rate_z"].value == pytest.approx(z) and f"z {z:+.2f}" in got["label_rate_z"].line
    # all confidence moved from bin 18 to bin 12: PSI = 2 * (1 - 1e-4) * ln(1 / 1e-4)
    assert got["confidence_psi"].value == pytest.approx(2 * (1 - 1e-4) * np.log(1e4))
    assert got["confidence_ks"].value == 1.0  # every photo below every baseline photo
    assert got["error_rate"].line == "error_rate: 0.072 (70/970 objects) above the ceiling 0.050"
    assert got["no_face_rate"].value == 400 / 900
    assert got["throughput"].line == "throughput: 4.85 images/s (970 in 200.0 s), floor 5.00"


def test_ks_distance_over_fixed_bins():
    base = np.zeros(20)
    base[15:20] = [200, 400, 800, 1600, 3000]
    assert drift.ks_distance(base / 10, base) == pytest.approx(0.0)
    small = np.zeros(20)
    small[[10, 17, 18, 19]] = [2, 4, 6, 10]  # 22 photos, two in a bin the baseline never saw
    # CDF gaps: 2/22 at bin 10; at bin 15..17: 2/22 - 200/6000, 2/22 - 600/6000, 6/22 - 1400/6000 ...
    want = max(abs(np.cumsum(small) / 22 - np.cumsum(base) / 6000))
    assert drift.ks_distance(small, base) == pytest.approx(want) and want < 0.1
    assert drift.psi(small, base) > 0.25  # the PSI calls this a shift: why both are offered


def test_without_a_baseline_the_baseline_checks_are_skipped_not_failed():
    got = {r.name: r for r in drift.evaluate(CHECKS, night(mask=5, no_mask=5), None)}
    assert got["label_rate_change"].status == got["confidence_psi"].status == got["confidence_ks"].status == "skipped"
    assert got["error_rate"].status == "passed"


def test_checks_only_run_when_configured():
    assert drift.evaluate(drift.DriftChecks(), night(mask=1, no_mask=1), None) == []


@pytest.mark.parametrize("text,says", [
    ("max_error_rate = 'high'", "max_error_rate must be a float"),
    ("max_eror_rate = 0.1", "unknown key 'max_eror_rate'"),
    ("max_error_rate = ", "is not valid TOML"),
    ("webhook = 'ftp://x'", "http:// or https://"),
    ("baseline_runs = 0", "baseline_runs must be >= 1"),
])
def test_a_bad_check_file_is_one_sentence(tmp_path, text, says):
    path = tmp_path / "checks.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=says):
        drift.load_checks(str(path))


def test_check_files_in_toml_and_json_read_the_same(tmp_path):
    (tmp_path / "c.toml").write_text("baseline_runs = 3\nmax_error_rate = 0\nlabel = 'no_mask'\n")
    (tmp_path / "c.json").write_text(json.dumps({"baseline_runs": 3, "max_error_rate": 0, "label": "no_mask"}))
    assert drift.load_checks(str(tmp_path / "c.toml")) == drift.load_checks(str(tmp_path / "c.json")) == \
        drift.DriftChecks(baseline_runs=3, max_error_rate=0.0, label="no_mask")


# ----------------------------------------------------------------------------- committed runs, jobs.report --check

def commit_night(out: str, run_id: str, p: dict) -> None:
    writer = results.AttemptWriter(out, run_id, results.results_schema(("mask", "no_mask")))
    results.commit(writer, meta={"counts": {"images": p["images"]}, "model_id": "m", "profile": p})


@pytest.fixture
def nights(tmp_path):
    out = str(tmp_path / "scores")
    for k in range(3):
        commit_night(out, f"n{k}", night(mask=800 + k, no_mask=200))
    commit_night(out, "calm", night(mask=400, no_mask=100))
    commit_night(out, "shifted", night(mask=250, no_mask=250, errors=60))
    checks = tmp_path / "checks.toml"
    checks.write_text("baseline_runs = 3\nmax_label_rate_change = 0.1\nmax_label_rate_z = 3\nmax_error_rate = 0.05\n")
    return out, str(checks)


def test_the_baseline_is_the_runs_before_or_those_named(nights):
    out, _ = nights
    records = results.list_commits(out)
    run, base = drift.select_runs(records, None, last=3)
    assert run.run_id == "shifted" and [r.run_id for r in base] == ["n1", "n2", "calm"]
    run, base = drift.select_runs(records, "calm", ("n0",))
    assert run.run_id == "calm" and [r.run_id for r in base] == ["n0"]
    with pytest.raises(UserError, match="No committed run 'nope'"):
        drift.select_runs(records, "nope")


def test_report_check_exits_3_with_one_line_per_failed_check(nights, tmp_path, capsys):
    from jobs import report

    out, checks = nights
    code = report.main(["--results", out, "--check", checks, "--out", str(tmp_path / "r1"), "--no-sheet"])
    lines = capsys.readouterr().out.strip().splitlines()
    failed = [ln for ln in lines if ln.startswith("CHECK FAILED")]
    assert code == cli.EXIT_CHECK_FAILED == 3
    assert [ln.split(": ")[1] for ln in failed] == ["label_rate_change", "label_rate_z", "error_rate"]
    assert failed[0] == ("CHECK FAILED run shifted: label_rate_change: no_mask rate 0.500 (250/500) vs baseline "
                         "0.200 (500/2503), change +0.300 (limit 0.100)")
    code = report.main(["--results", out, "--run-id", "calm", "--check", checks, "--out", str(tmp_path / "r2"),
                        "--no-sheet"])
    assert code == 0 and "checks passed for run calm: 3 passed, 0 skipped" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the webhook

class Hook(http.server.BaseHTTPRequestHandler):
    answer, delay, bodies = 200, 0.0, []

    trickle = False

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).trickle:  # a status line byte by byte, each within the client's read timeout
            for byte in b"HTTP/1.1 200 OK\r\n":
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.3)
        time.sleep(type(self).delay)
        type(self).bodies.append(json.loads(body))
        self.send_response(type(self).answer)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook():
    class H(Hook):
        bodies = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # a client that gave up (slow, trickle) is expected here
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T0/secret-token", H
    server.shutdown()
    server.server_close()


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def test_a_failed_check_posts_json_to_the_webhook(nights, hook):
    out, _ = nights
    url, handler = hook
    rep = drift.check_run(results.list_commits(out), drift.DriftChecks(max_error_rate=0.05, webhook=url))
    assert [r.name for r in rep.failed] == ["error_rate"]
    (body,) = handler.bodies
    assert body["run_id"] == "shifted" and body["failed"] == 1 and body["text"].startswith("CHECK FAILED run shifted")
    assert body["figures"]["error_rate"] == pytest.approx(60 / 560)
    drift.check_run(results.list_commits(out), drift.DriftChecks(max_error_rate=0.5, webhook=url))
    assert len(handler.bodies) == 1  # nothing failed, nothing posted


@pytest.mark.timeout(30)
@pytest.mark.parametrize("trouble", ["refused", "500", "slow", "trickle"])
def test_a_failing_webhook_is_a_warning_and_the_check_still_fails(nights, hook, trouble, caplog):
    out, _ = nights
    url, handler = hook
    if trouble == "refused":
        url = _refused_url()
    handler.answer = 500 if trouble == "500" else 200
    handler.delay = 5.0 if trouble == "slow" else 0.0
    handler.trickle = trouble == "trickle"
    checks = drift.DriftChecks(max_error_rate=0.05, webhook=url, webhook_timeout_s=0.5)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="maskmodel.results.drift"):
        rep = drift.check_run(results.list_commits(out), checks)
    assert time.monotonic() - t0 < 3  # bounded by webhook_timeout_s, not the server
    assert [r.name for r in rep.failed] == ["error_rate"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "the alert was not delivered" in warning and "secret-token" not in warning
    assert ("HTTP 500" in warning) == (trouble == "500")


def test_jobs_report_rejects_a_bad_check_file_before_anything(nights, tmp_path):
    from jobs import report

    out, _ = nights
    bad = tmp_path / "bad.toml"
    bad.write_text("max_error_rate = 'x'")
    with pytest.raises(UserError, match="must be a float"):
        report.main(["--results", out, "--check", str(bad), "--out", str(tmp_path / "r")])
    assert not storage.exists(str(tmp_path / "r"))


def test_jobs_report_refuses_an_out_folder_inside_the_results(nights):
    from jobs import report

    out, _ = nights
    with pytest.raises(SystemExit) as exit_:
        report.main(["--results", out, "--out", f"{out}/report"])
    assert exit_.value.code == 2
    results.check_output(out)  # the results folder still holds only the table
