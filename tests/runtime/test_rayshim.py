"""Ray's private API: every name maskmodel uses exists in the installed Ray, and only maskmodel.runtime.rayshim uses any.

When a Ray upgrade removes or moves one of these names, the first test fails
naming it, instead of a job quietly losing a console filter or treating an
autoscaling cluster as fixed. No Ray instance is started.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from maskmodel.runtime import rayshim

ROOT = Path(__file__).resolve().parents[2]
# A private Ray name: any `_`-prefixed part under `ray.` (ray._private, ray._raylet, ray.data._internal, ...).
PRIVATE = re.compile(r"\bray(?:\.[A-Za-z]\w*)*\._\w+|\bfrom\s+ray[\w.]*\s+import\s+[^\n]*\b_\w+")


@pytest.mark.parametrize("name", rayshim.PRIVATE_NAMES)
def test_every_private_name_the_shim_uses_exists_in_this_ray(name):
    obj = rayshim.resolve(name)  # raises PrivateNameGone, naming the missing part
    assert obj is not None or name == rayshim.GLOBAL_NODE  # _global_node is None until ray.init


def test_the_shapes_the_shim_relies_on():
    dispatcher = rayshim.resolve(rayshim.STDSTREAM_DISPATCHER)
    assert all(callable(getattr(dispatcher, m, None)) for m in ("add_handler", "remove_handler"))
    assert isinstance(dispatcher.handlers, list)
    for name in (rayshim.AUTOSCALER_LIMITS, rayshim.PRINT_TO_STDSTREAM, rayshim.SHOULD_IGNORE_PREFIX,
                 rayshim.DATA_CONFIGURE_LOGGING):
        assert callable(rayshim.resolve(name)), name
    import logging

    for name in (rayshim.DATA_SESSION_FILE_HANDLER, rayshim.PLAIN_RAY_HANDLER):
        assert issubclass(rayshim.resolve(name), logging.Handler), name


def test_a_missing_name_fails_loudly_and_names_the_part():
    with pytest.raises(rayshim.PrivateNameGone, match=r"ray\._private\.worker\._no_such_thing is gone"):
        rayshim.resolve("ray._private.worker._no_such_thing")


def test_every_private_name_in_the_shim_is_listed():
    """The shim names private Ray only through PRIVATE_NAMES: no import statement of a private module."""
    tree = ast.parse((ROOT / "maskmodel" / "runtime" / "rayshim.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(PRIVATE.search(n) or n.startswith("ray._") for n in names), ast.unparse(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and PRIVATE.fullmatch(node.value):
            assert node.value in rayshim.PRIVATE_NAMES, node.value


def test_no_other_module_names_private_ray():
    files = [p for pkg in ("maskmodel", "jobs") for p in sorted((ROOT / pkg).rglob("*"))
             if p.suffix in (".py", ".yaml", ".yml", ".json", ".toml") and p.name != "rayshim.py"]
    assert len(files) > 30
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if PRIVATE.search(line)]
    assert not hits, "private Ray API outside maskmodel/runtime/rayshim.py:\n" + "\n".join(hits)


def test_the_pattern_catches_the_usual_forms():
    for line in ("from ray._private.state import state", "ray._private.worker._global_node", "import ray._raylet",
                 "class: ray._private.log.PlainRayHandler", "from ray.data._internal.logging import configure_logging",
                 "from ray import _private"):
        assert PRIVATE.search(line), line
    for line in ("import ray.data", "ray.train.LoggingConfig", "from ray.util.annotations import RayDeprecationWarning"):
        assert not PRIVATE.search(line), line


def test_ray_data_logging_file_is_rays_default_with_a_quiet_console(tmp_path, monkeypatch):
    monkeypatch.setattr(rayshim.tempfile, "gettempdir", lambda: str(tmp_path))
    path = rayshim.ray_data_logging_file("WARNING")
    assert path == rayshim.ray_data_logging_file("WARNING") and path != rayshim.ray_data_logging_file("INFO")
    config = json.loads(Path(path).read_text())
    assert config["handlers"]["console"]["level"] == "WARNING"
    assert config["loggers"]["ray.data"]["handlers"] == ["file", "console"]
    # Ray Data builds its handlers from this file; every class it names resolves.
    from ray.data._internal.logging import DEFAULT_CONFIG  # noqa: private - the test compares against Ray's own

    assert config["handlers"]["file"]["class"] == DEFAULT_CONFIG["handlers"]["file"]["class"]
    assert config["handlers"]["console"]["class"] == DEFAULT_CONFIG["handlers"]["console"]["class"]
    assert config["filters"]["console_filter"] == DEFAULT_CONFIG["filters"]["console_filter"]
