"""The optimization registry: one small class per method, keyed by its `method` name.

Each method is a pydantic model of its own parameters (what a user writes under a variant's
`optimization:` key) with a `run(base, out)` that writes an optimized Hugging Face checkpoint into
`out`. Adding a method is adding one file to this package that applies `@register` to its class.

Method modules import their heavy libraries (torch, llm-compressor) inside `run`, so that the
registry and the config schema load fast and in any environment.
"""

from __future__ import annotations

import functools
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
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if re.search(r"^@register\b", path.read_text(encoding="utf-8"), re.MULTILINE):
            importlib.import_module(f"{__package__}.{path.stem}")


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
