"""Typed hand-offs between the layers: what `build_app` gives the on-load hook and the ingress,
what the on-load hook hands the engine server, and what the engine server reports back to the
ingress. Each crosses Ray as plain keyword arguments (that is how Ray Serve LLM passes callback
and ingress arguments) or a plain dict, and is validated on arrival."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimserve.optimizers.build.build_report import BuildReport
from slimserve.optimizers.build.pipeline import DEFAULT_BUILD_TIMEOUT_S

from slimserve.serve.config.ingress import RequestLimits
from slimserve.serve.config.probe import LiveProbeSettings
from slimserve.serve.config.retry import PrepareRetry
from slimserve.serve.config.rollout import RolloutSettings
from slimserve.serve.config.start_budget import DEFAULT_ENGINE_START_TIMEOUT_S


@dataclass(frozen=True)
class VariantRoute:
    """One variant of a public name as the ingress's router sees it (build_app -> ingress)."""

    variant: str
    model_id: str  # the deployment's model id, e.g. smollm2--int8
    weight: float


class _Handoff(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OnLoadSpec(_Handoff):
    """LLMConfig.callback_config.callback_kwargs of a variant's engine deployment."""

    model: str = Field(description="Public model name.")
    variant: str
    source: str = Field(description="Base checkpoint: a local folder or `default`.")
    optimization: dict[str, Any] = Field(description="The variant's optimization, as the registry parses it.")
    quality: dict[str, Any] = Field(default_factory=dict, description="The quality gate.")
    cache_dir: str
    cache_volume_token: str | None = Field(
        None, description="The shared cache's token (engine/cache_volume.py); None: not checked (node_local).")
    accelerator: Literal["cpu", "gpu"]
    required: bool = Field(False, description="A failure to prepare fails the app instead of marking the variant failed.")
    build_timeout_s: float = Field(DEFAULT_BUILD_TIMEOUT_S, gt=0, description="Longest the optimization may run (Variant.build_timeout_s).")
    cache_max_gib: float | None = Field(None, gt=0, description="Size cap of the artifact cache (SlimserveConfig.cache_max_gib).")
    engine_start_timeout_s: float = Field(
        DEFAULT_ENGINE_START_TIMEOUT_S, gt=0, description="Room for the engine's start (Variant.engine_start_timeout_s)."
    )
    prepare_retry: PrepareRetry = Field(default_factory=PrepareRetry, description="Variant.prepare_retry.")
    secret_env: list[str] = Field(
        default_factory=list, description="Environment variables holding keys (ingress.api_keys_env, admin_keys_env): "
        "withheld from the optimizer's child process, which runs third-party code and needs none of them."
    )

    @property
    def who(self) -> str:
        return f"{self.model}/{self.variant}"

    @property
    def labels(self) -> dict[str, str]:
        return {"model": self.model, "variant": self.variant}


class PreparedCheckpoint(_Handoff):
    """What the on-load step prepared: the checkpoint the engine loads, and how it came to be."""

    method: str = Field(description="The optimization method (registry name).")
    checkpoint: str = Field(description="The folder the engine loads: the cached artifact, or the base.")
    base: str = Field(description="The base checkpoint's folder.")
    cache_hit: bool | None = Field(description="None: nothing to cache (method `none`).")
    prepare_seconds: float = Field(description="Wall time of the on-load step (a build, or the cache lookup).")
    build_seconds: float | None = Field(None, description="Wall time of the artifact's build, whenever it was built.")
    report: BuildReport | None = Field(
        None, description="The optimizer child's report (the method's facts, the quality measured); None: nothing was built."
    )
    quality_gate: str = Field("passed", description="`passed`, or `failed: serving base` (on_quality_fail: serve_base).")

    @field_validator("report", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value == {} else value  # how an engine of the slimserve before typed reports said "nothing built"


class EngineRecord(_Handoff):
    """What an engine replica reports of itself (SlimServer.slimserve_info): a plain dict through
    Ray, validated where it arrives (the ingress's health board: /v1/models and the admin route
    GET /slimserve/variants). Only what applies is set, and sent: a replica without an engine has
    no engine facts (sent as `model_dump(exclude_unset=True)`)."""

    pid: int = Field(description="The replica's process id.")
    timings: dict[str, float] = Field(default_factory=dict, description="The replica's start: start_seconds, start_lock_wait_seconds; started_at and ready_at (Unix time).")
    optimization: PreparedCheckpoint | None = Field(None, description="The on-load step's result, once it succeeded.")
    retrying: dict[str, Any] | None = Field(None, description="While a failed variant waits for (or runs) a retry: retry.retry_status.")
    failed: str | None = Field(None, description="Why the variant is not served (the optimizer's last lines of output included).")
    checkpoint: str | None = Field(None, description="The folder the running vLLM engine loaded.")
    quantization: str | None = Field(None, description="vLLM's quantization method for it (None: not quantized).")
    dtype: str | None = Field(None, description="The engine's compute dtype.")
    max_model_len: int | None = Field(None, description="The engine's context length.")
    tensor_parallel_size: int | None = Field(None, description="GPUs the engine is split over.")
    device: str | None = Field(None, description="`cpu` or `cuda`.")
    kv_cache_tokens: int | None = Field(None, description="Tokens the KV cache the engine sized for itself holds.")
    gpu_memory_utilization: float | None = Field(None, description="The engine's share of its GPU's memory.")

    @field_validator("optimization", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value == {} else value  # how an engine of the slimserve before typed reports said "not prepared"


class IngressSpec(_Handoff):
    """The ingress's arguments (IngressClsConfig.ingress_extra_kwargs)."""

    splits: dict[str, list[VariantRoute]] = Field(description="Public name -> its variants' routes.")
    allow_forced_variant: bool = True
    sticky: dict[str, bool] = Field(default_factory=dict)
    sticky_user_from: Literal["api_key", "header"] = "header"
    shadows: dict[str, str] = Field(default_factory=dict)
    shadow_max_in_flight: int = 8
    probes: dict[str, LiveProbeSettings] = Field(
        default_factory=dict, description="Public name -> its live probes (baseline resolved to a variant name)."
    )
    health_probe_interval_s: float = 10
    api_keys_env: str | None = None
    admin_keys_env: str | None = None
    rollouts: dict[str, RolloutSettings] = Field(
        default_factory=dict, description="Public name -> its rollout (baseline resolved to a variant name)."
    )
    rollout_dir: str = Field("", description="Where rollout state is kept (the cache's rollouts/ folder).")
    limits: RequestLimits = Field(default_factory=RequestLimits)


class IngressWeights(_Handoff):
    """The ingress deployment's Ray Serve `user_config`: what may change on a live ingress
    (SlimserveIngress.reconfigure) without replacing it or any engine."""

    weights: dict[str, dict[str, float]] = Field(
        description="Public name -> variant -> weight; a variant left out keeps its weight."
    )
