"""The one owner of an app's rollouts: their state, the decisions, and the evidence every ingress
replica feeds it. It runs as a Serve deployment of one replica (app.py), so Ray restarts it where
there is room when it or its node dies; its state is in Ray's GCS store and the cache folder
(rollout/state.py), so a restart, a node's loss or a redeploy resumes at the step, and only its
evidence starts again (a step's minimum then counts from the restart).

Every ingress replica reports what it answered since its last report (`RolloutReport`) about once
a second and routes by the states the owner answers with (`RolloutView`), so a step's evidence is
all of the app's traffic, whatever the number of ingress replicas and nodes."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slimserve.serve.config.rollout import RolloutSettings
from slimserve.serve.rollout.controller import ADMIN_ACTIONS, RolloutController
from slimserve.serve.rollout.state import KeyValue, RolloutState, StateStore

log = logging.getLogger("slimserve.rollout")

# model, variant, status, ttft_s, e2e_s, user: one finished request (telemetry's RequestTimer).
Observation = tuple[str, str, str, float | None, float, str | None]


class RolloutReport(BaseModel):
    """What one ingress replica saw since its last report."""

    model_config = ConfigDict(extra="forbid")

    replica: str = Field(description="The reporting ingress replica (for the log).")
    observations: list[Observation] = Field(default_factory=list, description="Finished requests of rolled-out models.")
    probes: list[tuple[str, str, bool]] = Field(default_factory=list, description="(model, variant, matched) live probes.")
    candidate_up: dict[str, bool | None] = Field(
        default_factory=dict, description="Model -> whether its candidate is up as this replica sees it (None: not known).")
    dropped: int = Field(0, description="Observations this replica dropped while the owner could not be reached.")


class RolloutView(BaseModel):
    """One rollout as the ingress replicas route by it and show it."""

    state: RolloutState | None = None
    summary: dict[str, Any] = Field(default_factory=dict, description="For /v1/models (public fields) and the admin GET.")


class AdminAnswer(BaseModel):
    view: RolloutView | None = None
    error: str | None = Field(None, description="Why the action does not apply (answered 409).")


class RolloutOwner:
    """Holds one RolloutController per model with a `rollout:` block."""

    def __init__(self, rollouts: dict[str, dict], folder: str, app_name: str | None = None,
                 mirror: KeyValue | None | str = "gcs"):
        """`mirror`: where the state's second copy goes: "gcs" (Ray's GCS store when this process
        is in a Ray cluster, as in the app), a store, or None (the file only)."""
        if app_name is None or mirror == "gcs":
            from slimserve.serve.rayllm import GcsKeyValue, serve_app_name
            app_name = app_name or serve_app_name() or "default"
            mirror = GcsKeyValue.if_connected() if mirror == "gcs" else mirror
        self.controllers = {
            model: RolloutController(model, s.baseline, s, StateStore(Path(folder), app_name, model, mirror))
            for model, s in ((m, RolloutSettings.model_validate(raw)) for m, raw in rollouts.items())
        }
        self.candidate_up: dict[str, bool | None] = {m: None for m in self.controllers}
        self.received = {m: 0 for m in self.controllers}  # observations taken in, per model (tests, log)
        self.dropped = 0
        self._ticked: dict[str, float] = {}  # model -> monotonic time of its last tick
        for c in self.controllers.values():
            self._tick(c)  # read (or start) the stored state now: the first report routes by it

    async def report(self, report: RolloutReport) -> dict[str, RolloutView]:
        """Take one replica's news, decide where due, answer every rollout's view. (Coroutines
        without an await: Serve runs them one at a time on the replica's loop, never in threads.)"""
        for model, variant, status, ttft_s, e2e_s, user in report.observations:
            c = self.controllers.get(model)
            if c is not None:
                c.observe(variant, status, ttft_s, e2e_s, user)
                self.received[model] += 1
        for model, variant, matched in report.probes:
            c = self.controllers.get(model)
            if c is not None:
                c.probed(variant, matched)
        if report.dropped:
            self.dropped += report.dropped
            log.warning("rollout evidence: ingress replica %s dropped %d observations while this owner was "
                        "unreachable", report.replica, report.dropped)
        for model, up in report.candidate_up.items():
            if model in self.candidate_up and up is not None:
                self.candidate_up[model] = up
        for c in self.controllers.values():
            self._tick_when_due(c)
        return self._views()

    def _tick_when_due(self, c: RolloutController) -> None:
        """A tick reads the stored state and may decide: at the rollout's own cadence, not once per
        report (N ingress replicas report about once a second each; decisions come every
        evaluate_every_s anyway, and this owner is the state's only writer)."""
        now = time.monotonic()
        if now - self._ticked.get(c.model, -float("inf")) >= c.settings.evaluate_every_s:
            self._ticked[c.model] = now
            self._tick(c)

    def _tick(self, c: RolloutController) -> None:
        try:
            c.tick(self.candidate_up.get(c.model))
            c.set_gauges()
        except Exception as e:  # one rollout's trouble (a full disk) must not stop the others
            log.warning("rollout of %s: %s", c.model, e)

    async def views(self) -> dict[str, RolloutView]:
        return self._views()

    def _views(self) -> dict[str, RolloutView]:
        return {m: RolloutView(state=c.state, summary=c.summary()) for m, c in self.controllers.items()}

    async def admin(self, model: str, action: str, reason: str) -> AdminAnswer:
        """An operator's action (the ingress checked the model and the action's name)."""
        if model not in self.controllers or action not in ADMIN_ACTIONS:
            return AdminAnswer(error=f"no rollout of `{model}` or no action `{action}`")
        c = self.controllers[model]
        try:
            c.admin(action, reason)
        except ValueError as e:
            return AdminAnswer(error=str(e))
        c.set_gauges()
        return AdminAnswer(view=RolloutView(state=c.state, summary=c.summary()))

    async def check_health(self) -> None:
        """Serve's health check; also a decision clock while no ingress replica reports (a
        candidate that went quiet is still judged; each controller decides at its own cadence)."""
        for c in self.controllers.values():
            self._tick_when_due(c)
