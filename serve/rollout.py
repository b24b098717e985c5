"""Progressive rollout of one model's candidate variant: the controller the ingress runs.

Every `evaluate_every_s` the leading ingress replica weighs the current step's evidence
(rollout_evidence.decide): a guardrail breach sets the candidate's share to 0 at once and records
why; a step with enough significant evidence advances; otherwise the step holds. The state lives
on disk (rollout_state.py), so a restart resumes the rollout; every replica routes by it.

The evidence is what the leading replica itself answered (its requests, errors and latencies of
the two variants since the step began, and its live probes): with several ingress replicas it
is that replica's share of the traffic."""

from __future__ import annotations

import logging
import time
from typing import Callable

from .metrics import metric
from .rollout_config import RolloutSettings
from .rollout_evidence import StepEvidence, VariantEvidence, decide
from .rollout_state import RolloutState, StateStore, settings_digest

log = logging.getLogger("slimserve.rollout")

ADMIN_ACTIONS = ("pause", "resume", "abort", "promote")
STATUSES = ("running", "paused", "promoted", "rolled_back", "aborted")


class RolloutController:
    def __init__(self, model: str, baseline: str, settings: RolloutSettings, store: StateStore,
                 clock: Callable[[], float] = time.time):
        self.model, self.baseline, self.candidate = model, baseline, settings.candidate
        self.settings, self.store, self.clock = settings, store, clock
        self.state: RolloutState | None = None
        self.evidence = StepEvidence()
        self._down_since: float | None = None
        self._seen_up = False  # a candidate still loading is not "unavailable": only one that was up
        self._last_tick = -float("inf")

    # --- evidence, fed by the ingress ------------------------------------------------------

    def observe(self, variant: str, status: str, ttft_s: float | None, e2e_s: float) -> None:
        """One finished request of this model (telemetry's RequestTimer.finish)."""
        side = self._side(variant)
        if side is None or status == "cancelled":
            return
        side.requests += 1
        side.errors += status.startswith("5") or status == "error"
        side.e2e.add(e2e_s)
        if ttft_s is not None:
            side.ttft.add(ttft_s)

    def probed(self, variant: str, matched: bool) -> None:
        if variant == self.candidate:
            self.evidence.probes += 1
            self.evidence.matches += matched

    def _side(self, variant: str) -> VariantEvidence | None:
        return {self.baseline: self.evidence.baseline, self.candidate: self.evidence.candidate}.get(variant)

    # --- the loop ----------------------------------------------------------------------------

    def tick(self, candidate_available: bool | None) -> RolloutState:
        """Read (or start) the state; when leading and due, decide. Returns the state to route by.
        `candidate_available` None: not known yet."""
        now = self.clock()
        self._seen_up = self._seen_up or bool(candidate_available)
        if candidate_available is not None:
            self._down_since = None if candidate_available or not self._seen_up else (self._down_since or now)
        if not self.store.lead():
            self.state = self.store.load() or self.state or self._new_state(now)
            return self.state
        with self.store.editing():
            state = self.store.load()
            if state is None or state.settings_digest != settings_digest(self.baseline, self.settings):
                state = self._new_state(now)
                state.record("start", f"rolling out {self.candidate} against {self.baseline}")
                self._count("start")
                self.store.save(state)
            if state.step_started != getattr(self.state, "step_started", None):
                self.evidence = StepEvidence()  # a new step (or one an admin restarted): fresh evidence
            self.state = state
            if state.status == "running" and now - self._last_tick >= self.settings.evaluate_every_s:
                self._last_tick = now
                self.evidence.unavailable_s = now - self._down_since if self._down_since else 0.0
                self._apply(state, decide(self.settings, self.evidence, now - state.step_started), now)
        return self.state

    def _apply(self, state: RolloutState, decision, now: float) -> None:
        if decision.action == "hold":
            return
        if decision.action == "rollback":
            state.status = "rolled_back"
            action = "rollback"
            log.warning("rollout of %s/%s rolled back: %s", self.model, self.candidate, decision.reason)
        elif state.step + 1 < len(state.steps):
            state.step += 1
            action = "advance"
        else:
            state.status = "promoted"
            action = "promote"
        state.step_started = now
        state.record(action, decision.reason)
        self.evidence = StepEvidence()
        self._count(action)
        self.store.save(state)
        self.state = state

    def admin(self, action: str, reason: str) -> RolloutState:
        """An operator's pause / resume / abort / promote; refused (ValueError) when it does not
        apply to the current status."""
        allowed = {"pause": ("running",), "resume": ("paused",), "abort": ("running", "paused"),
                   "promote": ("running", "paused")}[action]
        with self.store.editing():
            state = self.store.load() or self._new_state(self.clock())
            if state.status not in allowed:
                raise ValueError(f"cannot {action} a rollout that is {state.status}")
            state.status = {"pause": "paused", "resume": "running", "abort": "aborted", "promote": "promoted"}[action]
            state.step_started = self.clock()  # resume: the step's evidence starts again
            state.record(action, reason)
            self.store.save(state)
        self.evidence = StepEvidence()
        self._count(action)
        self.state = state
        return state

    def _new_state(self, now: float) -> RolloutState:
        return RolloutState(model=self.model, baseline=self.baseline, candidate=self.candidate,
                            steps=self.settings.steps, settings_digest=settings_digest(self.baseline, self.settings),
                            step_started=now)

    # --- what the ingress does with the state -------------------------------------------------

    def pair_weights(self, configured: dict[str, float]) -> dict[str, float]:
        """The two variants' weights for the current share; together they keep the weight the
        config gave them (others are untouched)."""
        total = (configured.get(self.baseline, 0) + configured.get(self.candidate, 0)) or 1.0
        share = (self.state.percent if self.state else self.settings.steps[0]) / 100
        return {self.candidate: total * share, self.baseline: total * (1 - share)}

    def set_gauges(self) -> None:
        if self.state is None:
            return
        labels = {"model": self.model, "variant": self.candidate}
        metric("slimserve_rollout_percent").set(self.state.percent, tags=labels)
        metric("slimserve_rollout_step").set(self.state.step + 1, tags=labels)
        for status in STATUSES:
            metric("slimserve_rollout_status").set(int(status == self.state.status), tags={**labels, "status": status})

    def _count(self, action: str) -> None:
        metric("slimserve_rollout_decisions_total").inc(1, tags={"model": self.model, "variant": self.candidate,
                                                                  "action": action})

    def summary(self) -> dict:
        """The state for /v1/models and the admin route."""
        s = self.state
        if s is None:
            return {}
        ev = self.evidence
        return {"candidate": s.candidate, "baseline": s.baseline, "status": s.status, "step": s.step + 1,
                "steps": s.steps, "candidate_percent": s.percent,
                "step_evidence": {"candidate_requests": ev.candidate.requests, "candidate_errors": ev.candidate.errors,
                                  "baseline_requests": ev.baseline.requests, "probes": ev.probes, "matches": ev.matches},
                "history": [h.model_dump() for h in s.history]}
