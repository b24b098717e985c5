"""What a rollout has seen of its two variants, and the decision it supports (pure: no Ray, no
clock, no storage; tested alone and driven by bench/rollout_sim.py). The method, its error
rates and its references: docs/ROLLOUT_STATISTICS.md.

Every request gets an outcome class. Latency counts answered (ok) requests only; sheds (429),
server errors and timeouts count as the candidate's failures, and so do client errors (4xx)
beyond the rate at which the baseline gets them. Each guardrail is an always-valid test
(rollout/sequential.py) on the evidence since the rollout (or this process) started; the
guardrails share one false-rollback budget, `significance`."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from slimserve.serve.config.rollout import RolloutSettings
from slimserve.serve.rollout.sequential import count_needed, design_effect, log_evidence, more_needed, rejects

OUTCOMES = ("ok", "client_error", "shed", "server_error", "timeout")
OK, CLIENT, SHED, SERVER, TIMEOUT = range(len(OUTCOMES))
FAILURES = (SHED, SERVER, TIMEOUT)  # the last classes: a slice [SHED:] counts them
CLUSTERS = 64  # users are hashed into this many groups for the design effect
# Per cluster: requests, failures, client errors, then per latency: answered requests, and those
# over the threshold in force when they finished.
REQ, FAIL, CLI, TTFT_N, TTFT_OVER, E2E_N, E2E_OVER = range(7)
LATENCY_COLUMNS = {"ttft": (TTFT_N, TTFT_OVER), "e2e": (E2E_N, E2E_OVER)}
# Fine log-spaced buckets (5 % apart, 5 ms to 20 min): the p95 bound is off by at most a bucket.
BOUNDS = np.geomspace(0.005, 1200, 256)
Q = 0.95  # the latency guardrails are about the p95
REBOUND_GROWTH = 1.02  # the baseline's p95 bound is recomputed once its samples grew by 2 %


def outcome_of(status: str) -> int | None:
    """The outcome class of a finished request's status label (None: cancelled by the client,
    which says nothing about the variant)."""
    if status == "cancelled":
        return None
    if status.startswith("2"):
        return OK
    if status == "429":
        return SHED
    if status in ("408", "504", "timeout"):
        return TIMEOUT
    if status.startswith("4"):
        return CLIENT
    return SERVER  # 5xx, a stream that broke ("error"), anything else


@dataclass
class Histogram:
    bounds: np.ndarray = field(default_factory=lambda: BOUNDS)
    counts: np.ndarray = None  # per bucket, then one for +Inf

    def __post_init__(self):
        self.bounds = np.asarray(self.bounds, dtype=float)
        if self.counts is None:
            self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)

    def add(self, x: float) -> None:
        self.counts[np.searchsorted(self.bounds, x)] += 1

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float | None:
        """As Prometheus' histogram_quantile: linear within the bucket."""
        if not self.n:
            return None
        rank, below, lower = q * self.n, 0, 0.0
        for bound, c in zip(self.bounds, self.counts):
            if below + c >= rank and c:
                return float(lower + (bound - lower) * (rank - below) / c)
            below, lower = below + c, bound
        return float(self.bounds[-1])


@dataclass
class VariantEvidence:
    outcomes: np.ndarray = field(default_factory=lambda: np.zeros(len(OUTCOMES), dtype=np.int64))
    clusters: np.ndarray = field(default_factory=lambda: np.zeros((CLUSTERS, 7)))
    ttft: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)

    @property
    def requests(self) -> int:
        return int(self.outcomes.sum())

    @property
    def failures(self) -> int:
        return int(self.outcomes[SHED:].sum())  # FAILURES

    errors = failures


@dataclass
class RolloutEvidence:
    """Since the rollout's evidence started (the rollout's start, or this process's): the tests
    use all of it; `step_requests` is the current step's share, for the step's minimum."""

    baseline: VariantEvidence = field(default_factory=VariantEvidence)
    candidate: VariantEvidence = field(default_factory=VariantEvidence)
    probes: int = 0  # live probes of the candidate (match or mismatch)
    matches: int = 0
    unavailable_s: float = 0.0  # how long the candidate has been unavailable, now
    step_requests: int = 0  # candidate requests of the current step
    # The baseline's p95 upper bound per latency (None: not bounded yet) and the guardrail's
    # ratio: a request is counted over the threshold in force when it finished (update_bounds).
    bound: dict[str, float | None] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)
    bounded_at: dict[str, tuple] = field(default_factory=dict)  # (baseline samples, alpha) at each bound
    _anonymous: int = 0

    def record(self, side: str, status: str, ttft_s: float | None, e2e_s: float, user: str | None = None) -> None:
        """One finished request of the baseline or the candidate."""
        kind = outcome_of(status)
        if kind is None:
            return
        v: VariantEvidence = getattr(self, side)
        if user is None:
            self._anonymous = (self._anonymous + 1) % CLUSTERS  # its own request: any cluster will do
            k = self._anonymous
        else:
            k = int.from_bytes(hashlib.blake2b(user.encode(), digest_size=4).digest(), "big") % CLUSTERS
        v.outcomes[kind] += 1
        row = v.clusters[k]
        row[REQ] += 1
        row[FAIL] += kind in FAILURES
        row[CLI] += kind == CLIENT
        if side == "candidate":
            self.step_requests += 1
        if kind != OK:
            return  # a failure's latency says nothing about the answers' speed
        for name, x in (("ttft", ttft_s), ("e2e", e2e_s)):
            if x is None:
                continue
            getattr(v, name).add(x)
            threshold = self.threshold(side, name)
            if threshold is not None:
                n_col, over_col = LATENCY_COLUMNS[name]
                row[n_col] += 1
                row[over_col] += x > threshold

    def add_batch(self, side: str, kinds: np.ndarray, ttft: np.ndarray, e2e: np.ndarray, clusters: np.ndarray) -> None:
        """Many finished requests at once (the simulator): outcome classes, latencies (NaN:
        none) and cluster indices, as record() would add them one by one."""
        if not len(kinds):
            return
        v: VariantEvidence = getattr(self, side)
        v.outcomes += np.bincount(kinds, minlength=len(OUTCOMES))
        if side == "candidate":
            self.step_requests += len(kinds)
        # Every (cluster, column) increment as one index, counted by one bincount.
        cells = [clusters * 7 + REQ, clusters[kinds >= SHED] * 7 + FAIL, clusters[kinds == CLIENT] * 7 + CLI]
        ok = kinds == OK
        for name, x in (("ttft", ttft), ("e2e", e2e)):
            use = ok & (x == x)  # not NaN
            h, xs, ks = getattr(v, name), x[use], clusters[use]
            h.counts += np.bincount(np.searchsorted(h.bounds, xs), minlength=len(h.counts))
            threshold = self.threshold(side, name)
            if threshold is not None:
                n_col, over_col = LATENCY_COLUMNS[name]
                cells += [ks * 7 + n_col, ks[xs > threshold] * 7 + over_col]
        v.clusters += np.bincount(np.concatenate(cells), minlength=CLUSTERS * 7).reshape(CLUSTERS, 7)

    def threshold(self, side: str, name: str) -> float | None:
        bound = self.bound.get(name)
        if bound is None:
            return None
        return bound if side == "baseline" else bound * self.ratio[name]


@dataclass(frozen=True)
class Decision:
    action: Literal["hold", "advance", "rollback"]
    why: str | Callable[[], str]  # a hold's reason is worded only when read (it searches for "how much more")

    @property
    def reason(self) -> str:
        return self.why() if callable(self.why) else self.why


def budget(settings: RolloutSettings) -> float:
    """Each statistical guardrail's share of the false-rollback budget (Bonferroni)."""
    g = settings.guardrails
    n = sum(x is not None for x in (g.max_error_rate, g.max_ttft_p95_ratio, g.max_e2e_p95_ratio, g.min_agreement))
    return settings.significance / max(1, n)


def update_bounds(settings: RolloutSettings, ev: RolloutEvidence) -> None:
    """Re-bound the baseline's p95s (half of each latency guardrail's share); requests that finish
    from now on are counted against the new thresholds. Call after each decision."""
    g, alpha = settings.guardrails, budget(settings) / 2
    for name, ratio in (("ttft", g.max_ttft_p95_ratio), ("e2e", g.max_e2e_p95_ratio)):
        if ratio is None:
            continue
        h = getattr(ev.baseline, name)
        ev.ratio[name] = ratio
        n, (was, was_alpha) = h.n, ev.bounded_at.get(name, (0, None))
        if was_alpha == alpha and ev.bound.get(name) is not None and n < was * REBOUND_GROWTH:
            continue  # the bound in force stays valid (time-uniform); re-bound after 2 % more samples
        ev.bounded_at[name] = (n, alpha)
        n_col, over_col = LATENCY_COLUMNS[name]
        deff = design_effect(ev.baseline.clusters[:, n_col], ev.baseline.clusters[:, over_col])
        n_eff = math.ceil(h.n / deff)  # rounded up: fewer samples would claim more
        need = count_needed(n_eff, Q, alpha)
        cum = np.cumsum(h.counts[:-1]) / deff
        i = int(np.searchsorted(cum, need)) if need is not None else len(h.bounds)
        ev.bound[name] = float(h.bounds[i]) if i < len(h.bounds) else None


@dataclass(frozen=True)
class _Check:
    breach: str | None  # why it is a breach (rollback), or None
    met: bool  # shown within its limit: lets the step advance
    summary: str | Callable[[], str]  # what it stands at (the hold's or the advance's reason)

    def text(self) -> str:
        return self.summary() if callable(self.summary) else self.summary


def decide(settings: RolloutSettings, ev: RolloutEvidence, elapsed_s: float) -> Decision:
    """A guardrail breach shown by its test rolls back; otherwise the step advances once it is
    long and large enough and every guardrail is shown to be met; otherwise it holds, until
    `inconclusive_after` times the step's minimum, when it rolls back."""
    g, alpha, share = settings.guardrails, settings.significance, budget(settings)
    if ev.unavailable_s >= g.max_unavailable_s:
        return Decision("rollback", f"candidate unavailable for {ev.unavailable_s:.0f} s (guardrail {g.max_unavailable_s:g} s)")
    checks = []
    if g.max_error_rate is not None:
        checks.append(_errors(ev, g.max_error_rate, alpha, share))
    for name, ratio in (("ttft", g.max_ttft_p95_ratio), ("e2e", g.max_e2e_p95_ratio)):
        if ratio is not None:
            checks.append(_latency(ev, name, ratio, alpha, share / 2))
    if g.min_agreement is not None:
        checks.append(_agreement(ev, g.min_agreement, alpha, share))
    for c in checks:
        if c.breach:
            return Decision("rollback", c.breach)
    if ev.step_requests < settings.min_requests or elapsed_s < settings.min_seconds:
        return Decision("hold", f"step needs {settings.min_requests} candidate requests and {settings.min_seconds:g} s "
                                f"(has {ev.step_requests}, {elapsed_s:.0f} s)")
    unmet = [c for c in checks if not c.met]
    k = settings.inconclusive_after
    if unmet and k is not None and ev.step_requests >= k * settings.min_requests and elapsed_s >= k * settings.min_seconds:
        # Fail closed: a candidate that cannot show it keeps its guardrails is not given the traffic.
        return Decision("rollback", f"inconclusive: after {elapsed_s:.0f} s and {ev.step_requests} candidate requests "
                        f"(inconclusive_after: {k:g} x the step's minimum) not every guardrail is shown met: "
                        + "; ".join(c.text() for c in unmet))
    if unmet:
        return Decision("hold", lambda: "; ".join(c.text() for c in unmet))
    why = f"{ev.step_requests} candidate requests this step; " + "; ".join(c.text() for c in checks)
    return Decision("advance", why.rstrip("; "))


def _needs(x: float, n: float, p0: float, above: bool, alpha: float, deff: float, what: str,
           clusters: np.ndarray | None = None) -> str:
    more = more_needed(x, n, p0, above, alpha)
    text = f"about {math.ceil(more * deff)} more {what} at this rate" if more is not None else "not at this rate"
    if deff >= 2 and clusters is not None:
        # Sticky users: the evidence is bounded by how many users the candidate has, not requests.
        users = float(clusters.sum()) ** 2 / float((clusters ** 2).sum())  # Kish's effective number of clusters
        text += (f" (its requests count as {n:.0f} independent ones, design effect {deff:.1f}; they come from about "
                 f"{users:.0f} users' worth of traffic ({int(np.count_nonzero(clusters))} of {CLUSTERS} user clusters); "
                 f"a user's requests go together, so more requests from the same few users add little: more users must "
                 f"reach the candidate, docs/ROLLOUT_STATISTICS.md#users)")
    return text


def _errors(ev: RolloutEvidence, limit: float, alpha: float, share: float) -> _Check:
    c, b = ev.candidate, ev.baseline
    n = c.requests
    if not n:
        return _Check(None, False, "no candidate requests yet")
    # Client errors the baseline gets as often are the clients'; beyond its rate, the candidate's.
    client_b = b.outcomes[CLIENT] / b.requests if b.requests else 0.0
    fails = c.failures + max(0.0, c.outcomes[CLIENT] - n * client_b)
    base_rate = b.failures / b.requests if b.requests else 0.0
    p0 = max(limit, base_rate)  # above the limit and above the baseline's own rate
    deff = design_effect(c.clusters[:, REQ], c.clusters[:, FAIL] + c.clusters[:, CLI])
    x, m = fails / deff, n / deff
    rate = f"failure rate {fails / n:.3f} ({fails:.0f}/{n})"
    if rejects(x, m, p0, True, share):
        return _Check(f"{rate} is above {p0:.3g} (limit {limit:g}, baseline {base_rate:.3f}; mixture SPRT, "
                      f"evidence {math.exp(log_evidence(x, m, p0, True)):.0f} >= 1/{share:.3g})", False, "")
    if rejects(x, m, limit, False, alpha):
        return _Check(None, True, f"{rate}, shown below {limit:g}")
    return _Check(None, False, lambda: f"{rate} not yet shown below {limit:g}: "
                  + _needs(x, m, limit, False, alpha, deff, "candidate requests", c.clusters[:, REQ].copy()))


def _latency(ev: RolloutEvidence, name: str, ratio: float, alpha: float, share: float) -> _Check:
    n_col, over_col = LATENCY_COLUMNS[name]
    cl = ev.candidate.clusters
    n, over = float(cl[:, n_col].sum()), float(cl[:, over_col].sum())
    bound = ev.bound.get(name)
    if not n:
        if bound is None:
            return _Check(None, False, f"baseline {name} p95 not bounded yet ({getattr(ev.baseline, name).n} samples)")
        return _Check(None, False, f"no candidate {name} samples yet")
    deff = design_effect(cl[:, n_col], cl[:, over_col])
    x, m = over / deff, n / deff
    tail = (f"{name}: {over:.0f}/{n:.0f} candidate requests over {ratio:g} x the baseline's p95 "
            f"(<= {bound * 1000:.0f} ms)" if bound else f"{name}: {over:.0f}/{n:.0f} over")
    if rejects(x, m, 1 - Q, True, share):
        p95 = getattr(ev.candidate, name).quantile(Q)
        return _Check(f"{tail}: its p95 ({p95 * 1000:.0f} ms) is above the limit (mixture SPRT against {1 - Q:.0%}, "
                      f"evidence {math.exp(log_evidence(x, m, 1 - Q, True)):.0f} >= 1/{share:.3g})", False, "")
    if rejects(x, m, 1 - Q, False, alpha):
        return _Check(None, True, f"{tail}, shown under {1 - Q:.0%}")
    return _Check(None, False, lambda: f"{tail}, not yet shown under {1 - Q:.0%}: "
                  + _needs(x, m, 1 - Q, False, alpha, deff, f"{name} samples", cl[:, n_col].copy()))


def _agreement(ev: RolloutEvidence, floor: float, alpha: float, share: float) -> _Check:
    x, n = ev.matches, ev.probes
    what = f"live agreement {x}/{n}"
    if n and rejects(x, n, floor, False, share):
        return _Check(f"{what} is below {floor:g} (mixture SPRT, evidence "
                      f"{math.exp(log_evidence(x, n, floor, False)):.0f} >= 1/{share:.3g})", False, "")
    if rejects(x, n, floor, True, alpha):
        return _Check(None, True, f"{what}, shown above {floor:g}")
    return _Check(None, False, lambda: f"{what} not yet shown above {floor:g}: "
                  + _needs(x, n, floor, True, alpha, 1.0, "probes"))
