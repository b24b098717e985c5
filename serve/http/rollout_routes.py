"""The ingress's side of the app's rollouts (decided by the one rollout owner, rollout/owner.py):
what this replica reports to the owner, what the owner's states do to the router's weights, and
the operator's admin routes (answered by the owner).

    GET  /slimserve/rollout/{model}            the rollout's state, step evidence and history
    POST /slimserve/rollout/{model}/{action}   pause | resume | abort | promote, body {"reason": ...}

The admin routes take only an admin key (`ingress.admin_keys_env`), never a client key; without
admin keys they are off. Checked twice: by guard.py's middleware on every path that names
ADMIN_PREFIX (route prefix or not) and by each route itself (guard.admin_only)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import Any, Callable

from fastapi import Request

from slimserve.serve.config.rollout import RolloutSettings
from slimserve.serve.http.guard import admin_only, error_response
from slimserve.serve.http.split import Router
from slimserve.serve.rollout.controller import ADMIN_ACTIONS, pair_weights, share_percent
from slimserve.serve.rollout.owner import RolloutReport, RolloutView

log = logging.getLogger("slimserve.rollout")

ADMIN_PREFIX = "/slimserve/"
# Observations kept while the owner cannot be reached (its node lost, a restart): beyond this the
# oldest go, counted and reported, so an ingress never grows without bound.
MAX_PENDING = 100_000
REPORT_EVERY_S = 1.0
# How long the first request waits for the owner's states (afterwards: routed by what is known).
FIRST_SYNC_WAIT_S = 5.0


class Rollouts:
    """One ingress replica's side of the app's rollouts: it reports what it answered to the
    rollout owner (rollout/owner.py) and routes by the states the owner answers with."""

    def __init__(self, rollouts: dict[str, RolloutSettings], owner, router: Router):
        self.settings = rollouts
        self.owner = owner  # the owner deployment's handle; None when no model has a rollout
        self.router = router
        self.views: dict[str, RolloutView] = {}
        self.configured = router.weights()  # the config's (or user_config's) weights, before any rollout
        # Reports go at least this often (and at each rollout's cadence when that is shorter).
        self.report_every_s = min([REPORT_EVERY_S, *(s.evaluate_every_s for s in rollouts.values())]) if owner else None
        self._observations: deque = deque(maxlen=MAX_PENDING)
        self._probes: deque = deque(maxlen=MAX_PENDING)
        self._dropped = 0
        self._synced = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self._unreachable_logged = False
        self._replica = f"{os.uname().nodename}:{os.getpid()}"
        self._route()  # the first step's shares until the owner answers

    def new_configured_weights(self) -> None:
        """After the router took new weights from the user_config: the rollouts apply on top."""
        self.configured = self.router.weights()
        self._route()

    def observe(self, labels: dict[str, str], status: str, ttft_s: float | None, e2e_s: float,
                user: str | None = None) -> None:
        if labels["model"] in self.settings:
            if len(self._observations) == self._observations.maxlen:
                self._dropped += 1
            self._observations.append((labels["model"], labels["variant"], status, ttft_s, e2e_s, user))

    def probed(self, model: str, variant: str, matched: bool) -> None:
        if model in self.settings:
            self._probes.append((model, variant, matched))

    async def first_sync(self, available: Callable[[str], bool | None]) -> None:
        """Before the replica's first routed request: the owner's states (a stored rollout
        routes from the first request on); waits at most FIRST_SYNC_WAIT_S."""
        if self.owner is None or self._synced.is_set():
            return
        try:
            await asyncio.wait_for(self.sync(available), FIRST_SYNC_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("rollout owner did not answer within %.0f s: routing by the last known shares", FIRST_SYNC_WAIT_S)
            self._synced.set()

    async def sync(self, available: Callable[[str], bool | None]) -> None:
        """Report what this replica answered since the last report; route by the owner's answer.
        While the owner cannot be reached the report is kept (bounded) and sent later."""
        if self.owner is None:
            return
        async with self._sync_lock:
            observations, probes, dropped = list(self._observations), list(self._probes), self._dropped
            self._observations.clear()
            self._probes.clear()
            self._dropped = 0
            report = RolloutReport(
                replica=self._replica, observations=observations, probes=probes, dropped=dropped,
                candidate_up={m: available(self.router.splits[m].routes[s.candidate].model_id)
                              for m, s in self.settings.items()})
            try:
                views = await self.owner.report.remote(report)
            except Exception as e:
                self._observations.extendleft(reversed(observations))  # sent with the next report
                self._probes.extendleft(reversed(probes))
                self._dropped += dropped
                if not self._unreachable_logged:
                    log.warning("rollout owner unreachable (%s: %s): routing by the last known shares, evidence "
                                "kept for the next report", type(e).__name__, e)
                self._unreachable_logged = True
                return
            if self._unreachable_logged:
                log.info("rollout owner reachable again")
            self._unreachable_logged = False
            self.views = views
            self._synced.set()
            self._route()

    def _route(self) -> None:
        for model, s in self.settings.items():
            view = self.views.get(model)
            percent = share_percent(view.state if view else None, s)
            self.router.set_weights({model: pair_weights(percent, s.baseline, s.candidate, self.configured[model])})

    def summary(self, model: str) -> dict[str, Any] | None:
        if model not in self.settings:
            return None
        view = self.views.get(model)
        return view.summary if view is not None else {}

    def add_admin_routes(self, app, admin_keys: list[bytes]) -> None:
        async def status(model: str, request: Request):
            if model not in self.settings:
                return _no_rollout(model, self.settings)
            try:
                views = await self.owner.views.remote()
            except Exception as e:
                return _owner_unreachable(e)
            self.views = views
            return views[model].summary

        async def act(model: str, action: str, request: Request):
            if model not in self.settings:
                return _no_rollout(model, self.settings)
            if action not in ADMIN_ACTIONS:
                return error_response(400, f"unknown action `{action}` (one of: {', '.join(ADMIN_ACTIONS)})",
                                      "invalid_request_error")
            try:
                body = await request.json() if await request.body() else {}
            except ValueError:
                body = {}
            reason = str(body.get("reason") or f"{action} by an operator") if isinstance(body, dict) else action
            try:
                answer = await self.owner.admin.remote(model, action, reason)
            except Exception as e:
                return _owner_unreachable(e)
            if answer.error is not None:
                return error_response(409, answer.error, "invalid_request_error")
            self.views[model] = answer.view
            self._route()
            return answer.view.summary

        app.add_api_route(ADMIN_PREFIX + "rollout/{model}", admin_only(status, admin_keys), methods=["GET"])
        app.add_api_route(ADMIN_PREFIX + "rollout/{model}/{action}", admin_only(act, admin_keys), methods=["POST"])


def _no_rollout(model: str, settings: dict) -> object:
    known = ", ".join(settings) or "none"
    return error_response(404, f"model `{model}` has no rollout (models with one: {known})", "NotFoundError")


def _owner_unreachable(e: Exception) -> object:
    return error_response(503, f"the rollout owner cannot be reached now ({type(e).__name__}); Ray is restarting "
                          "it: retry shortly", "server_error", {"retry-after": "5"})
