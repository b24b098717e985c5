"""The one slimserve config schema: what a user writes in YAML is what runs.

    cache_dir: ~/.cache/slimserve/artifacts
    models:
      - name: smollm2                 # the public name clients send as `model`
        source: default               # a local HF folder, or `default` (embedded SmolLM2-135M)
        engine: {max_model_len: 2048}
        variants:
          - {name: baseline, weight: 50}
          - {name: int8, weight: 50, optimization: {method: w8a8}}
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimserve.optimizers.models import DEFAULT_MODEL, slimserve_home
from slimserve.optimizers.build.pipeline import DEFAULT_BUILD_TIMEOUT_S
from slimserve.optimizers.quality import QualityGate
from slimserve.optimizers.registry import Optimization, parse

from slimserve.serve.config.autoscaling import AutoscalingOverride, AutoscalingSettings, merged
from slimserve.serve.config.hosts import HostSettings
from slimserve.serve.config.ingress import IngressSettings
from slimserve.serve.config.probe import LiveProbeSettings
from slimserve.serve.config.retry import PrepareRetry
from slimserve.serve.config.rollout import RolloutSettings, check_probe_and_rollout
from slimserve.serve.config.start_budget import DEFAULT_ENGINE_START_TIMEOUT_S, RAY_ENGINE_START_TIMEOUT_ENV, misfit

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Separates public model name and variant in the model id of a variant's deployment. Not ':'
# (Ray Serve LLM reads `base:suffix` as a LoRA adapter) and not '/' (it appears in model names).
VARIANT_SEP = "--"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _parse_optimization(value: Any) -> Optimization:
    try:
        return parse(value if value is not None else "none")
    except ValidationError as e:
        # Re-raise as a plain message so pydantic nests it under this field's path.
        raise ValueError("; ".join(
            (f"{'.'.join(map(str, err['loc']))}: " if err["loc"] else "") + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )) from None


OptimizationField = Annotated[Optimization, BeforeValidator(_parse_optimization)]


class EngineSettings(_Strict):
    """vLLM engine settings. Set on a model; a variant may override any of them."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (or CPU cores on a CPU host) one engine is split over.")
    max_model_len: int | None = Field(2048, ge=16, description="Longest prompt + completion in tokens; None: the model's own limit.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Compute dtype of unquantized layers.")
    enforce_eager: bool | None = Field(None, description="Skip graph capture. None: on for CPU hosts (much faster start), off on GPU.")
    cpu_kvcache_gib: float = Field(1.0, gt=0, description="KV cache size per engine on a CPU host (VLLM_CPU_KVCACHE_SPACE).")
    cpu_int4_activations: Literal["bfloat16", "int8"] = Field(
        "bfloat16",
        description="CPU hosts with AMX: how vLLM computes 4-bit (W4A16) checkpoints (VLLM_CPU_INT4_W4A8). "
        "`bfloat16`: as the checkpoint says, the model the quality gate measured. `int8`: vLLM's own default "
        "there, activations quantized to int8 as well: faster at batch 1, but it loses more than the gate "
        "measured (docs/BENCHMARKS.md: SmolLM2, both settings).",
    )
    gpu_share: float | None = Field(
        None, gt=0, le=1,
        description="GPU hosts: the share of one GPU each rank of this engine takes — Ray's fractional GPU "
        "resource, and vLLM's memory share (gpu_memory_utilization = 0.9 x share). None (auto): a whole GPU per "
        "rank when the cluster has a GPU for every engine, else the GPUs are split evenly between the engines "
        "(an A/B of two variants on one GPU: 0.5 each). Tensor parallelism (size > 1) takes whole GPUs.",
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="Any other vLLM engine argument, passed as is (e.g. compilation_config).")

    @field_validator("extra")
    @classmethod
    def _no_model_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = {"model", "served_model_name", "quantization"} & set(v)
        if bad:
            raise ValueError(f"{sorted(bad)} are set by slimserve from the model source and variant")
        unsafe = {"load_format", "trust_remote_code"} & set(v)
        if unsafe:
            # Weights from safetensors only and no code from the model folder: the safety the README promises.
            raise ValueError(
                f"{sorted(unsafe)} cannot be set here: slimserve loads safetensors only, and a model's own code runs "
                "only with `trust_remote_code: true` on the model (models[].trust_remote_code)"
            )
        return v

    @model_validator(mode="after")
    def _gpu_share_fits(self) -> "EngineSettings":
        if self.gpu_share is not None and self.gpu_share < 1 and self.tensor_parallel_size > 1:
            raise ValueError(
                f"gpu_share {self.gpu_share:g} with tensor_parallel_size {self.tensor_parallel_size}: the ranks of a "
                "tensor-parallel engine need whole GPUs (Ray could put two ranks on one GPU); drop gpu_share or set it to 1"
            )
        util = self.extra.get("gpu_memory_utilization")
        if self.gpu_share is not None and isinstance(util, (int, float)) and util > self.gpu_share:
            raise ValueError(
                f"extra.gpu_memory_utilization {util:g} is more than gpu_share {self.gpu_share:g}: the engine would take "
                "memory its GPU neighbours were promised; leave it out (slimserve sets 0.9 x gpu_share) or lower it"
            )
        return self


class DeploymentSettings(_Strict):
    """How each variant's engine deployment is placed and scaled (Ray Serve options)."""

    replicas: int = Field(1, ge=1, description="Engine replicas per variant, fixed. Not with `autoscaling`.")
    autoscaling: AutoscalingSettings | None = Field(
        None,
        description="Scale each variant's engine replicas with its traffic (Ray Serve's autoscaling: min_replicas, "
        "max_replicas, target_ongoing_requests, delays) instead of a fixed `replicas`. A variant may override "
        "any field (variants[].autoscaling). Unset: `replicas` engines per variant.",
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(
        128, ge=-1, description="Requests waiting for a replica of the variant, per ingress replica; beyond it the "
        "answer is 429 with Retry-After instead of an ever longer queue (-1: unbounded)."
    )
    num_cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per engine worker (one worker per tensor-parallel rank).")
    cpu_threads_bind: str = Field(
        "auto",
        description="CPU hosts: VLLM_CPU_OMP_THREADS_BIND for the engine. `auto` gives every engine its own "
        "cores, so engines never share one (sharing a core slows vLLM CPU 20-30x).",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for the replicas. Never a secret: this "
        "is deployment config, shown by Ray's dashboard; give keys through the pods' environment (a Secret).")
    stream_batching_interval_ms: float = Field(
        50, ge=0, le=1000,
        description="How long the engine replica gathers a streamed answer's chunks before sending them on, "
        "after the first chunk, which always leaves at once (time to first token stays the engine's). 50 (Ray "
        "Serve LLM's own interval) keeps throughput at high concurrency; 0 sends every token as its own message "
        "(smoothest stream, but 0.29x the output tokens/s of the bare engine at 64 streams on an H200).",
    )

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> "DeploymentSettings":
        if self.autoscaling is not None and "replicas" in self.model_fields_set:
            raise ValueError("give either `replicas` (a fixed count) or `autoscaling` (min_replicas..max_replicas), not both")
        return self


class Variant(_Strict):
    """One way of serving a model, with its share of the traffic."""

    name: str = Field(pattern=_NAME, description="Variant name, shown in x-slimserve-variant and metrics.")
    weight: float = Field(1.0, ge=0, description="Relative share of requests sent to the public name (0: only forced requests).")
    optimization: OptimizationField = Field(
        default_factory=lambda: parse("none"),
        description="What to do to the base model at load: a method name or {method: ..., params}.",
    )
    quality: QualityGate = Field(
        default_factory=QualityGate,
        description="Perplexity check after optimizing, and what to do when the variant loses too much.",
    )
    engine: dict[str, Any] = Field(default_factory=dict, description="Overrides of the model's engine settings for this variant.")
    required: bool = Field(
        False,
        description="If this variant cannot be prepared at load (optimization error, quality gate with "
        "on_quality_fail: fail, a TP size that does not fit), fail the whole app. Off: the variant is marked failed "
        "(in /v1/models and slimserve_variant_up), its traffic goes to the other variants, and the app serves on.",
    )
    student: str | dict[str, Any] | None = Field(
        None,
        description="Serve a distilled student under this model's name: a checkpoint path, or a recipe "
        "({prune: {...} | config: {...}, distill: {...}}) built once and cached. Short for optimization: {method: student, ...}.",
    )
    build_timeout_s: float = Field(
        DEFAULT_BUILD_TIMEOUT_S, gt=0,
        description="Longest time building this variant's optimized checkpoint may take. Past it the optimizer's "
        "process (and all it started) is stopped and the variant fails with the process's last lines of output. A "
        "replica waiting for another one that builds the same artifact waits up to twice this. The replica's start "
        "(wait, build, engine start) must fit Ray Serve LLM's engine start timeout: slimserve sets "
        "RAYLLM_ENGINE_START_TIMEOUT_S for the variant to 3 x build_timeout_s + engine_start_timeout_s.",
    )
    engine_start_timeout_s: float = Field(
        DEFAULT_ENGINE_START_TIMEOUT_S, gt=0,
        description="Room for the engine's own start after the checkpoint is ready (waiting for the node's "
        "engine-start lock on GPU hosts, loading weights, profiling, graph capture); part of the variant's "
        "RAYLLM_ENGINE_START_TIMEOUT_S (see build_timeout_s).",
    )
    prepare_retry: PrepareRetry = Field(
        default_factory=PrepareRetry,
        description="A variant that is not `required` and failed to prepare for a transient reason (cache lock "
        "timeout, out of memory, full disk) tries again in its replica: {attempts, backoff_s}.",
    )
    autoscaling: AutoscalingOverride | None = Field(
        None,
        description="This variant's autoscaling: fields laid over the model's deployment.autoscaling (e.g. "
        "{min_replicas: 0} for a weight-0 variant kept for forced requests, {min_replicas: 2, max_replicas: 2} "
        "to pin a count). A model without autoscaling: a block of the variant's own, with max_replicas.",
    )

    @field_validator("engine")
    @classmethod
    def _engine_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        EngineSettings.model_validate(v)  # same fields and checks as the model's engine block
        return v

    @model_validator(mode="after")
    def _student_is_an_optimization(self) -> "Variant":
        if self.student is None:
            return self
        if "optimization" in self.model_fields_set:
            raise ValueError("give either `student` or `optimization`, not both")
        spec = {"path": self.student} if isinstance(self.student, str) else {"recipe": self.student}
        self.optimization = _parse_optimization({"method": "student", **spec})
        return self


class ModelSpec(_Strict):
    """A public model name served by one or more variants."""

    name: str = Field(pattern=_NAME, description="Public model name that clients send as `model`.")
    source: str = Field(DEFAULT_MODEL, description="Local Hugging Face folder of the base model, or `default`.")
    trust_remote_code: bool = Field(False, description="Let the model's folder run its own Python code. Off unless needed.")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)
    variants: list[Variant] = Field(min_length=1, description="The variants traffic is split between.")
    sticky: bool = Field(
        True,
        description="Send every request of one user (OpenAI `user` field, or the x-slimserve-user header) to the "
        "same variant, by weighted consistent hashing: a small weight change moves few users. While a `rollout:` "
        "runs, its baseline and candidate count as one variant here and split per request, unless `rollout.sticky`.",
    )
    shadow: str | None = Field(
        None,
        description="A variant that also gets a copy of every request for this name, asynchronously: the client "
        "never waits on it; its latency and errors are recorded. Usually a variant with weight 0.",
    )
    probe: LiveProbeSettings | None = Field(
        None, description="Live quality signal: replay a sample of real requests to the baseline and the other "
        "variants and record how well they agree. Unset: no probes.",
    )
    rollout: RolloutSettings | None = Field(
        None, description="Progressive rollout of a candidate variant with guardrails. Unset: weights as configured.",
    )

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[Variant]) -> list[Variant]:
        names = [x.name for x in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate variant names: {dupes}")
        if sum(x.weight for x in v) <= 0:
            raise ValueError("all variant weights are 0: at least one must be positive")
        return v

    @model_validator(mode="after")
    def _variant_engines(self) -> "ModelSpec":
        # A variant's overrides are checked alone above; here the merged settings (e.g. the model's
        # tensor_parallel_size with the variant's gpu_share), reported at the variant's path.
        for i, v in enumerate(self.variants):
            try:
                self.engine_for(v)
            except ValidationError as e:
                raise ValueError(
                    f"variants.{i}.engine (merged with the model's engine): "
                    + "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
                ) from None
        return self

    @model_validator(mode="after")
    def _builds_fit_ray_start_timeout(self) -> "ModelSpec":
        # Unset, slimserve sets Ray's limit per variant from its timeouts (app.llm_config_for).
        given = self.deployment.env.get(RAY_ENGINE_START_TIMEOUT_ENV)
        if given is None:
            return self
        try:
            limit = float(given)
        except ValueError:
            raise ValueError(f"deployment.env.{RAY_ENGINE_START_TIMEOUT_ENV}: {given!r} is not a number of seconds") from None
        for i, v in enumerate(self.variants):
            why = misfit(v.build_timeout_s, v.engine_start_timeout_s, limit, "deployment.env")
            if why:
                raise ValueError(f"variants.{i}.build_timeout_s: {why}")
        return self

    @model_validator(mode="after")
    def _shadow_is_a_variant(self) -> "ModelSpec":
        names = [v.name for v in self.variants]
        if self.shadow is not None and self.shadow not in names:
            raise ValueError(f"shadow: {self.shadow!r} is not one of this model's variants {names}")
        check_probe_and_rollout(names, self.probe, self.rollout)
        return self

    @model_validator(mode="after")
    def _scaling(self) -> "ModelSpec":
        # Each variant's autoscaling merged with the model's, then scale to zero only where no
        # traffic reaches the variant (a variant at zero replicas answers only after a cold start).
        for i, v in enumerate(self.variants):
            try:
                scaling = self.autoscaling_for(v)
            except ValidationError as e:
                raise ValueError(
                    f"variants.{i}.autoscaling"
                    + (" (merged with the model's deployment.autoscaling): " if self.deployment.autoscaling is not None
                       else " (the model has no deployment.autoscaling to fill it in): ")
                    + "; ".join((f"{'.'.join(map(str, err['loc']))}: " if err["loc"] else "")
                                + err["msg"].removeprefix("Value error, ") for err in e.errors())
                ) from None
            if scaling is None or scaling.min_replicas > 0:
                continue
            gets_traffic = [why for why, hit in (
                (f"weight {v.weight:g}", v.weight > 0),
                ("it is the model's shadow (a copy of every request)", self.shadow == v.name),
                ("it is the rollout's candidate", self.rollout is not None and self.rollout.candidate == v.name),
                ("it is the rollout's baseline", self.rollout is not None
                 and (self.rollout.baseline or self.variants[0].name) == v.name),
                ("the model's `probe:` sends samples to every variant", self.probe is not None),
            ) if hit]
            if gets_traffic:
                own = v.autoscaling is not None and v.autoscaling.min_replicas is not None
                raise ValueError(
                    f"{f'variants.{i}.autoscaling' if own else 'deployment.autoscaling'}.min_replicas: 0 (scale to "
                    f"zero) only for a variant that gets no traffic, but {v.name!r} gets some: {'; '.join(gets_traffic)}"
                    + ("" if own else f". Set variants.{i}.autoscaling.min_replicas to 1 or more for it")
                )
        return self

    def autoscaling_for(self, variant: Variant) -> AutoscalingSettings | None:
        """The variant's autoscaling (the model's block with the variant's fields over it); None:
        a fixed `deployment.replicas`."""
        return merged(self.deployment.autoscaling, variant.autoscaling)

    def max_replicas_for(self, variant: Variant) -> int:
        """The most engine replicas the variant can have: what CPU cores and GPU shares are planned for."""
        scaling = self.autoscaling_for(variant)
        return scaling.max_replicas if scaling is not None else self.deployment.replicas

    def engine_for(self, variant: Variant) -> EngineSettings:
        return EngineSettings.model_validate({**self.engine.model_dump(exclude_unset=True), **variant.engine})

    def model_id(self, variant: Variant) -> str:
        return f"{self.name}{VARIANT_SEP}{variant.name}"


class SlimserveConfig(_Strict):
    """A slimserve deployment: models, their variants, and where artifacts are cached."""

    cache_dir: str = Field(
        default_factory=lambda: str(slimserve_home() / "artifacts"),
        description="Artifact cache folder (a shared volume / PVC in Kubernetes). Rollout state lives in its "
        "`rollouts/` folder.",
    )
    cache_volume: Literal["shared", "node_local"] = Field(
        "shared",
        description="`shared`: cache_dir is one volume every Ray node mounts (a ReadWriteMany PVC); one node builds "
        "an artifact, the others load it, and each engine checks at start that it sees the same volume. "
        "`node_local`: each node has a cache of its own and builds what its engines need once.",
    )
    cache_max_gib: float | None = Field(
        None, gt=0,
        description="Size cap of the artifact cache in GiB: after each build, the least recently used artifacts "
        "that no replica is serving are evicted until it fits. None: unbounded. (`slimserve cache prune` too.)",
    )
    models: list[ModelSpec] = Field(min_length=1)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    hosts: HostSettings = Field(
        default_factory=HostSettings,
        description="The hosts the engines run on ({accelerator, gpu_compute_capability}): a variant whose method "
        "has no kernels there is refused here, before any build.",
    )

    @model_validator(mode="after")
    def _unique_models(self) -> "SlimserveConfig":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names: {dupes}")
        ids = {m.model_id(v) for m in self.models for v in m.variants}
        clash = ids & set(names)
        if clash:
            raise ValueError(f"public names clash with variant ids: {sorted(clash)}")
        return self

    @model_validator(mode="after")
    def _methods_run_on_the_hosts(self) -> "SlimserveConfig":
        self.hosts.check_methods([(("models", i, "variants", j, "optimization"), v.optimization)
                                  for i, m in enumerate(self.models) for j, v in enumerate(m.variants)])
        return self
