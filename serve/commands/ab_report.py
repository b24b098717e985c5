"""`slimserve ab-report`: the variants of one public model side by side, from Prometheus, and
whether their differences are real.

Tests: the rollout's always-valid tests (rollout/sequential.py, docs/ROLLOUT_STATISTICS.md), so
a report read now and again later keeps its level. Latency — is more (slower) or less (faster)
than 5 % of the candidate's requests above the baseline's e2e p95 bound; errors — is the
candidate's failure rate (5xx, broken streams, timeouts, 429) above or below the baseline's.
Each candidate is compared with the baseline variant at significance level 0.05; when neither
way is shown yet, the verdict says about how many more requests it would take."""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from slimserve.serve.rollout.evidence import Q
from slimserve.serve.rollout.sequential import count_needed, more_needed, p_value, rejects

ALPHA = 0.05
MIN_REQUESTS = 30  # fewer per variant: no verdict


class PrometheusError(RuntimeError):
    pass


def query(prom: str, promql: str) -> list[dict[str, Any]]:
    """One instant query against Prometheus' HTTP API; returns its result vector."""
    url = prom.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.load(r)
    except OSError as e:
        raise PrometheusError(f"cannot query Prometheus at {prom}: {e}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus rejected {promql!r}: {body.get('error')}")
    return body["data"]["result"]


def _by(prom: str, promql: str, *keys: str) -> dict[Any, float]:
    out = {}
    for s in query(prom, promql):
        value = float(s["value"][1])
        if math.isnan(value):
            continue
        key = tuple(s["metric"].get(k, "") for k in keys)
        out[key[0] if len(keys) == 1 else key] = value
    return out


def delta(series: str, window: str) -> str:
    """PromQL for how much counter `series` grew in the window, summed over its series. Every
    ingress replica exports its own series (Ray labels them by worker), and a replaced ingress
    (every weight change) starts new ones at 0 while the old ones stop. Per series: its highest
    value in the window minus its value at the window's start — 0 for a series born inside the
    window, also one that ended there (not `increase()`, which loses such a series' first scraped
    value and extrapolates the rest; not `x - x offset W`, which drops a series that ended)."""
    grown = f"max_over_time({series}[{window}])"
    return f"({grown} - ({series} offset {window} or {grown} * 0))"


@dataclass
class VariantStats:
    variant: str
    requests: float = 0
    errors: float = 0
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    itl_p50: float | None = None
    itl_p95: float | None = None
    e2e_p50: float | None = None
    e2e_p95: float | None = None
    decode_tokens_per_s: float | None = None  # 1 / median inter-token latency
    weight_bytes: float | None = None
    quality: dict[str, float] = field(default_factory=dict)
    method: str | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass
class Comparison:
    candidate: str
    baseline: str
    latency_test: str
    latency_p: float | None
    latency_change: str  # faster | slower | no significant difference | not enough data
    error_test: str
    error_p: float | None
    error_change: str
    verdict: str


def collect(prom: str, model: str, window: str) -> dict[str, VariantStats]:
    sel = f'model="{model}"'
    stats: dict[str, VariantStats] = {}

    def get(v: str) -> VariantStats:
        return stats.setdefault(v, VariantStats(v))

    for v, n in _by(prom, "sum by (variant) " + delta(f'slimserve_requests_total{{{sel},variant!=""}}', window), "variant").items():
        get(v).requests = round(n)
    for v, n in _by(prom, "sum by (variant) " + delta(f'slimserve_requests_total{{{sel},status=~"5..|error|429|408"}}', window), "variant").items():
        get(v).errors = round(n)
    for short, name in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency"), ("e2e", "e2e_request_latency")):
        for q in (50, 95):
            buckets = delta(f"slimserve_{name}_seconds_bucket{{{sel}}}", window)
            promql = f"histogram_quantile({q / 100}, sum by (variant, le) {buckets})"
            for v, x in _by(prom, promql, "variant").items():
                setattr(get(v), f"{short}_p{q}", x)
    for v, x in _by(prom, f"max by (variant) (slimserve_model_weight_bytes{{{sel}}})", "variant").items():
        get(v).weight_bytes = x
    for (v, m), x in _by(prom, f"max by (variant, metric) (slimserve_quality_ratio{{{sel}}})", "variant", "metric").items():
        get(v).quality[m] = x
    for (v, m), _ in _by(prom, f"max by (variant, method) (slimserve_optimization_seconds{{{sel}}})", "variant", "method").items():
        get(v).method = m
    for s in stats.values():
        if s.itl_p50:
            s.decode_tokens_per_s = 1 / s.itl_p50
    return stats


def _buckets(prom: str, model: str, window: str, metric: str) -> dict[str, list[tuple[float, float]]]:
    """Per variant: (upper bound, cumulative count) of a latency histogram over the window."""
    out: dict[str, list[tuple[float, float]]] = {}
    promql = "sum by (variant, le) " + delta(f'{metric}_bucket{{model="{model}"}}', window)
    for s in query(prom, promql):
        out.setdefault(s["metric"]["variant"], []).append((float(s["metric"]["le"]), float(s["value"][1])))
    return {v: sorted(b) for v, b in out.items()}


def error_test(base: VariantStats, cand: VariantStats) -> tuple[float, float, int | None]:
    """(p more errors, p fewer errors, about how many more candidate requests would decide)."""
    p0 = base.errors / base.requests if base.requests else 0.0
    up, down = p_value(cand.errors, cand.requests, p0, True), p_value(cand.errors, cand.requests, p0, False)
    return up, down, more_needed(cand.errors, cand.requests, p0, up < down, ALPHA / 2)


def tail_test(base: list[tuple[float, float]], cand: list[tuple[float, float]]) -> tuple[float, float, int | None] | None:
    """(p slower, p faster, more requests needed): the candidate's fraction of requests above
    the baseline's p95 upper bound (as the rollout's latency guardrail, ratio 1) against 5 %."""
    if not base or not cand or len(base) != len(cand):
        return None
    bounds = np.array([b for b, _ in base[:-1]])
    counts = np.diff([0.0] + [c for _, c in base])
    i = int(np.searchsorted(np.cumsum(counts[:-1]), count_needed(int(sum(counts)), Q, ALPHA / 4) or math.inf))
    # Faster is judged above the baseline's p95 lower bound: the last bound shown under it.
    below = [k for k, c in enumerate(np.cumsum(counts[:-1])) if rejects(c, sum(counts), Q, False, ALPHA / 4)]
    n = cand[-1][1]
    if i >= len(bounds) or not n:
        return None
    over = n - cand[i][1]
    up = p_value(over, n, 1 - Q, True)
    down = p_value(n - cand[below[-1]][1], n, 1 - Q, False) if below else 1.0
    return up, down, more_needed(over, n, 1 - Q, True, ALPHA / 4)


def pick_baseline(stats: dict[str, VariantStats], asked: str | None) -> str:
    if asked:
        if asked not in stats:
            raise ValueError(f"no variant {asked!r} in Prometheus (has: {', '.join(stats) or 'none'})")
        return asked
    unoptimized = [v for v, s in stats.items() if s.method == "none"]
    if unoptimized:
        return unoptimized[0]
    return "baseline" if "baseline" in stats else max(stats, key=lambda v: stats[v].requests)


def _change(test: tuple[float, float, int | None] | None, worse: str, better: str) -> tuple[float | None, str]:
    """The two-sided p-value of a pair of one-sided tests (p worse, p better, ...), each at
    ALPHA / 2 (latency: another ALPHA / 4 bounds the baseline's p95), and the change it shows."""
    if test is None:
        return None, "not enough data"
    p = min(1.0, 2 * min(test[:2]))
    return p, "no significant difference" if p >= ALPHA else worse if test[0] < test[1] else better


def compare(prom: str, model: str, window: str, stats: dict[str, VariantStats], baseline: str) -> list[Comparison]:
    hist = _buckets(prom, model, window, "slimserve_e2e_request_latency_seconds")
    base = stats[baseline]
    out = []
    for name, cand in stats.items():
        if name == baseline:
            continue
        enough = min(base.requests, cand.requests) >= MIN_REQUESTS
        tail = tail_test(hist.get(baseline, []), hist.get(name, [])) if enough else None
        errs = error_test(base, cand) if enough else None
        lat_p, lat = _change(tail, "slower", "faster")
        err_p, err = _change(errs, "more errors", "fewer errors")
        more = [f"{what}: about {t[2]} more {name} requests at this rate" for what, t, c in
                (("latency", tail, lat), ("errors", errs, err)) if t and c == "no significant difference" and t[2]]
        if not enough:
            verdict = f"not enough traffic yet (need {MIN_REQUESTS} requests per variant)"
        elif lat == "slower" or err == "more errors":
            verdict = f"keep {baseline}: {name} is {'slower' if lat == 'slower' else 'less reliable'}"
        else:
            verdict = f"{name} can replace {baseline}: not slower, not less reliable"
            if "ppl_ratio" in cand.quality:
                verdict += f"; it costs quality ratio {cand.quality['ppl_ratio']:.3f} (perplexity vs base)"
            if more:
                verdict += f" (not yet shown either way; {', '.join(more)})"
        out.append(
            Comparison(name, baseline, "mixture SPRT: share of e2e latencies above the baseline's p95 bound vs 5 %",
                       lat_p, lat, "mixture SPRT: failure rate vs the baseline's", err_p, err, verdict)
        )
    return out


def report(prom: str, model: str, window: str = "1h", baseline: str | None = None) -> dict[str, Any]:
    stats = collect(prom, model, window)
    if not stats:
        raise ValueError(f"Prometheus has no slimserve requests for model {model!r} in the last {window}")
    base = pick_baseline(stats, baseline)
    comparisons = compare(prom, model, window, stats, base)
    return {
        "model": model,
        "window": window,
        "baseline": base,
        "alpha": ALPHA,
        "variants": {v: {**asdict(s), "error_rate": s.error_rate} for v, s in stats.items()},
        "comparisons": [asdict(c) for c in comparisons],
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def format_table(r: dict[str, Any]) -> str:
    head = ["variant", "requests", "err %", "TTFT p50/p95 ms", "ITL p50/p95 ms", "e2e p50/p95 ms", "tok/s", "weights MB", "quality"]
    rows = []
    for v, s in r["variants"].items():
        q = ", ".join(f"{k} {x:.3f}" for k, x in s["quality"].items()) or "-"
        rows.append([
            v + (" (baseline)" if v == r["baseline"] else ""),
            f"{s['requests']:.0f}",
            "-" if s["error_rate"] is None else f"{100 * s['error_rate']:.1f}",
            f"{_ms(s['ttft_p50'])}/{_ms(s['ttft_p95'])}",
            f"{_ms(s['itl_p50'])}/{_ms(s['itl_p95'])}",
            f"{_ms(s['e2e_p50'])}/{_ms(s['e2e_p95'])}",
            "-" if s["decode_tokens_per_s"] is None else f"{s['decode_tokens_per_s']:.1f}",
            "-" if s["weight_bytes"] is None else f"{s['weight_bytes'] / 1e6:.0f}",
            q,
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for c in r["comparisons"]:
        p = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
        lines.append(f"{c['candidate']} vs {c['baseline']}: latency {c['latency_change']} ({c['latency_test']}, p={p(c['latency_p'])}); "
                     f"errors {c['error_change']} ({c['error_test']}, p={p(c['error_p'])})")
    verdicts = [c["verdict"] for c in r["comparisons"]] or [f"only {r['baseline']} has traffic: nothing to compare"]
    lines.append(f"verdict ({r['model']}, last {r['window']}, alpha {r['alpha']}): " + "; ".join(verdicts))
    return "\n".join(lines)
