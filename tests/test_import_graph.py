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
        for path in sorted((REPO / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
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
    assert "slimserve.optimizers.quantize" in graph["slimserve.optimizers.gptq"]  # inside GPTQ.run
    assert "slimserve.optimizers.registry" in graph["slimserve.optimizers.none"]
    assert "slimserve.optimizers.quality" in graph["slimserve.serve.config"]  # absolute


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
