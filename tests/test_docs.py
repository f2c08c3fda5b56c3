"""The README's and docs/ pages' local commands, run as written.

A fenced ``bash`` block right after a ``<!-- runnable -->`` line is run, in page order, in one
shared empty folder (README first: the docs pages build on what its examples made), with ``python``
being this interpreter. Every other block that holds a ``python -m jobs.`` command must say why it is
not run here: it names remote storage (``s3://``, ``gs://``), goes through ``ray job submit`` or
``make``, or carries a ``<!-- not run: reason -->`` line before it.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<marker><!-- (?P<kind>runnable|not run: [^>]*) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```",
                   re.S)
REMOTE = ("s3://", "s3a://", "gs://", "ray job submit", "make ")


def blocks(page: pathlib.Path) -> list[tuple[str | None, str, str]]:
    """``(kind, lang, body)`` of each fenced block of ``page``; kind is ``runnable``, ``not run: ...`` or None."""
    return [(m["kind"], m["lang"], m["body"]) for m in FENCE.finditer(page.read_text())]


def test_every_local_command_is_run_or_says_why_not():
    unexplained = []
    for page in PAGES:
        for kind, lang, body in blocks(page):
            if kind or lang not in ("bash", "sh"):
                continue
            for command in body.replace("\\\n", " ").splitlines():
                if "python -m jobs." in command and not any(r in command for r in REMOTE):
                    unexplained.append(f"{page.relative_to(ROOT)}: {command.strip()[:120]}")
    assert not unexplained, "local commands neither marked runnable nor explained:\n" + "\n".join(unexplained)


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("docs")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", [p for p in PAGES if any(k == "runnable" for k, _, _ in blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_commands(page, workdir):
    # ``python`` is this interpreter: a script (not a link, which would lose the virtual environment).
    shim = workdir.parent / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shim / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    for kind, _, body in blocks(page):
        if kind != "runnable":
            continue
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=workdir, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{page.name}: block failed (exit {res.returncode}):\n{body}\n" \
                                    f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}"
