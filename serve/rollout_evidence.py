"""What one rollout step has seen of its two variants, and the decision it supports (pure: no
Ray, no clock; tested alone). The tests are ab-report's: chi-square homogeneity on latency
histograms, Fisher's exact test on error counts; the agreement is judged by Wilson bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .ab_report import latency_test
from .metrics import E2E_BUCKETS, TTFT_BUCKETS
from .rollout_config import RolloutSettings


MIN_LATENCY_SAMPLES = 20


@dataclass
class Histogram:
    bounds: list[float]
    counts: list[int] = field(default_factory=list)  # per bucket, then one for +Inf

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def add(self, x: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if x <= b), len(self.bounds))] += 1

    @property
    def n(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, float]]:
        out, total = [], 0
        for bound, c in zip([*self.bounds, math.inf], self.counts):
            total += c
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float | None:
        """As Prometheus' histogram_quantile: linear within the bucket."""
        if not self.n:
            return None
        rank, below, lower = q * self.n, 0, 0.0
        for bound, c in zip(self.bounds, self.counts):
            if below + c >= rank and c:
                return lower + (bound - lower) * (rank - below) / c
            below, lower = below + c, bound
        return self.bounds[-1]


@dataclass
class VariantEvidence:
    requests: int = 0
    errors: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


@dataclass
class StepEvidence:
    baseline: VariantEvidence = field(default_factory=VariantEvidence)
    candidate: VariantEvidence = field(default_factory=VariantEvidence)
    probes: int = 0  # live probes of the candidate (match or mismatch)
    matches: int = 0
    unavailable_s: float = 0.0  # how long the candidate has been unavailable, now


@dataclass(frozen=True)
class Decision:
    action: Literal["hold", "advance", "rollback"]
    reason: str


def wilson(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """One-sided Wilson score bounds (lower, upper) of a proportion at `confidence`."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import norm

    z = norm.ppf(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def errors_worse(base: VariantEvidence, cand: VariantEvidence, alpha: float) -> float | None:
    """p-value of Fisher's exact test that the candidate fails more often than the baseline."""
    if not cand.requests or not base.requests:
        return None
    from scipy.stats import fisher_exact

    table = [[cand.errors, cand.requests - cand.errors], [base.errors, base.requests - base.errors]]
    return float(fisher_exact(table, alternative="greater").pvalue)


def decide(settings: RolloutSettings, ev: StepEvidence, elapsed_s: float) -> Decision:
    """Weigh one step's evidence: a significant breach of any guardrail rolls back; otherwise
    the step advances once it is long and large enough and every check is significantly met;
    otherwise it holds."""
    g, alpha = settings.guardrails, settings.significance
    base, cand = ev.baseline, ev.candidate
    if ev.unavailable_s >= g.max_unavailable_s:
        return Decision("rollback", f"candidate unavailable for {ev.unavailable_s:.0f} s (guardrail {g.max_unavailable_s:g} s)")
    if g.max_error_rate is not None and cand.requests:
        rate = cand.errors / cand.requests
        p = errors_worse(base, cand, alpha)
        if rate > g.max_error_rate and p is not None and p < alpha:
            return Decision("rollback", f"error rate {rate:.3f} > {g.max_error_rate:g} and above the baseline's "
                                        f"{base.errors}/{base.requests} (Fisher p={p:.3g})")
    undecided = []  # over a limit, but not significantly: not a breach, not a pass
    for name, limit in (("ttft", g.max_ttft_p95_ratio), ("e2e", g.max_e2e_p95_ratio)):
        if limit is None:
            continue
        hb, hc = getattr(base, name), getattr(cand, name)
        qb, qc = hb.quantile(0.95), hc.quantile(0.95)
        if qb and qc and qc / qb > limit:
            # Chi-square needs counts: below MIN_LATENCY_SAMPLES a side is not tested yet.
            enough = min(hb.n, hc.n) >= MIN_LATENCY_SAMPLES
            p = latency_test(hb.cumulative(), hc.cumulative()) if enough else None
            if p is not None and p < alpha:
                return Decision("rollback", f"{name} p95 {qc * 1000:.0f} ms is {qc / qb:.2f}x the baseline's "
                                            f"{qb * 1000:.0f} ms (> {limit:g}; chi-square p={p:.3g})")
            undecided.append(f"{name} p95 ratio {qc / qb:.2f} > {limit:g}, not yet significant")
    agreement_ok = True
    if g.min_agreement is not None:
        low, high = wilson(ev.matches, ev.probes, 1 - alpha)
        if ev.probes and high < g.min_agreement:
            return Decision("rollback", f"live agreement {ev.matches}/{ev.probes} is below {g.min_agreement:g} "
                                        f"(upper bound {high:.2f})")
        agreement_ok = low >= g.min_agreement
    if cand.requests < settings.min_requests or elapsed_s < settings.min_seconds:
        return Decision("hold", f"step needs {settings.min_requests} candidate requests and {settings.min_seconds:g} s "
                                f"(has {cand.requests}, {elapsed_s:.0f} s)")
    if undecided:
        return Decision("hold", "; ".join(undecided))
    if not agreement_ok:
        return Decision("hold", f"live agreement {ev.matches}/{ev.probes} not yet significantly above {g.min_agreement:g}")
    why = f"{cand.requests} candidate requests, {cand.errors} errors"
    if g.min_agreement is not None:
        why += f", live agreement {ev.matches}/{ev.probes}"
    return Decision("advance", why)
