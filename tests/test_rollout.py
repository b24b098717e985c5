"""The rollout's decisions and state (no cluster): guardrails, significance, steps, restarts,
leadership and operator actions. End to end on CPU: test_rollout_e2e.py."""

from __future__ import annotations

import random
import sys

import pytest

import numpy as np

from slimserve.serve.rollout.controller import RolloutController
from slimserve.serve.config.rollout import RolloutSettings
from slimserve.serve.rollout.evidence import Histogram, RolloutEvidence, decide, outcome_of, update_bounds
from slimserve.serve.rollout.sequential import design_effect, log_evidence, more_needed, p_value, rejects
from slimserve.serve.rollout.state import StateStore


def settings(**kw) -> RolloutSettings:
    return RolloutSettings.model_validate({"candidate": "cand", "steps": [10, 50, 100], "min_requests": 50,
                                           "min_seconds": 10, **kw})


def evidence(s=None, n_base=2000, n_cand=400, err_base=0.0, err_cand=0.0, lat_cand=1.0, probes=0, matches=0,
             seed=0, status="500"):
    """Baseline traffic first (its p95 is then bounded), then the candidate's."""
    s = s or settings()
    rng = random.Random(seed)
    ev = RolloutEvidence(probes=probes, matches=matches)
    for side, n, err, scale in (("baseline", n_base, err_base, 1.0), ("candidate", n_cand, err_cand, lat_cand)):
        for i in range(n):
            x = 0.5 * scale * rng.lognormvariate(0, 0.3)
            ev.record(side, status if i < err * n else "200", x / 5, x, f"user-{i}")
        update_bounds(s, ev)
    return ev


def test_a_healthy_step_advances_once_long_and_large_enough():
    s = settings()
    assert decide(s, evidence(n_cand=20), 60).action == "hold"  # too few candidate requests
    assert decide(s, evidence(), 5).action == "hold"  # too short
    d = decide(s, evidence(), 60)
    assert d.action == "advance" and "400 candidate requests" in d.reason and "shown below 0.05" in d.reason


def test_little_evidence_holds_and_says_how_much_more_it_needs():
    d = decide(settings(min_requests=1), evidence(n_base=2000, n_cand=30), 20)
    assert d.action == "hold" and "not yet shown" in d.reason and "more" in d.reason


def test_a_step_that_stays_inconclusive_rolls_back_fail_closed():
    """inconclusive_after (3 by default): a step that has had 3x its minimum time and requests
    without every guardrail shown met rolls back, and says which was not shown; unset, it holds."""
    ev = evidence(n_base=2000, n_cand=30)
    s = settings(min_requests=10)
    assert decide(s, ev, 29).action == "hold"  # 3 x 10 s not reached
    d = decide(s, ev, 30)
    assert d.action == "rollback" and d.reason.startswith("inconclusive: after 30 s and 30 candidate requests")
    assert "not yet shown" in d.reason
    assert decide(settings(min_requests=11), ev, 30).action == "hold"  # 3 x 11 requests not reached
    assert decide(settings(min_requests=10, inconclusive_after=None), ev, 10_000).action == "hold"
    # A step whose guardrails are shown met advances, however long it took.
    assert decide(s, evidence(), 10_000).action == "advance"


def test_a_slower_p95_is_rolled_back_on_the_ratio_not_on_any_difference():
    s = settings()
    d = decide(s, evidence(lat_cand=2.0), 60)
    assert d.action == "rollback" and d.reason.startswith("ttft") and "mixture SPRT" in d.reason
    # 20 % slower everywhere: a different distribution, but its p95 is within 1.5x: no breach.
    assert decide(s, evidence(lat_cand=1.2), 60).action == "advance"
    # Two slow requests out of three: not a breach, not a pass.
    assert decide(settings(min_requests=1), evidence(n_cand=3, lat_cand=3.0), 20).action == "hold"


def test_failures_roll_back_only_above_the_limit_and_the_baseline():
    s = settings()
    d = decide(s, evidence(err_cand=0.2), 60)
    assert d.action == "rollback" and "failure rate 0.200" in d.reason
    assert decide(s, evidence(err_cand=0.02, err_base=0.02), 60).action == "advance"
    # Both variants failing as often: not the candidate's doing (no breach; within the step's 3 x minimum).
    assert decide(s, evidence(err_cand=0.2, err_base=0.2), 20).action == "hold"


def test_sheds_and_candidate_only_client_errors_count_against_the_candidate():
    assert [outcome_of(x) for x in ("200", "400", "429", "500", "error", "504", "cancelled")] == [0, 1, 2, 3, 3, 4, None]
    s = settings()
    assert decide(s, evidence(err_cand=0.2, status="429"), 60).action == "rollback"
    assert decide(s, evidence(err_cand=0.2, status="400"), 60).action == "rollback"  # the baseline gets no 400s
    assert decide(s, evidence(err_cand=0.1, err_base=0.1, status="400"), 60).action == "advance"  # the clients' own


def test_the_agreement_floor_rolls_back_a_candidate_that_disagrees_and_holds_while_undecided():
    s = settings(guardrails={"min_agreement": 0.5})
    d = decide(s, evidence(s, probes=25, matches=0), 0)
    assert d.action == "rollback" and "live agreement 0/25" in d.reason  # at once, whatever the step's size
    assert decide(s, evidence(s, probes=3, matches=2), 20).action == "hold"  # 2/3: not shown either way
    assert decide(s, evidence(s, probes=40, matches=38), 60).action == "advance"
    # One early mismatch against a 0.8 floor is not a breach (the Wilson bound said it was).
    s = settings(guardrails={"min_agreement": 0.8})
    assert decide(s, evidence(s, probes=2, matches=1), 20).action == "hold"


def test_an_unavailable_candidate_is_rolled_back_after_the_grace():
    ev = evidence()
    ev.unavailable_s = 31
    d = decide(settings(), ev, 60)
    assert d.action == "rollback" and "unavailable for 31 s" in d.reason


def test_histogram_quantile_matches_prometheus_interpolation():
    h = Histogram([1, 2, 4])
    for x in (0.5, 1.5, 1.5, 3):
        h.add(x)
    assert list(h.counts) == [1, 2, 1, 0] and h.quantile(0.5) == pytest.approx(1.5)


def test_the_sequential_test_keeps_its_level_however_often_it_looks():
    """Bernoulli(0.05) looked at after every observation for 2000 of them: the mixture SPRT of
    H0 p <= 0.05 rejects in at most alpha of the runs (Ville's inequality)."""
    rng = np.random.default_rng(1)
    x = np.cumsum(rng.random((400, 2000)) < 0.05, axis=1)
    hits = sum(any(rejects(float(x[r, i]), i + 1, 0.05, True, 0.05) for i in range(0, 2000, 5)) for r in range(400))
    assert hits / 400 <= 0.05
    assert rejects(30, 100, 0.05, True, 0.05) and not rejects(5, 100, 0.05, True, 0.05)
    assert p_value(30, 100, 0.05, True) < 0.001 and more_needed(2, 100, 0.05, True, 0.05) is None
    assert 0 < more_needed(8, 100, 0.05, True, 0.05) < 5000 and log_evidence(0, 0, 0.5, True) == 0


def test_the_design_effect_sees_users_whose_requests_go_together():
    independent = design_effect(np.full(64, 50.0), np.random.default_rng(0).binomial(50, 0.1, 64).astype(float))
    together = design_effect(np.full(64, 50.0), np.where(np.arange(64) < 6, 50.0, 0.0))
    assert independent < 1.5 and together > 20


def test_shortcuts_give_the_same_answers():
    """rejects() skips the mixture when the proportion is on the null's side (its ratio is then
    below 1); more_needed() brackets by doubling: within ~10 % of the smallest count that rejects."""
    for x, n, p0, above in ((3, 100, 0.05, True), (5, 100, 0.05, True), (9, 100, 0.05, False), (40, 50, 0.8, True)):
        assert not rejects(x, n, p0, above, 0.05) and log_evidence(x, n, p0, above) < 0
    more = more_needed(9, 100, 0.05, True, 0.05)
    assert rejects(9 * (100 + more) / 100, 100 + more, 0.05, True, 0.05)
    short = 100 + more / 1.1 ** 2 - 1
    assert not rejects(0.09 * short, short, 0.05, True, 0.05)


def test_a_hold_says_when_its_evidence_is_a_few_users_worth():
    """Sticky users: 6 users, one slow. The design effect widens the test, and the hold's reason
    (worded only when read) says the evidence is limited by the users, not the requests."""
    s = settings(min_requests=1)
    ev = evidence(s, n_cand=0)
    rng = random.Random(0)
    for i in range(600):
        user = f"user-{i % 6}"
        slow = 3.0 if user == "user-0" else 1.0
        ev.record("candidate", "200", None, 0.5 * slow * rng.lognormvariate(0, 0.3), user)
    d = decide(s, ev, 20)
    assert d.action == "hold" and callable(d.why)
    assert "a user's requests go together" in d.reason and "more users must reach the candidate" in d.reason


def test_the_baseline_bound_is_recomputed_as_its_samples_grow():
    s = settings()
    ev = evidence(s, n_cand=0)
    bound, (n, _) = ev.bound["e2e"], ev.bounded_at["e2e"]
    for i in range(int(n * 0.01)):  # 1 % more: the bound in force stays (it is valid at any time)
        ev.record("baseline", "200", 0.01, 100.0, f"u{i}")
    update_bounds(s, ev)
    assert ev.bound["e2e"] == bound and ev.bounded_at["e2e"][0] == n
    for i in range(int(n * 0.2)):  # much slower answers, 20 % more: a new, higher bound
        ev.record("baseline", "200", 0.01, 100.0, f"v{i}")
    update_bounds(s, ev)
    assert ev.bound["e2e"] > bound and ev.bounded_at["e2e"][0] > n


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
    for side in ("base", "cand"):
        for i in range(n):
            c.observe(side, "200", lat / 10, lat * (1 + i % 3 / 10), f"u{i}")
        update_bounds(c.settings, c.evidence)


def test_the_controller_walks_the_steps_and_records_why(tmp_path):
    clock = Clock()
    c = controller(tmp_path, clock)
    assert c.tick(True).percent == 10
    clock.t += 1
    c.tick(True)  # no evidence yet: the admin summary says what the step waits for
    assert c.summary()["last_decision"]["action"] == "hold" and "step needs 50" in c.summary()["last_decision"]["reason"]
    assert c.pair_weights({"base": 50, "cand": 50}) == {"cand": 10.0, "base": 90.0}
    for percent in (50, 100):
        feed(c, 400)
        clock.t += 11
        assert c.tick(True).percent == percent
    feed(c, 400)
    clock.t += 11
    state = c.tick(True)
    assert state.status == "promoted" and [h.action for h in state.history] == ["start", "advance", "advance", "promote"]
    assert c.summary()["last_decision"] is None  # no longer running: nothing pending
    assert c.pair_weights({"base": 50, "cand": 50}) == {"cand": 100.0, "base": 0.0}


def test_a_restart_resumes_the_rollout_and_a_second_replica_follows(tmp_path):
    clock = Clock()
    leader = controller(tmp_path, clock)
    leader.tick(True)
    feed(leader, 400)
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


def test_new_guardrails_keep_the_step_new_steps_start_over_and_say_why(tmp_path):
    clock = Clock()
    c = controller(tmp_path, clock)
    c.tick(True)
    feed(c, 400)
    clock.t += 11
    assert c.tick(True).step == 1
    tuned = controller(tmp_path, clock, min_seconds=30, guardrails={"max_error_rate": 0.02})
    tuned.store._lead_fd = c.store._lead_fd  # same process: share the lead
    state = tuned.tick(True)
    assert state.step == 1 and [h.action for h in state.history] == ["start", "advance", "settings"]
    other = controller(tmp_path, clock, steps=[20, 100])
    other.store._lead_fd = c.store._lead_fd
    state = other.tick(True)
    assert state.step == 0 and state.percent == 20 and [h.action for h in state.history][-1] == "start"
    assert "was cand against base, steps 10, 50, 100: starting over" in state.history[-1].reason


def test_after_a_restart_the_step_minimum_counts_from_the_fresh_evidence(tmp_path):
    clock = Clock()
    leader = controller(tmp_path, clock, min_seconds=100)
    leader.tick(True)
    clock.t += 500  # the step is long done...
    leader.store._lead_fd and __import__("os").close(leader.store._lead_fd)
    restarted = controller(tmp_path, clock, min_seconds=100)
    feed(restarted, 400)
    clock.t += 5
    assert restarted.tick(True).step == 0  # ...but the new evidence is 5 s old
    clock.t += 100
    assert restarted.tick(True).step == 1


def test_simulated_rollouts_keep_their_error_rates():
    """bench/rollout_sim.py's scenarios, few rollouts: no identical candidate rolled back, and a
    candidate with twice the p95 caught before 100 %."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "rollout_sim.py"
    spec = importlib.util.spec_from_file_location("rollout_sim", path)
    sim = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sim  # dataclasses look their module up
    spec.loader.exec_module(sim)
    same = sim.simulate(sim.SCENARIOS[0], 100.0, 20)
    assert same["rollback"] == 0 and same["promoted"] == 1
    slow = sim.simulate(sim.SCENARIOS[2], 10.0, 40)
    assert slow["rollback_before_100"] >= 0.95
    # Users with their own latency, split per request (rollout.sticky false): caught before 100 %.
    users = sim.simulate(sim.SCENARIOS[7], 10.0, 20)
    assert users["scenario"] == "p95 x2, 300 users" and users["rollback_before_100"] == 1
