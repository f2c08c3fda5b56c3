"""Two scored nights on a real local Ray: jobs.score --check exits 3 on the shifted one (a dead webhook only warns),
and jobs.report's page renders in headless Chromium with every picture loaded and nothing fetched from the network."""

from __future__ import annotations

import http.server
import json
import logging
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from maskmodel import results
from maskmodel.runtime import cli
from maskmodel.io import storage
from tests.score.test_face_scoring import _hopper, _jpeg, no_face
from tests.score.test_scoring import encode, face, write_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


@pytest.fixture(scope="module")
def nights(tmp_path_factory, ray_local):
    """report-night-1: 6 face crops (too small for the detector: no face found) and a photo with one face;
    report-night-2: the same plus 3 truncated uploads and 2 more photos without a face. (Run ids of their own:
    Ray's per-run counters in this session must not add up with other tests' runs.) Both scored by
    ``jobs.score --check`` with a webhook that refuses connections."""
    from jobs import score

    root = tmp_path_factory.mktemp("nights")
    model, out = str(root / "model"), str(root / "scores")
    write_model(model)
    photos = {f"c{i}.jpg": encode(face(i % 2, i), "JPEG", quality=90) for i in range(6)}
    photos["hopper.jpg"] = _jpeg(_hopper())
    truncated = {f"cut{i}.jpg": photos["hopper.jpg"][: len(photos["hopper.jpg"]) // (2 + i)] for i in range(3)}
    shifted = {**photos, **truncated, "empty0.jpg": no_face(), "empty1.jpg": no_face()}
    checks = root / "checks.toml"
    checks.write_text(f"baseline_runs = 3\nmax_error_rate = 0.1\nmax_no_face_rate = 0.87\n"
                      f"webhook = '{_refused_url()}'\nwebhook_timeout_s = 1.0\n")
    codes, lines = {}, {}
    for night, files in (("report-night-1", photos), ("report-night-2", shifted)):
        for name, data in files.items():
            storage.write_bytes(str(root / night / name), data)
        argv = ["--input", str(root / night), "--model", model, "--output", out, "--run-id", night,
                "--precision", "fp32", "--read-batch", "4", "--batch-size", "4", "--check", str(checks)]
        codes[night], lines[night] = _run(score.main, argv)
    return {"root": root, "out": out, "checks": str(checks), "codes": codes, "lines": lines}


def _run(main, argv) -> tuple[int, list[str]]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue().strip().splitlines()


@pytest.mark.ray
def test_score_check_passes_the_calm_night_and_fails_the_shifted_one_with_its_numbers(nights, caplog):
    assert nights["codes"] == {"report-night-1": 0, "report-night-2": cli.EXIT_CHECK_FAILED}
    assert nights["lines"]["report-night-1"][-1].startswith("checks passed for run report-night-1: 2 passed")
    failed = [ln for ln in nights["lines"]["report-night-2"] if ln.startswith("CHECK FAILED")]
    assert failed == ["CHECK FAILED run report-night-2: error_rate: 0.250 (3/12 objects) above the ceiling 0.100",
                      "CHECK FAILED run report-night-2: no_face_rate: 0.889 (8/9 photos through a detector) above the "
                      "ceiling 0.870"]  # the crops hold no face a detector finds, as the two empty photos
    # both runs are committed whatever the checks said
    assert [r.run_id for r in results.list_commits(nights["out"])] == ["report-night-1", "report-night-2"]


@pytest.mark.ray
def test_a_dead_webhook_warns_and_the_exit_code_still_reflects_the_check(nights, caplog):
    from maskmodel.results import drift

    with caplog.at_level(logging.WARNING, logger="maskmodel.results.drift"):
        report = drift.check_run(results.list_commits(nights["out"]), drift.load_checks(nights["checks"]))
    assert len(report.failed) == 2
    assert any("could not be reached" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def report_dir(nights):
    from jobs import report

    out = nights["root"] / "report"
    code, lines = _run(report.main, ["--results", nights["out"], "--out", str(out), "--check", nights["checks"]])
    assert code == cli.EXIT_CHECK_FAILED
    assert lines[0].startswith("report of run report-night-2 (baseline: report-night-1)")
    return out


@pytest.mark.ray
def test_the_report_holds_the_figures_sheets_and_no_secrets(report_dir, nights):
    page = (report_dir / "report.html").read_text()
    summary = json.loads((report_dir / "report.json").read_text())
    assert summary["run_id"] == "report-night-2" and summary["baseline"] == ["report-night-1"]
    assert summary["figures"]["error_rate"] == 0.25 and summary["baseline_figures"]["error_rate"] == 0.0
    assert summary["sheets"]["least_confident"]["tiles"] == 9  # every ok photo's face (or whole picture)
    assert summary["sheets"]["alerts"]["tiles"] == summary["sheets"]["alerts"]["faces"]
    for png in ("history.png", "confidence.png", "alerts.png", "least_confident.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CHECK FAILED" not in page and "error_rate: 0.250 (3/12 objects)" in page
    # offline: no external reference at all; no webhook, no credentials, no configuration on the page
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page)
    webhook = drift_webhook(nights["checks"])
    assert webhook not in page and webhook.split("//")[1].split("/")[0] not in page
    import os
    for secret in (os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_ACCESS_KEY_ID")):
        assert not secret or secret not in page


def drift_webhook(checks: str) -> str:
    from maskmodel.results import drift

    return drift.load_checks(checks).webhook


# ----------------------------------------------------------------------------- in a real browser

PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({id: i.id, complete: i.complete, width: i.naturalWidth}));
  const fetched = performance.getEntriesByType('resource').map(r => r.name).filter(n => !n.startsWith('data:'));
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({imgs, fetched});
  document.body.appendChild(out);
});
</script>"""


#: Requests Chromium makes for itself at start (component updates, network time, accounts), whatever the page.
BROWSER_OWN = r"^(https?://)?[a-z0-9.-]*\.(google\.com|googleapis\.com|gstatic\.com|gvt1\.com)(:443)?(/|$)"


class Trap(http.server.BaseHTTPRequestHandler):
    """A proxy that answers nothing: any request Chromium makes to the network lands here and is recorded."""

    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).seen.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_CONNECT = do_POST = do_GET

    def log_message(self, *args):
        pass


def render(page: str, tmp_path: Path) -> tuple[dict, list[str]]:
    """``page`` with :data:`PROBE` loaded in headless Chromium behind the trap proxy: the probe's findings and the
    requests that reached the proxy."""
    import html

    tmp_path.mkdir(parents=True, exist_ok=True)
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))

    class Seen(Trap):
        seen = []

    trap = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Seen)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    try:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--proxy-server=http://127.0.0.1:{trap.server_address[1]}", "--proxy-bypass-list=<-loopback>",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
             probed.as_uri()], capture_output=True, text=True, timeout=90)
    finally:
        trap.shutdown()
        trap.server_close()
    m = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert m, (done.returncode, done.stderr[-2000:])
    return json.loads(html.unescape(m.group(1))), [u for u in Seen.seen if not re.match(BROWSER_OWN, u)]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_the_page_renders_in_headless_chromium_every_plot_loaded_nothing_fetched(report_dir, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed here (apt-get install -y chromium; .ci/run installs it in CI)")
    probe, requests = render((report_dir / "report.html").read_text(), tmp_path / "report")
    assert sorted(i["id"] for i in probe["imgs"]) == ["alerts", "confidence", "history", "least_confident"]
    assert all(i["complete"] and i["width"] > 0 for i in probe["imgs"]), probe["imgs"]
    # Nothing fetched by the page (resource timing lists failed loads too), and no request but Chromium's own
    # background services (update, time, accounts) reached the proxy that stands for the network.
    assert probe["fetched"] == [] and requests == [], (probe["fetched"], requests)
    # The probe can fail: a page with one picture from a CDN shows it unloaded, fetched and at the proxy.
    probe, requests = render("<html><body><img id='cdn' src='http://cdn.example.invalid/plot.png'></body></html>",
                             tmp_path / "control")
    assert probe["imgs"] == [{"id": "cdn", "complete": True, "width": 0}]
    assert probe["fetched"] == ["http://cdn.example.invalid/plot.png"] and requests, requests
