"""benchmarks/peers.py's pure parts (arguments, the two-size cost model) and the timeline marks; no Ray, no speed."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import time

import pytest

from maskmodel.runtime import timeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
peers = runpy.run_path(os.path.join(REPO, "benchmarks", "peers.py"), run_name="peers")


def test_fixed_cost_recovers_a_linear_run():
    # 10 s fixed + 40 img/s: 256 images in 16.4 s, 1024 in 35.6 s.
    cost = peers["fixed_cost"](256, 10 + 256 / 40, 1024, 10 + 1024 / 40)
    assert cost.fixed_s == pytest.approx(10.0) and cost.steady_img_s == pytest.approx(40.0)
    with pytest.raises(ValueError):
        peers["fixed_cost"](256, 20.0, 1024, 19.0)  # the larger run cannot be faster
    with pytest.raises(ValueError):
        peers["fixed_cost"](256, 20.0, 256, 30.0)


def test_arguments():
    args = peers["parse_args"]([])
    assert (args.n, args.scale, args.latency_ms, args.shapes) == (256, 4, [0.0, 30.0], ["ray", "daft", "ours"])
    args = peers["parse_args"](["--n", "8", "--shapes", "ours", "--latency-ms", "0"])
    assert (args.n, args.shapes, args.latency_ms) == (8, ["ours"], [0.0])
    with pytest.raises(SystemExit):
        peers["parse_args"](["--scale", "1"])  # one size gives no fixed cost
    with pytest.raises(SystemExit):
        peers["parse_args"](["--shapes", "spark"])


def test_missing_daft_tells_the_install_command(tmp_path):
    if subprocess.run([sys.executable, "-c", "import daft"], capture_output=True).returncode == 0:
        pytest.skip("daft is installed in this environment itself")
    env = {**os.environ, "PYTHONPATH": REPO}
    code = ("import runpy, sys; sys.argv = ['peers.py', '--shapes', 'daft']\n"
            "m = runpy.run_path('benchmarks/peers.py', run_name='peers')\n"
            "m['main'].__globals__['DAFT_DIR'] = sys.argv[0] + '-nowhere'\n"
            "m['main']()\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "pip install --no-deps --target benchmarks/.daft daft==" in res.stderr, res.stderr


def test_timeline_marks_from_every_process_in_order(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    timeline.mark("not recorded")  # unset: nothing written anywhere
    monkeypatch.setenv(timeline.TIMELINE_ENV, str(path))
    monkeypatch.setattr(timeline, "_started_marked", False)
    timeline.mark("late", at=200.0)
    timeline.mark("early", "predictor", at=100.0)
    spawned = time.time()
    subprocess.run([sys.executable, "-c", "from maskmodel.runtime import timeline; timeline.mark('child', 'load', at=150.0)"],
                   cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, check=True)
    marks = timeline.read(str(path))
    # Each process's first mark comes with its start (real unix times: after the made-up ones above).
    starts = [m for m in marks if m["event"] == "process start"]
    assert sorted(m["pid"] for m in starts) == sorted({m["pid"] for m in marks}) and len(starts) == 2
    own, child = (next(m["t"] for m in starts if (m["pid"] == os.getpid()) == mine) for mine in (True, False))
    assert own == timeline.process_start() and spawned - 2 <= child <= time.time()  # btime is whole seconds
    marks = [m for m in marks if m["event"] != "process start"]
    assert [(m["event"], m["proc"]) for m in marks] == [("early", "predictor"), ("child", "load"), ("late", "driver")]
    assert marks[1]["pid"] != os.getpid() == marks[0]["pid"]
    assert timeline.format_timeline(marks, 100.0)[1].split()[:3] == ["50.00", "s", "load"]
    assert timeline.read(str(tmp_path / "none")) == []
    assert 0 < timeline.process_start() <= time.time()
