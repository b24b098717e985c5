"""The optimization registry: one small class per method, keyed by its `method` name.

Each method is a pydantic model of its own parameters (what a user writes under a variant's
`optimization:` key) with a `run(base, out)` that writes an optimized Hugging Face checkpoint into
`out`. Adding a method is adding one file to this package that applies `@register` to its class,
which sets its `version` (1, bumped when its output changes) and, when its checkpoints need
particular kernels, `runs_on` (where vLLM runs them).

Method modules import their heavy libraries (torch, llm-compressor) inside `run`, so that the
registry and the config schema load fast and in any environment.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

_REGISTRY: dict[str, type["Optimization"]] = {}

# Bumped when slimserve's shared build code changes what an artifact holds for the same method and
# inputs: the child's steps and its report (build/worker.py), the perplexity it measures
# (quality.py), the calibration windows (calibration.py), the llm-compressor step
# (methods/quantize.py), the KD trainer and student init (training/). It goes into every cache key
# beside the method's own `version`: a bump rebuilds every artifact (to rebuild fewer, bump the
# versions of the methods whose output changed instead). tests/test_build_digests.py fails when a
# method's output changes and neither version did.
BUILD_VERSION = 1

# Where an engine runs, in vLLM's platform names (vllm.platforms: CpuPlatform, CudaPlatform).
Device = Literal["cpu", "cuda"]


@dataclasses.dataclass(frozen=True)
class RunsOn:
    """Where vLLM has kernels for the checkpoints a method writes, declared the way vLLM's
    quantization configs declare it (the platforms' supported quantizations;
    QuantizationConfig.get_min_capability / the compressed-tensors schemes' minimum): the device
    kinds, and on CUDA the minimum compute capability. `slimserve config validate` checks it
    against the config's `hosts`, and the on-load hook against the host, before any build."""

    devices: frozenset[Device] = frozenset({"cpu", "cuda"})
    min_capability: tuple[int, int] | None = None  # CUDA compute capability (major, minor); None: any
    reason: str = ""  # why: the kernels behind `devices` and `min_capability`, shown in a refusal

    def needs(self) -> str:
        """`a CUDA GPU of compute capability >= 8.9`, `a CPU or a CUDA GPU`, ..."""
        gpu = "a CUDA GPU" + (f" of compute capability >= {self.min_capability[0]}.{self.min_capability[1]}"
                              if self.min_capability else "")
        return gpu if self.devices == {"cuda"} else "a CPU" if self.devices == {"cpu"} else f"a CPU or {gpu}"

    def refusal(self, method: str, device: Device, capability: tuple[int, int] | None = None) -> str | None:
        """Why `method` cannot run on `device` (of compute `capability`, when known), or None."""
        fits = device in self.devices and not (
            device == "cuda" and capability is not None and self.min_capability and tuple(capability) < self.min_capability
        )
        return None if fits else f"{method} needs {self.needs()}" + (f" ({self.reason})" if self.reason else "")


class Optimization(BaseModel):
    """Base of every method's parameter model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    # The Python packages whose versions change what `run` produces (they go into the cache key).
    libraries: ClassVar[tuple[str, ...]] = ()
    # Whether `run` needs llm-compressor, which lives in the optimizer environment.
    needs_optimizer_env: ClassVar[bool] = True
    # Where its checkpoints run (the default: unquantized weights, which run wherever vLLM does).
    runs_on: ClassVar[RunsOn] = RunsOn()
    # Every registered method sets its own, starting at 1, and bumps it when what `run` writes for
    # the same parameters and inputs changes: it goes into the cache key (with BUILD_VERSION), so a
    # bump rebuilds this method's artifacts and nothing else. tests/test_build_digests.py records a
    # tiny build's output per version.
    version: ClassVar[int]

    def platforms(self) -> RunsOn:
        """Where the checkpoint of these parameters runs: `runs_on`, unless a parameter narrows it
        (gptq/rtn/qat/qlora: vLLM CPU takes grouped 4-bit weights only)."""
        return self.runs_on

    def engine_env(self, device: Device) -> dict[str, str]:
        """Environment the engine serving this checkpoint on `device` runs fastest with (a kernel
        choice, measured: docs/BENCHMARKS.md). The variant's `deployment.env` overrides it."""
        return {}

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
    version = vars(cls).get("version")  # its own, never a base class's: each method bumps its own
    if type(version) is not int or version < 1:
        raise ValueError(f"optimization {cls.__name__} ({name}) must set `version = 1` (an int, bumped when its output changes)")
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


def code_versions(spec: "Optimization | type[Optimization]") -> dict[str, int]:
    """slimserve's own part of an artifact's cache key: the method's `version` and BUILD_VERSION."""
    cls = spec if isinstance(spec, type) else type(spec)
    return {"method_version": cls.version, "build_version": BUILD_VERSION}
