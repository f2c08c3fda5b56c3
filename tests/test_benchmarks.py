"""The Ray-free GPU benchmark runs as shipped (here on the CPU, tiny), so it works when a GPU host runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mode", ["score", "train"])
def test_gpu_core_runs_without_ray(mode):
    code = ("import runpy, sys\n"
            "sys.argv = ['gpu_core.py', *sys.argv[1:]]\n"
            "runpy.run_path('benchmarks/gpu_core.py', run_name='__main__')\n"
            # What the GPU host lacks (../shared/GPU.md): Ray, s3fs, deltalake, duckdb, pydantic.
            "missing = ('ray', 's3fs', 'deltalake', 'duckdb', 'pydantic')\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in missing], 'imports what the GPU host lacks'\n")
    res = subprocess.run([sys.executable, "-c", code, mode, "--device", "cpu", "--arch", "resnet18",
                          "--image-size", "32", "--batch-sizes", "4", "--distinct", "2", "--iters", "1"],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| 4 |" in res.stdout, res.stdout
