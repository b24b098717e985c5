"""Always-valid tests of proportions, for decisions re-made on growing evidence (pure; scipy).

Every guardrail of a rollout is a question about a proportion: the candidate's failure rate
against a limit, the fraction of its requests slower than the baseline's p95 x a ratio against
5 %, its live agreement against a floor. Each is tested with a mixture sequential probability
ratio test (Robbins 1970; Johari, Pekelis & Walsh 2017/2022, "Always valid inference"): the
likelihood of the data under a Beta prior over the alternative, divided by its likelihood at the
null's boundary, is a nonnegative supermartingale under the null, so by Ville's inequality it
ever reaches 1/alpha with probability at most alpha, however often it is looked at. Counts may
be fractional: clustered data enter divided by their design effect (Rao & Scott 1981)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.special import betainc, betaln

# The Beta prior has mean p0 and this many pseudo-observations: its spread (~0.05 at p0 = 0.05,
# ~0.09 at 0.8) is about the size of the deviations the guardrails are there to catch.
PRIOR_STRENGTH = 20.0
_EPS = 1e-9


@lru_cache(maxsize=4096)  # pure; a look whose counts did not move (a quiet candidate) costs nothing
def log_evidence(x: float, n: float, p0: float, above: bool) -> float:
    """log of the mixture likelihood ratio of `x` successes in `n` against p0, the mixture over
    p > p0 (`above`: tests H0 p <= p0) or p < p0 (tests H0 p >= p0). Reject H0 once it reaches
    log(1 / alpha)."""
    if n <= 0:
        return 0.0
    p0 = min(max(p0, _EPS), 1 - _EPS)
    a, b = PRIOR_STRENGTH * p0, PRIOR_STRENGTH * (1 - p0)
    A, B = a + x, b + n - x
    # Mass of the posterior on the alternative's side of p0 (regularized beta), over the prior's.
    post = betainc(B, A, 1 - p0) if above else betainc(A, B, p0)
    if post <= 0:
        return -math.inf
    return float(betaln(A, B) + math.log(post) - x * math.log(p0) - (n - x) * math.log1p(-p0)) - _prior(p0, above)


@lru_cache(maxsize=256)
def _prior(p0: float, above: bool) -> float:
    """log of the Beta prior's normalizer and of its mass on the alternative's side."""
    a, b = PRIOR_STRENGTH * p0, PRIOR_STRENGTH * (1 - p0)
    return float(betaln(a, b) + math.log(betainc(b, a, 1 - p0) if above else betainc(a, b, p0)))


def rejects(x: float, n: float, p0: float, above: bool, alpha: float) -> bool:
    if n <= 0 or ((x <= p0 * n) if above else (x >= p0 * n)):
        return False  # the proportion is on the null's side: every p in the mixture fits worse than p0
    return log_evidence(x, n, p0, above) >= math.log(1 / alpha)


def p_value(x: float, n: float, p0: float, above: bool) -> float:
    """Always-valid p-value of the same test (1 / the evidence, at most 1)."""
    return min(1.0, math.exp(-log_evidence(x, n, p0, above)))


def more_needed(x: float, n: float, p0: float, above: bool, alpha: float, limit: float = 1e7) -> int | None:
    """About how many more observations the test needs to reject, if the proportion stays at
    what it is now (x / n); None when it is on the null's side (no amount would do)."""
    if n <= 0:
        return None
    p = x / n
    if (p <= p0) if above else (p >= p0):
        return None
    lo, hi = max(n, 1.0), max(n, 1.0)
    while not rejects(p * hi, hi, p0, above, alpha):  # doubling, then halve the bracket to ~10 %
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while hi > lo * 1.1:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if rejects(p * mid, mid, p0, above, alpha) else (mid, hi)
    return max(0, math.ceil(hi - n))


def design_effect(n_k: np.ndarray, x_k: np.ndarray) -> float:
    """Variance of the total of `x` over clusters (users, hashed into a few groups) relative to
    the binomial variance: 1 for independent requests, more when a user's requests go together
    (Kish's design effect, estimated with the cluster-robust variance). At least 1."""
    n, x = float(n_k.sum()), float(x_k.sum())
    if n <= 0 or x <= 0 or x >= n:
        return 1.0
    used = int(np.count_nonzero(n_k))
    if used < 2:
        return max(1.0, n)  # one cluster: one observation's worth
    p = x / n
    r = x_k - p * n_k
    robust = used / (used - 1) * float(r @ r)
    return max(1.0, robust / (n * p * (1 - p)))


@lru_cache(maxsize=65536)
def count_needed(n: int, q: float, alpha: float) -> float | None:
    """The smallest count of n observations below x that shows F(x) > q, so x bounds the
    q-quantile from above, time-uniformly (a quantile confidence sequence, Howard & Ramdas,
    Bernoulli 2022). None while n is too small to show it at all."""
    if n <= 0 or not rejects(n, n, q, True, alpha):
        return None
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if rejects(mid, n, q, True, alpha) else (mid + 1, hi)
    return float(lo)
