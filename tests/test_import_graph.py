"""The import graph of the slimserve package, read from the source (no module is imported): every
import statement counts, top-level or inside a function, relative or absolute."""

from __future__ import annotations

import ast
import graphlib
from importlib.util import resolve_name
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"serve": "slimserve.serve", "optimizers": "slimserve.optimizers"}  # folder -> package (pyproject.toml)


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported_names(path: Path, package: str) -> set[str]:
    """Absolute names of what the file's import statements import (`from m import x`: m and m.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (`from m import Class` is an edge to m)."""
    found = modules()
    graph = {}
    for name, path in found.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        edges = set()
        for target in imported_names(path, package):
            while target and target not in found:  # an attribute of a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "slimserve.optimizers.methods.quantize" in graph["slimserve.optimizers.methods.gptq"]  # inside GPTQ.run
    assert "slimserve.optimizers.registry" in graph["slimserve.optimizers.methods.none"]
    assert "slimserve.optimizers.quality" in graph["slimserve.serve.config.schema"]  # absolute


def test_no_import_cycles():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as e:
        pytest.fail("import cycle: " + " -> ".join(e.args[1]))


def test_the_optimizers_do_not_import_the_serving_side():
    offending = {
        name: sorted(t for t in edges if t.startswith(PACKAGES["serve"]))
        for name, edges in import_graph().items()
        if name.startswith(PACKAGES["optimizers"])
    }
    assert {name: targets for name, targets in offending.items() if targets} == {}


# The rooms: each subpackage (and each module at a package's top) and the rooms it may import.
# Written down so that a new import across rooms is a decision, not an accident.
ROOMS: dict[str, set[str]] = {
    # optimizers/: shared pieces at the top, then the machinery and the methods.
    "optimizers.registry": set(),
    "optimizers.models": set(),
    "optimizers.calibration": set(),
    "optimizers.report": set(),
    "optimizers.quality": {"optimizers.calibration"},
    "optimizers.cache": set(),
    # The methods and the training code lean on each other by design: `structured` heals with the
    # KD trainer, while QAT and gradual pruning train through `structured`'s and `sparse`'s
    # transforms. No module cycle (checked above), but the two rooms are mutual neighbours.
    "optimizers.methods": {"optimizers.registry", "optimizers.calibration", "optimizers.quality",
                           "optimizers.cache", "optimizers.training"},
    "optimizers.training": {"optimizers.registry", "optimizers.calibration", "optimizers.quality",
                            "optimizers.models", "optimizers.methods"},
    "optimizers.build": {"optimizers.registry", "optimizers.calibration", "optimizers.quality",
                         "optimizers.models", "optimizers.cache"},
    # serve/: config at the bottom, the app and the local commands at the top.
    "serve.rayllm": set(),
    "serve.metrics": set(),
    "serve.config": {"optimizers.build", "optimizers.cache", "optimizers.models", "optimizers.quality",
                     "optimizers.registry"},
    "serve.handoff": {"serve.config", "optimizers.build"},
    "serve.rollout": {"serve.config", "serve.metrics", "serve.rayllm"},  # rayllm: the GCS store of the state
    # optimizers.cache: the flock holder (locks.HeldFd) that the core-slot claims and the
    # engine-start lock share with the cache's own locks, one implementation instead of three.
    "serve.engine": {"serve.config", "serve.handoff", "serve.metrics", "serve.rayllm", "optimizers.build",
                     "optimizers.cache", "optimizers.registry", "optimizers.report"},
    "serve.http": {"serve.config", "serve.handoff", "serve.metrics", "serve.rayllm", "serve.rollout"},
    "serve.app": {"serve.config", "serve.engine", "serve.handoff", "serve.http", "serve.rayllm", "serve.rollout"},
    "serve.commands": {"serve", "serve.app", "serve.config", "serve.http", "serve.rollout", "optimizers.build",
                       "optimizers.cache", "optimizers.models", "optimizers.quality", "optimizers.report",
                       "optimizers.training"},
}


def room_of(module: str) -> str:
    """`slimserve.serve.http.guard` -> `serve.http`; `slimserve.serve.app` -> `serve.app`."""
    return ".".join(module.split(".")[1:3])


def test_every_module_sits_in_a_room_that_is_written_down():
    rooms = {room_of(m) for m in modules()} - {"serve", "optimizers"}  # the packages' own __init__
    assert rooms == set(ROOMS)


def test_each_room_imports_only_its_written_down_neighbours():
    crossing: dict[str, set[str]] = {}
    for name, edges in import_graph().items():
        for target in edges:
            if room_of(target) != room_of(name) and room_of(target) not in ROOMS.get(room_of(name), set()):
                crossing.setdefault(room_of(name), set()).add(f"{name} -> {target}")
    assert crossing == {}
