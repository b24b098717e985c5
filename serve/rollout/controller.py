"""Progressive rollout of one model's candidate variant: the controller the rollout's owner runs
(rollout/owner.py, one per app).

Every `evaluate_every_s` the controller weighs the current step's evidence (evidence.decide): a
guardrail breach sets the candidate's share to 0 at once and records why; a step with enough
significant evidence advances; otherwise the step holds. The state is stored (rollout/state.py),
so a restart resumes the rollout; every ingress replica routes by it.

The evidence is what every ingress replica answered (their requests, outcomes and latencies of
the two variants since the rollout, or the owner, started, and their live probes), reported to
the owner. A step's minimum counts from the step's start or, after a restart, from when the
evidence restarted."""

from __future__ import annotations

import logging
import time
from typing import Callable

from slimserve.serve.metrics import metric
from slimserve.serve.config.rollout import RolloutSettings
from slimserve.serve.rollout.evidence import OUTCOMES, RolloutEvidence, decide, update_bounds
from slimserve.serve.rollout.state import RolloutState, StateStore, settings_digest, tuning_digest

log = logging.getLogger("slimserve.rollout")

ADMIN_ACTIONS = ("pause", "resume", "abort", "promote")
STATUSES = ("running", "paused", "promoted", "rolled_back", "aborted")


class RolloutController:
    def __init__(self, model: str, baseline: str, settings: RolloutSettings, store: StateStore,
                 clock: Callable[[], float] = time.time):
        self.model, self.baseline, self.candidate = model, baseline, settings.candidate
        self.settings, self.store, self.clock = settings, store, clock
        self.state: RolloutState | None = None
        self.evidence = RolloutEvidence()
        self._evidence_since = clock()
        self._down_since: float | None = None
        self._seen_up = False  # a candidate still loading is not "unavailable": only one that was up
        self._last_tick = -float("inf")
        self.last_decision = None  # the latest look's Decision: a hold says what it waits for (summary)

    # --- evidence, fed by the ingress ------------------------------------------------------

    def observe(self, variant: str, status: str, ttft_s: float | None, e2e_s: float, user: str | None = None) -> None:
        """One finished request of this model (telemetry's RequestTimer.finish); `user` groups a
        user's requests (they go together when routing is sticky)."""
        side = {self.baseline: "baseline", self.candidate: "candidate"}.get(variant)
        if side is not None:
            self.evidence.record(side, status, ttft_s, e2e_s, user)

    def probed(self, variant: str, matched: bool) -> None:
        if variant == self.candidate:
            self.evidence.probes += 1
            self.evidence.matches += matched

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
                state = self._start_over(state, now)
            elif state.tuning_digest != tuning_digest(self.settings):
                # New guardrails or durations: same candidate, same steps: keep the step and the evidence.
                state.tuning_digest = tuning_digest(self.settings)
                state.record("settings", "rollout settings changed (guardrails, durations or cadence); step kept")
                self.store.save(state)
            if self.state is not None and state.step_started != self.state.step_started:
                self.evidence.step_requests = 0  # a new step (or one an admin restarted)
            self.state = state
            if state.status == "running" and now - self._last_tick >= self.settings.evaluate_every_s:
                self._last_tick = now
                self.evidence.unavailable_s = now - self._down_since if self._down_since else 0.0
                elapsed = now - max(state.step_started, self._evidence_since)
                self.last_decision = decide(self.settings, self.evidence, elapsed)
                self._apply(state, self.last_decision, now)
                update_bounds(self.settings, self.evidence)
        return self.state

    def _start_over(self, old: RolloutState | None, now: float) -> RolloutState:
        """A new rollout (first start, or a new candidate, baseline or steps): fresh evidence; the
        history goes on, and says why."""
        state = self._new_state(now)
        why = f"rolling out {self.candidate} against {self.baseline}"
        if old is not None:
            state.history = old.history
            was = f"{old.candidate} against {old.baseline}, steps {', '.join(f'{x:g}' for x in old.steps)}"
            why += f", steps {', '.join(f'{x:g}' for x in self.settings.steps)} (was {was}: starting over)"
        state.record("start", why)
        self.evidence, self._evidence_since = RolloutEvidence(), now
        self._count("start")
        self.store.save(state)
        return state

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
        self.evidence.step_requests = 0
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
        self.evidence.step_requests = 0
        self._count(action)
        self.state = state
        return state

    def _new_state(self, now: float) -> RolloutState:
        return RolloutState(model=self.model, baseline=self.baseline, candidate=self.candidate,
                            steps=self.settings.steps, settings_digest=settings_digest(self.baseline, self.settings),
                            tuning_digest=tuning_digest(self.settings), step_started=now)

    # --- what the ingress does with the state -------------------------------------------------

    def pair_weights(self, configured: dict[str, float]) -> dict[str, float]:
        return pair_weights(share_percent(self.state, self.settings), self.baseline, self.candidate, configured)

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
            return self.store.annotate({})
        ev = self.evidence
        return self.store.annotate({"candidate": s.candidate, "baseline": s.baseline, "status": s.status, "step": s.step + 1,
                "steps": s.steps, "candidate_percent": s.percent,
                "step_evidence": {"candidate_requests": ev.step_requests},
                # Worded here, not every look: a hold's reason searches for how much more it needs.
                "last_decision": ({"action": self.last_decision.action, "reason": self.last_decision.reason}
                                  if self.last_decision is not None and s.status == "running" else None),
                "evidence": {"candidate_requests": ev.candidate.requests, "candidate_errors": ev.candidate.failures,
                             "baseline_requests": ev.baseline.requests, "probes": ev.probes, "matches": ev.matches,
                             "outcomes": {side: dict(zip(OUTCOMES, map(int, getattr(ev, side).outcomes)))
                                          for side in ("baseline", "candidate")}},
                "history": [h.model_dump() for h in s.history]})  # + the state file's error, if any


def share_percent(state: RolloutState | None, settings: RolloutSettings) -> float:
    """The candidate's share of the pair's traffic, %: the state's, or the first step's before any."""
    return state.percent if state else settings.steps[0]


def pair_weights(percent: float, baseline: str, candidate: str, configured: dict[str, float]) -> dict[str, float]:
    """The two variants' weights for the candidate's share; together they keep the weight the
    config gave them (others are untouched)."""
    total = (configured.get(baseline, 0) + configured.get(candidate, 0)) or 1.0
    return {candidate: total * percent / 100, baseline: total * (1 - percent / 100)}
