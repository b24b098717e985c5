"""The rollout's decisions and state (no cluster): guardrails, significance, steps, restarts,
leadership and operator actions. End to end on CPU: test_rollout_e2e.py."""

from __future__ import annotations

import random

import pytest

from slimserve.serve.rollout import RolloutController
from slimserve.serve.rollout_config import RolloutSettings
from slimserve.serve.rollout_evidence import Histogram, StepEvidence, decide, wilson
from slimserve.serve.rollout_state import StateStore


def settings(**kw) -> RolloutSettings:
    return RolloutSettings.model_validate({"candidate": "cand", "steps": [10, 50, 100], "min_requests": 50,
                                           "min_seconds": 10, **kw})


def evidence(n_base=200, n_cand=60, err_base=0, err_cand=0, lat_base=0.2, lat_cand=0.2, probes=0, matches=0, seed=0):
    rng = random.Random(seed)
    ev = StepEvidence(probes=probes, matches=matches)
    for side, n, errs, lat in ((ev.baseline, n_base, err_base, lat_base), (ev.candidate, n_cand, err_cand, lat_cand)):
        side.requests, side.errors = n, errs
        for _ in range(n):
            x = lat * rng.uniform(0.8, 1.2)
            side.e2e.add(x)
            side.ttft.add(x / 10)
    return ev


def test_a_healthy_step_advances_once_long_and_large_enough():
    s = settings()
    assert decide(s, evidence(n_cand=20), 60).action == "hold"  # too few candidate requests
    assert decide(s, evidence(), 5).action == "hold"  # too short
    d = decide(s, evidence(), 60)
    assert d.action == "advance" and "60 candidate requests" in d.reason


def test_a_significantly_slower_candidate_is_rolled_back_but_noise_is_not():
    s = settings()
    d = decide(s, evidence(lat_cand=1.0), 60)
    assert d.action == "rollback" and d.reason.startswith("ttft p95") and "chi-square" in d.reason
    # Two slow requests out of three: over the ratio, but not significant yet: hold, not advance.
    d = decide(settings(min_requests=1), evidence(n_base=3, n_cand=3, lat_cand=1.0), 60)
    assert d.action == "hold" and "not yet significant" in d.reason


def test_errors_roll_back_only_when_significantly_above_the_baseline():
    s = settings()
    d = decide(s, evidence(err_cand=12), 60)
    assert d.action == "rollback" and "error rate 0.200" in d.reason and "Fisher" in d.reason
    assert decide(s, evidence(err_cand=2, err_base=6), 60).action == "advance"  # 3 % vs 3 %: fine


def test_the_agreement_floor_rolls_back_a_candidate_that_disagrees_and_holds_while_undecided():
    s = settings(guardrails={"min_agreement": 0.5})
    d = decide(s, evidence(probes=8, matches=0), 0)
    assert d.action == "rollback" and "live agreement 0/8" in d.reason  # at once, whatever the step's size
    assert decide(s, evidence(probes=3, matches=2), 60).action == "hold"  # 2/3: not significant either way
    assert decide(s, evidence(probes=20, matches=19), 60).action == "advance"


def test_an_unavailable_candidate_is_rolled_back_after_the_grace():
    ev = evidence()
    ev.unavailable_s = 31
    d = decide(settings(), ev, 60)
    assert d.action == "rollback" and "unavailable for 31 s" in d.reason


def test_histogram_quantile_matches_prometheus_interpolation():
    h = Histogram([1, 2, 4])
    for x in (0.5, 1.5, 1.5, 3):
        h.add(x)
    assert h.counts == [1, 2, 1, 0] and h.quantile(0.5) == pytest.approx(1.5)
    assert wilson(0, 10, 0.95)[1] < 0.26 and wilson(10, 10, 0.95)[0] > 0.74


def test_steps_must_rise_to_100():
    with pytest.raises(ValueError, match="steps must rise"):
        settings(steps=[50, 25, 100])
    with pytest.raises(ValueError, match="steps must rise"):
        settings(steps=[10, 50])


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def controller(tmp_path, clock, **kw) -> RolloutController:
    return RolloutController("m", "base", settings(evaluate_every_s=1, **kw), StateStore(tmp_path, "app", "m"), clock)


def feed(c: RolloutController, n: int, lat: float = 0.2) -> None:
    for i in range(n):
        c.observe("base", "200", lat / 10, lat * (1 + i % 3 / 10))
        c.observe("cand", "200", lat / 10, lat * (1 + i % 3 / 10))


def test_the_controller_walks_the_steps_and_records_why(tmp_path):
    clock = Clock()
    c = controller(tmp_path, clock)
    assert c.tick(True).percent == 10
    assert c.pair_weights({"base": 50, "cand": 50}) == {"cand": 10.0, "base": 90.0}
    for percent in (50, 100):
        feed(c, 60)
        clock.t += 11
        assert c.tick(True).percent == percent
    feed(c, 60)
    clock.t += 11
    state = c.tick(True)
    assert state.status == "promoted" and [h.action for h in state.history] == ["start", "advance", "advance", "promote"]
    assert c.pair_weights({"base": 50, "cand": 50}) == {"cand": 100.0, "base": 0.0}


def test_a_restart_resumes_the_rollout_and_a_second_replica_follows(tmp_path):
    clock = Clock()
    leader = controller(tmp_path, clock)
    leader.tick(True)
    feed(leader, 60)
    clock.t += 11
    assert leader.tick(True).step == 1
    follower = controller(tmp_path, clock)  # another ingress replica: the lead lock is taken
    feed(follower, 500, lat=5.0)  # its own traffic never decides
    clock.t += 11
    assert follower.tick(True).step == 1 and follower.state.status == "running"
    # The leader goes (its lock with it); a new replica resumes at step 2, with fresh evidence.
    leader.store._lead_fd and __import__("os").close(leader.store._lead_fd)
    restarted = controller(tmp_path, clock)
    state = restarted.tick(True)
    assert state.step == 1 and [h.action for h in state.history] == ["start", "advance"]
    assert restarted.evidence.candidate.requests == 0


def test_a_breach_rolls_back_at_once_and_stays_down(tmp_path):
    clock = Clock()
    c = controller(tmp_path, clock, guardrails={"max_unavailable_s": 5})
    c.tick(False)  # still loading at the start: not a breach, however long
    clock.t += 60
    assert c.tick(False).status == "running"
    c.tick(True)
    clock.t += 2
    c.tick(False)
    clock.t += 6
    state = c.tick(False)
    assert state.status == "rolled_back" and state.percent == 0 and "unavailable" in state.history[-1].reason
    assert c.pair_weights({"base": 1, "cand": 1}) == {"cand": 0.0, "base": 2.0}
    clock.t += 100
    assert c.tick(True).status == "rolled_back"


def test_operator_actions_and_their_limits(tmp_path):
    clock = Clock()
    c = controller(tmp_path, clock)
    c.tick(True)
    assert c.admin("pause", "by alice").status == "paused"
    feed(c, 100)
    clock.t += 100
    assert c.tick(True).step == 0  # paused: no decision
    assert c.admin("resume", "by alice").status == "running"
    assert c.admin("promote", "looks good").percent == 100
    with pytest.raises(ValueError, match="cannot abort a rollout that is promoted"):
        c.admin("abort", "late")
    # A changed rollout block is a new rollout.
    other = RolloutController("m", "base", settings(steps=[20, 100]), StateStore(tmp_path, "app", "m"), clock)
    other.store._lead_fd = c.store._lead_fd  # same process: share the lead
    assert other.tick(True).percent == 20
