"""The Ray-free GPU check runs as shipped (here on the CPU, tiny), so it works when a GPU host runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_check(*args: str) -> subprocess.CompletedProcess:
    code = ("import runpy, sys\n"
            "sys.argv = ['gpu_check.py', *sys.argv[1:]]\n"
            "try:\n"
            "    runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            # What the GPU host lacks (../shared/GPU.md): Ray, s3fs, deltalake, duckdb, pydantic.
            "missing = ('ray', 's3fs', 'deltalake', 'duckdb', 'pydantic')\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in missing], 'imports what the GPU host lacks'\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(400)
def test_gpu_check_runs_every_check_without_ray():
    res = run_check("--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--photo-size", "160x120",
                    "--distinct", "3", "--batch-sizes", "4", "--iters", "1", "--precision", "fp32",
                    "--race-photos", "8", "--warmup", "1", "--detector-size", "96", "--detector-batch", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("score-decode", "decode-many-chunks", "syncs-per-batch", "face-stage", "device-identity",
                 "train-step", "detector-train-step"):
        assert f"{name}: ok" in res.stdout, res.stdout
    assert "| 4 |" in res.stdout and "all checks ok" in res.stdout, res.stdout


def test_gpu_check_imports_only_what_the_gpu_host_has():
    """Importing the script (and so the library it drives) pulls in nothing the offline GPU host lacks."""
    code = ("import runpy, sys\n"
            "runpy.run_path('benchmarks/gpu_check.py', run_name='imported')\n"
            "missing = ('ray', 's3fs', 'deltalake', 'duckdb', 'pydantic')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(missing)))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", (res.stdout, res.stderr[-2000:])


def test_gpu_check_without_cuda_says_so_and_runs_nothing():
    if torch.cuda.is_available():
        return  # on a GPU host the default run is the real check
    res = run_check()
    assert res.returncode == 0, res.stderr[-3000:]
    assert "needs a CUDA GPU" in res.stdout and "nothing was run" in res.stdout and ": ok" not in res.stdout
