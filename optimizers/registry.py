"""The optimization registry: one small class per method, keyed by its `method` name.

Each method is a pydantic model of its own parameters (what a user writes under a variant's
`optimization:` key) with a `run(base, out)` that writes an optimized Hugging Face checkpoint into
`out`. Adding a method is adding one file to this package that applies `@register` to its class.

Method modules import their heavy libraries (torch, llm-compressor) inside `run`, so that the
registry and the config schema load fast and in any environment.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

_REGISTRY: dict[str, type["Optimization"]] = {}


class Optimization(BaseModel):
    """Base of every method's parameter model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    # The Python packages whose versions change what `run` produces (they go into the cache key).
    libraries: ClassVar[tuple[str, ...]] = ()
    # Whether `run` needs llm-compressor, which lives in the optimizer environment.
    needs_optimizer_env: ClassVar[bool] = True

    @property
    def runs_on_vllm_cpu(self) -> bool:
        """Whether vLLM's CPU build has kernels for the checkpoint this method writes."""
        return True

    @property
    def produces_artifact(self) -> bool:
        """False for methods that serve the base checkpoint unchanged."""
        return True

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        """Write the optimized checkpoint (config, weights, tokenizer) into `out`.

        Returns facts worth recording in the artifact's manifest (e.g. the group size chosen)."""
        raise NotImplementedError


def register(cls: type[Optimization]) -> type[Optimization]:
    name = cls.model_fields["method"].default
    if not isinstance(name, str) or name in _REGISTRY:
        raise ValueError(f"cannot register optimization {cls.__name__} under {name!r}")
    _REGISTRY[name] = cls
    return cls


@functools.cache
def _import_method_modules() -> None:
    # A method module has a line `@register`: read from the source, so only method modules are imported.
    here = Path(__file__).parent
    for path in sorted((here / "methods").glob("*.py")) + sorted((here / "training").glob("*.py")):
        if re.search(r"^@register\b", path.read_text(encoding="utf-8"), re.MULTILINE):
            importlib.import_module(f"{__package__}.{path.parent.name}.{path.stem}")


def methods() -> dict[str, type[Optimization]]:
    """All registered methods by name."""
    _import_method_modules()
    return dict(_REGISTRY)


def parse(spec: dict[str, Any] | str | Optimization) -> Optimization:
    """Validate one `optimization:` value (a dict with `method`, or just the method name)."""
    if isinstance(spec, Optimization):
        return spec
    if isinstance(spec, str):
        spec = {"method": spec}
    name = spec.get("method", "none")
    available = methods()
    if name not in available:
        raise ValueError(f"unknown optimization method {name!r}; available: {', '.join(sorted(available))}")
    return available[name].model_validate(spec)


# Modules whose code shapes every artifact besides the method's own: the child process's entry
# point (it runs the method and measures perplexity) and what it imports.
_BUILD_ROOTS = ("build.worker",)


def _module_file(package_dir: Path, name: str) -> Path:
    return package_dir / (name.replace(".", "/") + ".py")


def _package_imports(path: Path, package_dir: Path) -> set[str]:
    """Names (relative to this package, e.g. `methods.quantize`) of this package's modules that
    `path` imports, top-level or inside a function (method modules import their helpers inside `run`)."""
    package = __package__ or "slimserve.optimizers"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(package):
            base = node.module[len(package) + 1:]
            names = [base] + [f"{base}.{a.name}".lstrip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name[len(package) + 1:] for a in node.names if a.name.startswith(package + ".")]
        found.update(n for n in names if n and _module_file(package_dir, n).is_file())
    return found


def code_digest(spec: "Optimization | type[Optimization] | str", package_dir: Path | None = None) -> str:
    """sha256 of the slimserve code that builds an artifact of this method: the method's module,
    the child process's entry point (`build.worker`: it also measures perplexity), the package's
    `__init__`, and every module of this package they import, transitively (e.g. `methods.structured`:
    training.kd_trainer, quality, calibration, registry). It goes into the cache key, so an artifact
    built by other code is never served as a hit. `spec`: a method instance or class, or a module
    name relative to the package; `package_dir` (tests): read the sources from there instead."""
    package_dir = Path(package_dir) if package_dir is not None else Path(__file__).parent
    package = __package__ or "slimserve.optimizers"
    if isinstance(spec, str):
        stem = spec
    else:
        stem = (spec if isinstance(spec, type) else type(spec)).__module__[len(package) + 1:]
    todo, seen = [stem, *_BUILD_ROOTS, "__init__"], set()
    while todo:
        name = todo.pop()
        if name in seen or not _module_file(package_dir, name).is_file():
            continue
        seen.add(name)
        todo.extend(_package_imports(_module_file(package_dir, name), package_dir) - seen)
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(f"{name}.py\0{hashlib.sha256(_module_file(package_dir, name).read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()
