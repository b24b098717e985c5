"""What each variant is doing — loading, ready, idle (scaled to zero), waiting for resources,
failed, unhealthy — as the ingress sees it, kept current in the background so that routing and
`/v1/models` never wait on an engine.

Two sources: Serve's controller (`serve.status()`: is the variant's deployment up, still
starting, or are its replicas not even scheduled? does any replica run?) and, for deployments with
a running replica, the engine replica itself (`slimserve_info`: did its on-load step fail?
`check_health`: does it answer?). A deployment at zero replicas is never called: a call would
start a replica."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from pydantic import ValidationError

from slimserve.serve.config.retry import describe_retry
from slimserve.serve.handoff import EngineRecord
from slimserve.serve.rayllm import waiting_for_resources

log = logging.getLogger("slimserve.health")

PROBE_TIMEOUT_S = 5.0
# A request for a variant that is not known to be ready refreshes the states first, at most this often.
ON_DEMAND_REFRESH_S = 0.5


class State(str, Enum):
    LOADING = "loading"  # optimizing, or its engine starting
    WAITING_FOR_RESOURCES = "waiting_for_resources"  # its replica cannot be placed (yet)
    READY = "ready"
    # Scaled to zero (autoscaling min_replicas 0, a variant without traffic): no replica runs. A
    # request forced to it waits for one to start (a cold start); it counts as available.
    IDLE = "idle"
    FAILED = "failed"  # its on-load step failed, or its deployment did
    UNHEALTHY = "unhealthy"  # Serve's health checks fail


# States in which a request waiting for the variant's answer will not get one soon.
DOWN = (State.UNHEALTHY, State.FAILED)


@dataclass
class VariantHealth:
    state: State = State.LOADING
    reason: str | None = None
    engine: EngineRecord | None = None  # slimserve_info of a replica, once up
    since: float = field(default_factory=time.monotonic)

    @property
    def available(self) -> bool:
        return self.state in (State.READY, State.IDLE)

    def describe(self) -> str:
        return f"{self.state.value}: {self.reason}" if self.reason else self.state.value


def from_deployment_status(status: str, message: str, replica_states: dict | None = None) -> VariantHealth:
    """A variant's health from its deployment's Serve status (before asking the engine).
    `replica_states`: Serve's replica count per state (None: unknown)."""
    status = str(status).rsplit(".", 1)[-1].upper()
    if status in ("HEALTHY", "UPSCALING", "DOWNSCALING"):
        if replica_states is not None and not _count(replica_states, *_SERVING, "STARTING"):
            # Up at its target, yet no replica runs or starts (at most some stopping): autoscaled
            # to zero (Serve's status for a target of 0 is HEALTHY). Only Serve's view is used: a
            # call through its handle would itself start a replica. (Waking from zero, a replica
            # starting, it is `ready` as before: requests wait for that replica.)
            return VariantHealth(State.IDLE, "scaled to zero: a request waits for a replica to start (cold start)")
        return VariantHealth(State.READY)
    if status == "DEPLOY_FAILED":
        return VariantHealth(State.FAILED, _short(message) or "its deployment failed")
    if status == "UNHEALTHY":
        return VariantHealth(State.UNHEALTHY, _short(message) or "its replicas fail their health checks")
    if waiting_for_resources(message):  # Serve's words for it, after 30 s (rayllm.NOT_SCHEDULED)
        return VariantHealth(State.WAITING_FOR_RESOURCES, _short(message))
    return VariantHealth(State.LOADING, "optimizing or starting its engine")


# Serve's replica states of a replica that runs the engine (UPDATING: being reconfigured,
# RECOVERING: after a controller restart, PENDING_MIGRATION: on a draining node, still serving).
_SERVING = ("RUNNING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")


def _count(replica_states: dict, *states: str) -> int:
    """Replicas in any of `states` (Serve's ReplicaState, by name)."""
    return sum(n for s, n in replica_states.items() if str(getattr(s, "value", s)).rsplit(".", 1)[-1].upper() in states)


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
        # Variants whose replica a request just lost -> why: down until a probe reaches an engine
        # again (Serve's status still says healthy for a while after a node goes).
        self._lost: dict[str, tuple[str, float]] = {}  # model id -> (why, when)
        self._replicas: dict[str, dict] = {}  # model id -> Serve's replica count per state, last look
        # Set when the variant stops being available: requests still waiting for its first byte
        # go elsewhere (ingress._unless_down) rather than wait in Serve's queue for a restart.
        self._down: dict[str, asyncio.Event] = {}
        self._restarting: set[str] = set()  # model ids whose running replicas went (see _restart_seen)
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

    def went_down(self, model_id: str) -> asyncio.Event:
        """An event set once this variant is down — lost, failed, failing its health checks —
        (set already if it is). Not when it is being updated: Serve's old replicas answer then."""
        event = self._down.get(model_id)
        down = self.states[model_id].state in DOWN
        if event is None or (event.is_set() and not down):
            event = self._down[model_id] = asyncio.Event()
        if down:
            event.set()
        return event

    def _set(self, model_id: str, health: VariantHealth) -> None:
        self.states[model_id] = health
        if health.state in DOWN and model_id in self._down:
            self._down[model_id].set()

    def mark_lost(self, model_id: str, error: BaseException) -> None:
        """A request to this variant lost its replica (its node went, its actor died): route
        around it at once, until a probe gets an answer from one of its engines again — rather
        than send the next requests to a replica Serve has not yet noticed is gone, where they
        would wait for its restart."""
        why = f"lost a replica ({type(error).__name__}); routed around until one of its engines answers again"
        if model_id not in self._lost:
            log.warning("%s: %s", model_id, why)
        self._lost[model_id] = (why, time.monotonic())
        self._set(model_id, VariantHealth(State.UNHEALTHY, why, engine=self.states[model_id].engine))

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
            if model_id in self._lost and health.available:  # a look begun before the loss
                health = VariantHealth(State.UNHEALTHY, self._lost[model_id][0], engine=health.engine)
            old = self.states[model_id]
            if old.state is not health.state:
                log.info("%s: %s -> %s", model_id, old.describe(), health.describe())
            else:
                health.since = old.since
            if health.engine is None:
                health.engine = old.engine
            self._set(model_id, health)

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
                states = getattr(dep, "replica_states", None)
                health = from_deployment_status(dep.status, dep.message or "", states)
                if states is not None:
                    health = self._restart_seen(model_id, health, self._replicas.get(model_id), dict(states))
                    self._replicas[model_id] = dict(states)
                out[model_id] = health
        return out

    def _restart_seen(self, model_id: str, health: VariantHealth, before: dict | None, now: dict) -> VariantHealth:
        """Serve up at its target, yet none of its replicas runs and one starts: after running
        replicas (not waking from zero), they went — a lost node, a crash — and Serve starts
        another. Requests sent now would wait in Serve's queue for it (minutes on a GPU): down
        until one runs. (A redeploy shows as `loading`: Serve's old replicas answer meanwhile.)"""
        if health.state is not State.READY or _count(now, *_SERVING) or not _count(now, "STARTING"):
            self._restarting.discard(model_id)
            return health
        if model_id in self._restarting or (before is not None and _count(before, *_SERVING)):
            self._restarting.add(model_id)
            return VariantHealth(State.UNHEALTHY, "its replica is gone; Serve is starting another")
        return health

    async def _probe(self, model_id: str, serve_view: VariantHealth | None) -> VariantHealth:
        """Serve's view — which includes the replicas' own health checks — then, for a deployment
        Serve thinks is up, the engine's record (did its on-load step fail? what did it load?). A
        handle is only called once Serve has a running replica behind it: a call to a deployment
        without one would wait for it. A record that is slow to come (a busy host) leaves the
        variant as Serve sees it: ready; a slow answer is not a failure."""
        if serve_view is None:
            return VariantHealth(State.LOADING, "not deployed yet")
        if serve_view.state is State.IDLE:
            # No replica (a call through the handle would start one). Once Serve has none at all,
            # not even a stopping one, a replica a request lost is gone from its view too: the
            # next request starts a fresh one.
            states = self._replicas.get(model_id)
            if states is not None and not any(states.values()):
                self._lost.pop(model_id, None)
            return serve_view
        if not serve_view.available:
            return serve_view
        asked = time.monotonic()
        try:
            info = await asyncio.wait_for(self._handles[model_id].slimserve_info.remote(), timeout=PROBE_TIMEOUT_S)
        except Exception as e:
            if model_id in self._lost:  # no engine answers yet: the lost replica is still the one Serve has
                return VariantHealth(State.UNHEALTHY, self._lost[model_id][0])
            log.info("%s: no engine record yet (%s); Serve reports it healthy", model_id, type(e).__name__)
            return VariantHealth(State.READY)
        if model_id in self._lost and self._lost[model_id][1] < asked:  # asked after the loss: a live engine
            del self._lost[model_id]
            log.info("%s: an engine answers again", model_id)
        try:
            record = EngineRecord.model_validate(info)
        except ValidationError as e:  # an engine of other slimserve code: not routed to blindly
            log.error("%s: its engine's record does not read: %s", model_id, e)
            fields = ", ".join(".".join(map(str, x["loc"])) for x in e.errors())
            return VariantHealth(State.FAILED, f"its engine's record does not read (fields: {fields}); other slimserve code?")
        if record.retrying:  # failed for a transient reason, tries again (serve/config/retry.py)
            return VariantHealth(State.LOADING, describe_retry(record.retrying), engine=record)
        if record.failed:
            # The first line says what failed (the optimizer's last output lines follow it; the
            # whole text is in slimserve_info and the replica's log).
            return VariantHealth(State.FAILED, f"failed to load: {record.failed.splitlines()[0]}", engine=record)
        return VariantHealth(State.READY, engine=record)
