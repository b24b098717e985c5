"""Rollout decisions against synthetic traffic with a known truth: how often the decision code
rolls back a candidate that is as good as the baseline, promotes a good one, and catches a bad
one, and how many candidate requests that costs. Runs the real code (`decide`, the evidence's
bookkeeping, `update_bounds`) at the ingress's cadence over whole rollouts, or HEAD's decision
code (--before: read with `git show HEAD:...` into a temporary module, not kept in the repo).

    .venv/bin/python bench/rollout_sim.py [--rollouts 1000] [--rates 1,10,100] [--before]

Traffic: Poisson arrivals; e2e latency lognormal (median 0.5 s, sigma 0.5), half the requests
streamed with TTFT lognormal (median 0.1 s, sigma 0.5); 1 % server errors on both variants;
live probes of 2 % of the requests. A regression scales the candidate's latency (p95 x r),
its error rate, or its agreement. Sticky: 300 users of Zipf-like activity, each with a latency
factor (lognormal sigma 0.4) and always the same variant (a user is the candidate's while its
uniform draw is under the step's share, as weighted rendezvous hashing gives)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))

from slimserve.serve import rollout_evidence as new  # noqa: E402
from slimserve.serve.rollout_config import RolloutSettings  # noqa: E402

TICK_S = 5.0
PROBE_SAMPLE = 0.02
BASE_ERRORS = 0.01
USERS = 300


@dataclass(frozen=True)
class Scenario:
    name: str
    truth: str  # "same" (must not roll back), "good" (must promote), "bad" (must roll back), "marginal"
    latency_x: float = 1.0
    error_rate: float = BASE_ERRORS
    agreement: float = 0.98
    sticky: bool = False


SCENARIOS = [
    Scenario("A/A (identical)", "same"),
    Scenario("good (agreement 0.9)", "good", agreement=0.9),
    Scenario("p95 x2", "bad", latency_x=2.0),
    Scenario("error rate 8 %", "bad", error_rate=0.08),
    Scenario("agreement 0.7", "bad", agreement=0.7),
    Scenario("marginal p95 x1.6", "marginal", latency_x=1.6),
    Scenario("A/A, sticky users", "same", sticky=True),
    Scenario("p95 x2, sticky users", "bad", latency_x=2.0, sticky=True),
]


def settings() -> RolloutSettings:
    return RolloutSettings(candidate="cand", guardrails={"min_agreement": 0.8})


def planned_s(s: RolloutSettings, rate: float) -> float:
    return sum(max(s.min_seconds, s.min_requests / (rate * p / 100)) for p in s.steps)


def head_module():
    """HEAD's rollout_evidence (and the ab_report it imports), as a temporary module."""
    tmp = Path(tempfile.mkdtemp(prefix="rollout_head_"))
    for name in ("rollout_evidence", "ab_report"):
        src = subprocess.run(["git", "show", f"HEAD:serve/{name}.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
        src = src.replace("from .ab_report import", "from _head_ab_report import")
        src = src.replace("from .", "from slimserve.serve.")
        (tmp / f"_head_{name}.py").write_text(src)
    sys.path.insert(0, str(tmp))
    spec = importlib.util.spec_from_file_location("_head_rollout_evidence", tmp / "_head_rollout_evidence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class Traffic:
    """One rollout's synthetic requests, tick by tick."""

    def __init__(self, sc: Scenario, rate: float, rng: np.random.Generator):
        self.sc, self.rate, self.rng = sc, rate, rng
        if sc.sticky:
            activity = 1 / np.arange(1, USERS + 1) ** 0.8
            self.p_user = activity / activity.sum()
            self.u_user = rng.random(USERS)
            self.lat_user = rng.lognormal(0, 0.4, USERS)

    def tick(self, share: float):
        """(side, kinds, ttft, e2e, clusters) per variant, and (probes, matches)."""
        rng, sc = self.rng, self.sc
        n = rng.poisson(self.rate * TICK_S)
        if sc.sticky:
            users = rng.choice(USERS, n, p=self.p_user)
            cand = self.u_user[users] < share
            factor = self.lat_user[users]
            clusters = users % new.CLUSTERS
        else:
            cand = rng.random(n) < share
            factor = np.ones(n)
            clusters = rng.integers(0, new.CLUSTERS, n)
        scale = np.where(cand, sc.latency_x, 1.0) * factor
        e2e = rng.lognormal(np.log(0.5), 0.5, n) * scale
        ttft = np.where(rng.random(n) < 0.5, rng.lognormal(np.log(0.1), 0.5, n) * scale, np.nan)
        fail = rng.random(n) < np.where(cand, sc.error_rate, BASE_ERRORS)
        kinds = np.where(fail, new.SERVER, new.OK)
        sides = [(side, kinds[m], ttft[m], e2e[m], clusters[m]) for side, m in (("baseline", ~cand), ("candidate", cand))]
        probes = rng.poisson(self.rate * TICK_S * PROBE_SAMPLE)
        return sides, probes, rng.binomial(probes, sc.agreement)


def run_new(s: RolloutSettings, traffic: Traffic, horizon_s: float):
    ev, step, started, t = new.RolloutEvidence(), 0, 0.0, 0.0
    while t < horizon_s:
        t += TICK_S
        sides, probes, matches = traffic.tick(s.steps[step] / 100)
        for side, *data in sides:
            ev.add_batch(side, *data)
        ev.probes += probes
        ev.matches += matches
        d = new.decide(s, ev, t - started)
        new.update_bounds(s, ev)
        if d.action == "rollback":
            return "rollback", step, t, ev.candidate.requests
        if d.action == "advance":
            if step + 1 == len(s.steps):
                return "promote", step, t, ev.candidate.requests
            step, started, ev.step_requests = step + 1, t, 0
    return "running", step, t, ev.candidate.requests


def run_before(old, s: RolloutSettings, traffic: Traffic, horizon_s: float):
    """HEAD's controller: evidence per step, reset at each step."""
    ev, step, started, t, total = old.StepEvidence(), 0, 0.0, 0.0, 0
    while t < horizon_s:
        t += TICK_S
        sides, probes, matches = traffic.tick(s.steps[step] / 100)
        for side, kinds, ttft, e2e, _ in sides:
            v = getattr(ev, side)
            v.requests += len(kinds)
            v.errors += int((kinds != new.OK).sum())
            for h, x in ((v.e2e, e2e), (v.ttft, ttft[~np.isnan(ttft)])):
                inc = np.bincount(np.searchsorted(h.bounds, x), minlength=len(h.counts))
                h.counts = [a + int(b) for a, b in zip(h.counts, inc)]
        total += len(sides[1][1])
        ev.probes += probes
        ev.matches += matches
        d = old.decide(s, ev, t - started)
        if d.action == "rollback":
            return "rollback", step, t, total
        if d.action == "advance":
            if step + 1 == len(s.steps):
                return "promote", step, t, total
            step, started, ev = step + 1, t, old.StepEvidence()
    return "running", step, t, total


def simulate(sc: Scenario, rate: float, rollouts: int, before=None, seed: int = 0) -> dict:
    s = settings()
    horizon = 3 * planned_s(s, rate)
    out = []
    for i in range(rollouts):
        traffic = Traffic(sc, rate, np.random.default_rng([seed, i, int(rate * 10)]))
        out.append(run_before(before, s, traffic, horizon) if before else run_new(s, traffic, horizon))
    last = len(s.steps) - 1
    rolled = [r for r in out if r[0] == "rollback"]
    early = [r for r in rolled if r[1] < last]
    promoted = [r for r in out if r[0] == "promote"]
    return {
        "scenario": sc.name, "truth": sc.truth, "rate": rate, "rollouts": rollouts,
        "rollback": len(rolled) / rollouts, "rollback_before_100": len(early) / rollouts,
        "promoted": len(promoted) / rollouts,
        "requests_to_rollback_median": float(np.median([r[3] for r in rolled])) if rolled else None,
        "requests_to_rollback_p90": float(np.percentile([r[3] for r in rolled], 90)) if rolled else None,
        "promote_time_over_plan_median": float(np.median([r[2] for r in promoted]) / planned_s(s, rate)) if promoted else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=int, default=1000)
    ap.add_argument("--rates", default="1,10,100")
    ap.add_argument("--scenarios", default="", help="comma-separated indices into SCENARIOS (default: all)")
    ap.add_argument("--before", action="store_true", help="HEAD's decision code instead of the working tree's")
    ap.add_argument("--json", type=Path, help="append one JSON line per scenario here")
    a = ap.parse_args()
    old = head_module() if a.before else None
    picked = [SCENARIOS[int(i)] for i in a.scenarios.split(",")] if a.scenarios else SCENARIOS
    for rate in map(float, a.rates.split(",")):
        for sc in picked:
            t0 = time.time()
            r = {**simulate(sc, rate, a.rollouts, old), "code": "before" if a.before else "after",
                 "seconds": round(time.time() - t0, 1)}
            print(json.dumps(r), flush=True)
            if a.json:
                with a.json.open("a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
