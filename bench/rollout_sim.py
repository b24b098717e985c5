"""Rollout decisions against synthetic traffic with a known truth: how often the decision code
rolls back a candidate that is as good as the baseline, promotes a good one, and catches a bad
one, and how many candidate requests that costs. Runs the real code (`decide`, the evidence's
bookkeeping, `update_bounds`) at the ingress's cadence over whole rollouts, or HEAD's decision
code (--before: read with `git show HEAD:...` into a temporary module, not kept in the repo).

    .venv/bin/python bench/rollout_sim.py [--rollouts 1000] [--rates 1,10,100] [--scenarios 0,2] [--users N] [--before [REV]]

Traffic: Poisson arrivals; e2e latency lognormal (median 0.5 s, sigma 0.5), half the requests
streamed with TTFT lognormal (median 0.1 s, sigma 0.5); 1 % server errors on both variants;
live probes of 2 % of the requests. A regression scales the candidate's latency (p95 x r),
its error rate, or its agreement. Users: 300 users of Zipf-like activity, each with a latency
factor (lognormal sigma 0.4); their requests are split per request (rollout.sticky false, the
default) or each user always gets the same variant (rollout.sticky true: a user is the
candidate's while its uniform draw is under the step's share, as weighted rendezvous hashing
gives). A step rolls back when inconclusive after 3x its minimum (inconclusive_after)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))

from slimserve.serve.rollout import evidence as new  # noqa: E402
from slimserve.serve.config.rollout import RolloutSettings  # noqa: E402

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
    users: int = 0  # 0: every request its own; else how many users (each with a latency factor)
    sticky: bool = False  # rollout.sticky: a user always gets one variant (at 5 %, about 1 in 20 users are the candidate's)


SCENARIOS = [
    Scenario("A/A (identical)", "same"),
    Scenario("good (agreement 0.9)", "good", agreement=0.9),
    Scenario("p95 x2", "bad", latency_x=2.0),
    Scenario("error rate 8 %", "bad", error_rate=0.08),
    Scenario("agreement 0.7", "bad", agreement=0.7),
    Scenario("marginal p95 x1.6", "marginal", latency_x=1.6),
    Scenario("A/A, 300 users", "same", users=300),
    Scenario("p95 x2, 300 users", "bad", latency_x=2.0, users=300),
    Scenario("A/A, 300 sticky users (rollout.sticky)", "same", users=300, sticky=True),
    Scenario("p95 x2, 300 sticky users (rollout.sticky)", "bad", latency_x=2.0, users=300, sticky=True),
]


def settings(sc: Scenario | None = None) -> RolloutSettings:
    return RolloutSettings(candidate="cand", guardrails={"min_agreement": 0.8}, sticky=bool(sc and sc.sticky))


def planned_s(s: RolloutSettings, rate: float) -> float:
    return sum(max(s.min_seconds, s.min_requests / (rate * p / 100)) for p in s.steps)


def head_module(rev: str = "HEAD"):
    """A revision's rollout evidence module (and the modules of its own it imports), as a temporary
    module. Reads both layouts: flat serve/rollout_*.py (before issue 24) and serve/rollout/."""
    tmp = Path(tempfile.mkdtemp(prefix="rollout_head_"))
    def show(path: str) -> str | None:
        r = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None
    if show("serve/rollout/evidence.py") is not None:
        files = {"rollout_evidence": "serve/rollout/evidence.py", "rollout_sequential": "serve/rollout/sequential.py"}
        names = {"slimserve.serve.rollout.evidence": "_head_rollout_evidence",
                 "slimserve.serve.rollout.sequential": "_head_rollout_sequential"}
    else:
        files = {n: f"serve/{n}.py" for n in ("rollout_evidence", "ab_report", "rollout_sequential")}
        names = {f".{n}": f"_head_{n}" for n in files}
    for name, path in files.items():
        src = show(path) or ""
        for theirs, mine in names.items():
            src = src.replace(f"from {theirs} import", f"from {mine} import")
        src = src.replace("from .", "from slimserve.serve.")
        (tmp / f"_head_{name}.py").write_text(src)
    sys.path.insert(0, str(tmp))
    spec = importlib.util.spec_from_file_location("_head_rollout_evidence", tmp / "_head_rollout_evidence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class Traffic:
    """One rollout's synthetic requests, tick by tick; drawn with numpy a chunk of ticks at a time
    (the side a request goes to is decided per tick, from the step's share)."""

    CHUNK = 64  # ticks per draw

    def __init__(self, sc: Scenario, rate: float, rng: np.random.Generator):
        self.sc, self.rate, self.rng = sc, rate, rng
        if sc.users:
            activity = 1 / np.arange(1, sc.users + 1) ** 0.8
            self.p_user = activity / activity.sum()
            self.u_user = rng.random(sc.users)
            self.lat_user = rng.lognormal(0, 0.4, sc.users)
        self._ticks = []

    def _draw(self) -> None:
        rng, sc, k = self.rng, self.sc, self.CHUNK
        sizes = rng.poisson(self.rate * TICK_S, k)
        n = int(sizes.sum())
        if sc.users:
            users = rng.choice(sc.users, n, p=self.p_user)
            u = self.u_user[users] if sc.sticky else rng.random(n)
            factor, clusters = self.lat_user[users], users % new.CLUSTERS
        else:
            u, factor, clusters = rng.random(n), np.ones(n), rng.integers(0, new.CLUSTERS, n)
        e2e = rng.lognormal(np.log(0.5), 0.5, n) * factor
        ttft = np.where(rng.random(n) < 0.5, rng.lognormal(np.log(0.1), 0.5, n) * factor, np.nan)
        fail_u = rng.random(n)
        probes = rng.poisson(self.rate * TICK_S * PROBE_SAMPLE, k)
        matches = rng.binomial(probes, self.sc.agreement)
        edges = np.concatenate([[0], np.cumsum(sizes)])
        self._ticks = [(u[a:b], e2e[a:b], ttft[a:b], fail_u[a:b], clusters[a:b], int(p), int(m))
                       for a, b, p, m in zip(edges[:-1], edges[1:], probes, matches)][::-1]

    def tick(self, share: float):
        """(side, kinds, ttft, e2e, clusters) per variant, and (probes, matches)."""
        if not self._ticks:
            self._draw()
        u, e2e, ttft, fail_u, clusters, probes, matches = self._ticks.pop()
        sc = self.sc
        cand = u < share
        if sc.latency_x != 1.0:
            scale = np.where(cand, sc.latency_x, 1.0)
            e2e, ttft = e2e * scale, ttft * scale
        fail = fail_u < np.where(cand, sc.error_rate, BASE_ERRORS)
        kinds = np.where(fail, new.SERVER, new.OK)
        sides = [(side, kinds[m], ttft[m], e2e[m], clusters[m]) for side, m in (("baseline", ~cand), ("candidate", cand))]
        return sides, probes, matches


def run_new(s: RolloutSettings, traffic: Traffic, horizon_s: float, mod=new):
    """The working tree's controller loop (or another revision's with the same API, `mod`)."""
    ev, step, started, t = mod.RolloutEvidence(), 0, 0.0, 0.0
    while t < horizon_s:
        t += TICK_S
        sides, probes, matches = traffic.tick(s.steps[step] / 100)
        for side, *data in sides:
            ev.add_batch(side, *data)
        ev.probes += probes
        ev.matches += matches
        d = mod.decide(s, ev, t - started)
        mod.update_bounds(s, ev)
        if d.action == "rollback":
            return "rollback", step, t, ev.candidate.requests, d.reason.startswith("inconclusive")
        if d.action == "advance":
            if step + 1 == len(s.steps):
                return "promote", step, t, ev.candidate.requests, False
            step, started, ev.step_requests = step + 1, t, 0
    return "running", step, t, ev.candidate.requests, False


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
            return "rollback", step, t, total, False
        if d.action == "advance":
            if step + 1 == len(s.steps):
                return "promote", step, t, total, False
            step, started, ev = step + 1, t, old.StepEvidence()
    return "running", step, t, total, False


def simulate(sc: Scenario, rate: float, rollouts: int, before=None, seed: int = 0) -> dict:
    s = settings(sc)
    horizon = 3 * planned_s(s, rate)
    out = []
    for i in range(rollouts):
        traffic = Traffic(sc, rate, np.random.default_rng([seed, i, int(rate * 10)]))
        if before is None:
            out.append(run_new(s, traffic, horizon))
        elif hasattr(before, "StepEvidence"):  # before issue 26: per-step evidence
            out.append(run_before(before, s, traffic, horizon))
        else:
            out.append(run_new(s, traffic, horizon, before))
    last = len(s.steps) - 1
    rolled = [r for r in out if r[0] == "rollback"]
    early = [r for r in rolled if r[1] < last]
    promoted = [r for r in out if r[0] == "promote"]
    return {
        "scenario": sc.name, "truth": sc.truth, "rate": rate, "rollouts": rollouts,
        "rollback": len(rolled) / rollouts, "rollback_before_100": len(early) / rollouts,
        "rollback_inconclusive": sum(r[4] for r in rolled) / rollouts,
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
    ap.add_argument("--before", nargs="?", const="HEAD", metavar="REV",
                    help="that revision's decision code (default HEAD) instead of the working tree's")
    ap.add_argument("--json", type=Path, help="append one JSON line per scenario here")
    ap.add_argument("--users", type=int, help="the user scenarios' number of users (default 300)")
    a = ap.parse_args()
    old = head_module(a.before) if a.before else None
    picked = [SCENARIOS[int(i)] for i in a.scenarios.split(",")] if a.scenarios else SCENARIOS
    if a.users:
        picked = [replace(sc, users=a.users, name=sc.name.replace("300", str(a.users))) if sc.users else sc
                  for sc in picked]
    for rate in map(float, a.rates.split(",")):
        for sc in picked:
            t0 = time.time()
            r = {**simulate(sc, rate, a.rollouts, old), "code": a.before or "working tree",
                 "seconds": round(time.time() - t0, 1)}
            print(json.dumps(r), flush=True)
            if a.json:
                with a.json.open("a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
