"""The package's layers point one way: every import (top-level, TYPE_CHECKING, inside a function) goes down.

Reads the source with ``ast``; imports nothing of maskmodel, Ray or torch.
A module's layer is its subpackage (``maskmodel/io/x.py`` is in ``io``;
``jobs/*`` is ``jobs``); a module at the top of ``maskmodel/`` takes its
layer from :data:`TOP_LEVEL_LAYERS`, which is where a new top-level module
must be added. :data:`MAY_IMPORT` says which layers each layer may import;
inside one layer anything goes except a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("maskmodel", "jobs")

# ----------------------------------------------------------------------------- the map (edit here)

#: Layers, top to bottom, and the layers each may import besides its own.
MAY_IMPORT: dict[str, set[str]] = {
    "jobs": {"study", "train", "score", "models", "results", "data", "metrics", "runtime", "io", "shared"},
    "study": {"train", "score", "models", "results", "data", "metrics", "runtime", "io", "shared"},
    # train and score are peers: neither imports the other (what both need lives lower down).
    "train": {"models", "results", "data", "metrics", "runtime", "io", "shared"},
    "score": {"models", "results", "data", "metrics", "runtime", "io", "shared"},
    # A model's card names its preprocessing (transforms' mean, std, resize ratio), so models may
    # import data; data and results know nothing of models.
    "models": {"data", "metrics", "runtime", "io", "shared"},
    "results": {"metrics", "runtime", "io", "shared"},
    "data": {"metrics", "runtime", "io", "shared"},
    # Ray plumbing and metrics sit just above io: every layer that runs work may use them.
    "metrics": {"shared"},
    "runtime": {"io", "shared"},
    "io": {"shared"},
    "shared": set(),
}

#: The layer of each module at the top of ``maskmodel/`` (a module in a subpackage takes the subpackage's name).
TOP_LEVEL_LAYERS: dict[str, str] = {
    "maskmodel": "shared",  # the package's __init__
    # shared pieces: no maskmodel concern, imported from anywhere
    "alert": "shared", "config": "shared", "console": "shared", "errors": "shared", "reports": "shared",
}

#: Narrower rules than the layers, by module name (the last part, so they survive a move into subpackages).
NEVER_IMPORTS: dict[str, set[str]] = {
    # The Ray-free load step is given the keys to skip; it never reads the results table or starts Ray.
    "loading": {"incremental", "results", "delta", "raysession", "rayshim"},
    "inference": {"raysession", "rayshim", "pipeline", "scoring"},
    # The training worker's loop runs inside Ray Train: it does not start Ray or touch Ray's internals.
    "loop": {"raysession", "rayshim"},
    "engine": {"raysession", "rayshim"},
}

# ----------------------------------------------------------------------------- reading the imports


def modules() -> dict[str, Path]:
    """Every module of :data:`PACKAGES` by dotted name (a package by its own name)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str) -> str:
    """``jobs`` for ``jobs.*``; a subpackage's name for ``maskmodel.<sub>.*``; else :data:`TOP_LEVEL_LAYERS`."""
    parts = module.split(".")
    if parts[0] == "jobs":
        return "jobs"
    if (ROOT / "maskmodel" / parts[1]).is_dir() if len(parts) > 1 else False:
        return parts[1]
    key = parts[-1] if len(parts) > 1 else "maskmodel"
    if key not in TOP_LEVEL_LAYERS:
        raise AssertionError(f"maskmodel/{key}.py has no layer: add it to TOP_LEVEL_LAYERS in {__file__}")
    return TOP_LEVEL_LAYERS[key]


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str, int]]:
    """``(imported module, kind, line)`` for each import of another module of :data:`PACKAGES`.

    ``kind``: ``top``, ``local`` (inside a function) or ``typing`` (under ``if TYPE_CHECKING``).
    ``from a import b`` names the module ``a.b`` when that is a module, else ``a``.
    """
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, str, int]] = []

    def target(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            kind = "local" if kind == "top" else kind
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, "typing")
            for child in node.orelse:
                visit(child, kind)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (t := target(alias.name)) is not None:
                    found.append((t, kind, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for alias in node.names:
                full = f"{name}.{alias.name}"
                if full in known:
                    found.append((full, kind, node.lineno))
                elif (t := target(name)) is not None:
                    found.append((t, kind, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, kind)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "top")
    return [(t, k, line) for t, k, line in found if t != module]


def graph() -> dict[str, list[tuple[str, str, int]]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return out


# ----------------------------------------------------------------------------- the tests


def test_the_map_names_known_layers_and_existing_modules():
    assert set().union(*MAY_IMPORT.values()) <= set(MAY_IMPORT)
    top = {p.stem for p in (ROOT / "maskmodel").glob("*.py") if p.stem != "__init__"} | {"maskmodel"}
    assert set(TOP_LEVEL_LAYERS) - top == set(), "TOP_LEVEL_LAYERS names modules that are gone"
    assert set(TOP_LEVEL_LAYERS.values()) <= set(MAY_IMPORT)
    assert {layer_of(m) for m in modules()} <= set(MAY_IMPORT)


def test_the_walk_sees_every_kind_of_import(tmp_path):
    kinds = {k for edges in graph().values() for _, k, _ in edges}
    assert {"top", "local"} <= kinds  # the package uses both; TYPE_CHECKING imports are read too when present
    src = "from __future__ import annotations\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n" \
          "    from maskmodel.score import scoring\ndef f():\n    from maskmodel.io.storage import join\n"
    probe = tmp_path / "probe.py"
    probe.write_text(src)
    got = imports("maskmodel.probe", probe, modules())
    assert sorted((t, k) for t, k, _ in got) == [("maskmodel.io.storage", "local"), ("maskmodel.score.scoring", "typing")]


def test_no_import_cycles():
    edges = {m: {t for t, _, _ in deps} for m, deps in graph().items()}
    found = cycles(edges)
    assert not found, "import cycles (TYPE_CHECKING and function-local imports count):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_imports_point_down_the_layers():
    upward = []
    for module, deps in graph().items():
        src = layer_of(module)
        for dep, kind, line in deps:
            dst = layer_of(dep)
            if dst != src and dst not in MAY_IMPORT[src]:
                upward.append(f"{module}:{line} ({src}) imports {dep} ({dst}) [{kind}]")
    assert not upward, "imports against the layer map in tests/test_layering.py:\n" + "\n".join(upward)


@pytest.mark.parametrize("module, layer", [("maskmodel.io.storage", "io"), ("maskmodel.train.loop", "train"),
                                           ("jobs.score", "jobs"), ("maskmodel.errors", "shared")])
def test_layer_comes_from_the_subpackage_when_there_is_one(module, layer, monkeypatch, tmp_path):
    sub = module.split(".")[1] if module.count(".") == 2 else None
    if sub:  # pretend the subpackage exists
        monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
        (tmp_path / "maskmodel" / sub).mkdir(parents=True)
    assert layer_of(module) == layer


def test_the_ray_free_core_keeps_to_itself():
    bad = [f"{module}:{line} imports {dep}" for module, deps in graph().items() for dep, _, line in deps
           if dep.rsplit(".", 1)[-1] in NEVER_IMPORTS.get(module.rsplit(".", 1)[-1], ())]
    assert not bad, "see NEVER_IMPORTS in tests/test_layering.py:\n" + "\n".join(bad)


def test_the_package_top_stays_small_and_modules_hold_one_concern():
    """At most 8 modules at the top of ``maskmodel/`` (the rest live in subpackages by concern), and no
    module of the library or the jobs over 400 lines (one that grows past it holds two concerns)."""
    top = sorted(p.name for p in (ROOT / "maskmodel").glob("*.py"))
    assert len(top) <= 8, top
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
