"""How long a variant's replica may take to start, and Ray Serve LLM's own limit on it.

Ray Serve LLM cancels an engine replica whose start (`LLMServer.start`: our on-load hook, then
vLLM's start) takes longer than RAYLLM_ENGINE_START_TIMEOUT_S (3600 s by default, read once when
the replica imports ray.llm); Serve then starts a new replica, which builds again, and again. A
build's budget must therefore sit inside that limit, with room for the engine's own start:

    start budget = waiting for another replica building the same artifact (2 x build_timeout_s)
                 + building (build_timeout_s)
                 + the engine's start, engine-start lock wait included (engine_start_timeout_s)

`build_app` sets RAYLLM_ENGINE_START_TIMEOUT_S to that in each variant's runtime_env (a value the
user sets in `deployment.env` wins and is checked by the config); the replica checks the limit it
actually got before building, so a limit set elsewhere fails with one clear message instead of a
build Ray cancels."""

from __future__ import annotations

import math

from slimserve.optimizers.build.pipeline import LOCK_WAIT_FACTOR

RAY_ENGINE_START_TIMEOUT_ENV = "RAYLLM_ENGINE_START_TIMEOUT_S"
DEFAULT_ENGINE_START_TIMEOUT_S = 1800.0


def start_budget_s(build_timeout_s: float, engine_start_timeout_s: float) -> int:
    """Seconds a replica's start may take (Ray reads its limit as an integer)."""
    return math.ceil((LOCK_WAIT_FACTOR + 1) * build_timeout_s + engine_start_timeout_s)


def misfit(build_timeout_s: float, engine_start_timeout_s: float, ray_limit_s: float, where: str) -> str | None:
    """Why a build of `build_timeout_s` cannot fit Ray's limit (`where` it was set), or None."""
    need = start_budget_s(build_timeout_s, engine_start_timeout_s)
    if ray_limit_s >= need:
        return None
    return (
        f"build_timeout_s {build_timeout_s:g} does not fit Ray Serve LLM's engine start timeout "
        f"{RAY_ENGINE_START_TIMEOUT_ENV}={ray_limit_s:g} ({where}): the replica's start may take "
        f"{LOCK_WAIT_FACTOR} x {build_timeout_s:g} s waiting for another builder + {build_timeout_s:g} s building + "
        f"{engine_start_timeout_s:g} s for the engine (engine_start_timeout_s) = {need} s, and Ray would cancel it "
        f"and start the build again, for ever. Lower build_timeout_s, or raise {RAY_ENGINE_START_TIMEOUT_ENV} to at "
        f"least {need} (or leave it unset: slimserve sets it per variant)"
    )
