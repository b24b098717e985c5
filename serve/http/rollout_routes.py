"""The ingress's rollouts (one RolloutController per model with a `rollout:` block): what they
do to the router's weights, and the operator's admin routes.

    GET  /slimserve/rollout/{model}            the rollout's state, step evidence and history
    POST /slimserve/rollout/{model}/{action}   pause | resume | abort | promote, body {"reason": ...}

The admin routes take only an admin key (`ingress.admin_keys_env`), never a client key; without
admin keys they are off. Checked twice: by guard.py's middleware on every path that names
ADMIN_PREFIX (route prefix or not) and by each route itself (guard.admin_only)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fastapi import Request

from slimserve.serve.http.split import Router
from slimserve.serve.http.guard import admin_only, error_response
from slimserve.serve.rollout.controller import ADMIN_ACTIONS, RolloutController
from slimserve.serve.config.rollout import RolloutSettings
from slimserve.serve.rollout.state import StateStore

ADMIN_PREFIX = "/slimserve/"


class Rollouts:
    def __init__(self, rollouts: dict[str, RolloutSettings], folder: str, app_name: str | None, router: Router):
        self.router = router
        self.controllers = {
            model: RolloutController(model, s.baseline, s, StateStore(Path(folder), app_name or "default", model))
            for model, s in rollouts.items()
        }
        self.configured = router.weights()  # the config's (or user_config's) weights, before any rollout
        self.interval_s = min((s.evaluate_every_s for s in rollouts.values()), default=None)

    def new_configured_weights(self) -> None:
        """After the router took new weights from the user_config: the rollouts apply on top."""
        self.configured = self.router.weights()
        self._route()

    def tick(self, available: Callable[[str], bool | None]) -> None:
        for model, c in self.controllers.items():
            c.tick(available(self.router.splits[model].routes[c.candidate].model_id))
            c.set_gauges()
        self._route()

    def _route(self) -> None:
        for model, c in self.controllers.items():
            if c.state is not None:
                self.router.set_weights({model: c.pair_weights(self.configured[model])})

    def observe(self, labels: dict[str, str], status: str, ttft_s: float | None, e2e_s: float,
                user: str | None = None) -> None:
        c = self.controllers.get(labels["model"])
        if c is not None:
            c.observe(labels["variant"], status, ttft_s, e2e_s, user)

    def probed(self, model: str, variant: str, matched: bool) -> None:
        c = self.controllers.get(model)
        if c is not None:
            c.probed(variant, matched)

    def summary(self, model: str) -> dict | None:
        c = self.controllers.get(model)
        return c.summary() if c is not None else None

    def add_admin_routes(self, app, admin_keys: list[bytes]) -> None:
        async def status(model: str, request: Request):
            if model not in self.controllers:
                return _no_rollout(model, self.controllers)
            return self.controllers[model].summary()

        async def act(model: str, action: str, request: Request):
            if model not in self.controllers:
                return _no_rollout(model, self.controllers)
            if action not in ADMIN_ACTIONS:
                return error_response(400, f"unknown action `{action}` (one of: {', '.join(ADMIN_ACTIONS)})",
                                      "invalid_request_error")
            try:
                body = await request.json() if await request.body() else {}
            except ValueError:
                body = {}
            reason = str(body.get("reason") or f"{action} by an operator") if isinstance(body, dict) else action
            c = self.controllers[model]
            try:
                c.admin(action, reason)
            except ValueError as e:
                return error_response(409, str(e), "invalid_request_error")
            self._route()
            c.set_gauges()
            return c.summary()

        app.add_api_route(ADMIN_PREFIX + "rollout/{model}", admin_only(status, admin_keys), methods=["GET"])
        app.add_api_route(ADMIN_PREFIX + "rollout/{model}/{action}", admin_only(act, admin_keys), methods=["POST"])


def _no_rollout(model: str, controllers: dict) -> object:
    known = ", ".join(controllers) or "none"
    return error_response(404, f"model `{model}` has no rollout (models with one: {known})", "NotFoundError")
