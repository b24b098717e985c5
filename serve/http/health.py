"""What each variant is doing — loading, ready, waiting for resources, failed, unhealthy — as the
ingress sees it, kept current in the background so that routing and `/v1/models` never wait on
an engine.

Two sources: Serve's controller (`serve.status()`: is the variant's deployment up, still
starting, or are its replicas not even scheduled?) and, for deployments that are up, the engine
replica itself (`slimserve_info`: did its on-load step fail? `check_health`: does it answer?)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from slimserve.serve.config.retry import describe_retry

log = logging.getLogger("slimserve.health")

# Serve's own words when a replica waits for resources (ray/serve/_private/deployment_state.py,
# after RAY_SERVE_SLOW_STARTUP_WARNING_S, 30 s by default).
_NOT_SCHEDULED = "to be scheduled"
PROBE_TIMEOUT_S = 5.0
# A request for a variant that is not known to be ready refreshes the states first, at most this often.
ON_DEMAND_REFRESH_S = 0.5


class State(str, Enum):
    LOADING = "loading"  # optimizing, or its engine starting
    WAITING_FOR_RESOURCES = "waiting_for_resources"  # its replica cannot be placed (yet)
    READY = "ready"
    FAILED = "failed"  # its on-load step failed, or its deployment did
    UNHEALTHY = "unhealthy"  # Serve's health checks fail


@dataclass
class VariantHealth:
    state: State = State.LOADING
    reason: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)  # slimserve_info of a replica, once up
    since: float = field(default_factory=time.monotonic)

    @property
    def available(self) -> bool:
        return self.state is State.READY

    def describe(self) -> str:
        return f"{self.state.value}: {self.reason}" if self.reason else self.state.value


def from_deployment_status(status: str, message: str) -> VariantHealth:
    """A variant's health from its deployment's Serve status (before asking the engine)."""
    status = str(status).rsplit(".", 1)[-1].upper()
    if status in ("HEALTHY", "UPSCALING", "DOWNSCALING"):
        return VariantHealth(State.READY)
    if status == "DEPLOY_FAILED":
        return VariantHealth(State.FAILED, _short(message) or "its deployment failed")
    if status == "UNHEALTHY":
        return VariantHealth(State.UNHEALTHY, _short(message) or "its replicas fail their health checks")
    if _NOT_SCHEDULED in message:
        return VariantHealth(State.WAITING_FOR_RESOURCES, _short(message))
    return VariantHealth(State.LOADING, "optimizing or starting its engine")


def _short(message: str) -> str:
    """Serve's message without the advice addressed to Ray operators."""
    return message.replace(" Use `ray status` for more details.", "").strip()


class HealthBoard:
    """The states of all variants of one ingress replica.

    `handles`: model id -> the variant's DeploymentHandle; `serve_status`: returns Serve's
    StatusOverview (a blocking call, run in a thread)."""

    def __init__(self, handles: dict[str, Any], app_name: str | None, serve_status: Callable[[], Any]):
        self._handles = handles
        self._app_name = app_name
        self._serve_status = serve_status
        self.states: dict[str, VariantHealth] = {m: VariantHealth() for m in handles}
        self._last_refresh = -float("inf")
        self._refreshing: asyncio.Task | None = None
        # The first serve.status() in a process connects to the controller (seconds, partly under
        # the GIL): done now, in the background, rather than in the first request.
        threading.Thread(target=self._warm_up, daemon=True).start()

    def _warm_up(self) -> None:
        try:
            self._serve_status()
        except Exception:
            pass

    def state_of(self, model_id: str) -> VariantHealth:
        return self.states[model_id]

    async def refresh(self, wait_s: float | None = None) -> None:
        """Bring every state up to date; concurrent callers share one refresh. With `wait_s`,
        return after that long at most (the refresh goes on in the background)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        try:
            await asyncio.wait_for(asyncio.shield(self._refreshing), timeout=wait_s)
        except asyncio.TimeoutError:
            pass

    async def refresh_if_stale(self, model_ids, *, any_down: bool = False, wait_s: float | None = None) -> None:
        """Look again now when the last look is older than ON_DEMAND_REFRESH_S (or still under
        way) and none of `model_ids` is known ready (routing: e.g. the first request after a deploy, which must not
        get a 503 from stale knowledge) — or, with `any_down`, when one is not (listing). While
        one candidate is ready, routing never waits: the background probe picks up the others."""
        if not model_ids:
            return
        asked = time.monotonic()

        def wanted() -> bool:
            down = [not self.states[m].available for m in model_ids]
            return any(down) if any_down else all(down)

        in_flight = self._refreshing is not None and not self._refreshing.done()
        if wanted() and (in_flight or asked - self._last_refresh > ON_DEMAND_REFRESH_S):
            await self.refresh(wait_s)
            # A look already under way when this request came may have read Serve's status before
            # the variant came up (serve.status() takes seconds on a busy host): one more look,
            # begun after the request, decides.
            if wanted() and self._last_refresh < asked and self._refreshing.done():
                await self.refresh(None if wait_s is None else max(0.0, wait_s - (time.monotonic() - asked)))

    async def _refresh(self) -> None:
        self._last_refresh = time.monotonic()
        by_deployment = await self._deployment_states()
        if by_deployment is None:  # the controller did not answer: keep what we knew
            return
        new = await asyncio.gather(*(self._probe(m, by_deployment.get(m)) for m in self._handles))
        for model_id, health in zip(self._handles, new):
            old = self.states[model_id]
            if old.state is not health.state:
                log.info("%s: %s -> %s", model_id, old.describe(), health.describe())
            else:
                health.since = old.since
            if not health.engine:
                health.engine = old.engine
            self.states[model_id] = health

    async def _deployment_states(self) -> dict[str, VariantHealth] | None:
        try:
            overview = await asyncio.to_thread(self._serve_status)
        except Exception as e:  # the controller is restarting
            log.warning("serve.status() failed: %s", e)
            return None
        app = overview.applications.get(self._app_name) if self._app_name else None
        if app is None:
            return {}
        out = {}
        for model_id, handle in self._handles.items():
            dep = app.deployments.get(getattr(handle, "deployment_name", None))
            if dep is not None:
                out[model_id] = from_deployment_status(dep.status, dep.message or "")
        return out

    async def _probe(self, model_id: str, serve_view: VariantHealth | None) -> VariantHealth:
        """Serve's view — which includes the replicas' own health checks — then, for a deployment
        Serve thinks is up, the engine's record (did its on-load step fail? what did it load?). A
        handle is only called once Serve has a running replica behind it: a call to a deployment
        without one would wait for it. A record that is slow to come (a busy host) leaves the
        variant as Serve sees it: ready; a slow answer is not a failure."""
        if serve_view is None:
            return VariantHealth(State.LOADING, "not deployed yet")
        if not serve_view.available:
            return serve_view
        try:
            info = await asyncio.wait_for(self._handles[model_id].slimserve_info.remote(), timeout=PROBE_TIMEOUT_S)
        except Exception as e:
            log.info("%s: no engine record yet (%s); Serve reports it healthy", model_id, type(e).__name__)
            return VariantHealth(State.READY)
        if info.get("retrying"):  # failed for a transient reason, tries again (serve/config/retry.py)
            return VariantHealth(State.LOADING, describe_retry(info["retrying"]), engine=info)
        if info.get("failed"):
            # The first line says what failed (the optimizer's last output lines follow it; the
            # whole text is in slimserve_info and the replica's log).
            return VariantHealth(State.FAILED, f"failed to load: {info['failed'].splitlines()[0]}", engine=info)
        return VariantHealth(State.READY, engine=info)
