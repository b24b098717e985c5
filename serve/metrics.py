"""slimserve's Prometheus metrics, recorded through `ray.util.metrics` so that they appear on
Ray's per-node metrics endpoint (the one KubeRay clusters scrape) beside `ray_serve_*` and
vLLM's `ray_vllm_*`.

Ray prepends its namespace: `slimserve_requests_total` is exported as
`ray_slimserve_requests_total`. The scrape configs in `deploy/` and the chart strip that prefix
(metric relabelling), so queries, dashboards and alerts use the `slimserve_*` names below.

Every per-request metric is labelled `model` (public name) and `variant`. Metrics are created
lazily, in the process that records them (ingress replica or engine replica).
"""

from __future__ import annotations

import threading
from typing import Any

# Seconds. LLM latencies span milliseconds (a cached token) to minutes (a long CPU generation).
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 20, 40, 80]
ITL_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5]
E2E_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 240, 600]
PREFIX_BUCKETS = [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256]  # tokens (le=0.5: none shared; Ray wants bounds > 0)
KL_BUCKETS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10]  # nats per token

REQUEST = ("model", "variant")

# name -> (kind, description, label keys, buckets). The single list of what slimserve exports:
# dashboards, alert rules and their tests are checked against it.
METRICS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    # per request, recorded by the ingress
    "slimserve_requests_total": ("counter", "Requests answered, by HTTP status (`error` when a stream broke after its start).", REQUEST + ("status",), None),
    "slimserve_requests_in_flight": ("gauge", "Requests being answered now.", REQUEST, None),
    "slimserve_time_to_first_token_seconds": ("histogram", "Time from request arrival at the ingress to the first streamed token.", REQUEST, TTFT_BUCKETS),
    "slimserve_inter_token_latency_seconds": ("histogram", "Mean time between streamed tokens of one request.", REQUEST, ITL_BUCKETS),
    "slimserve_e2e_request_latency_seconds": ("histogram", "Time from request arrival at the ingress to the last byte of the answer.", REQUEST, E2E_BUCKETS),
    "slimserve_prompt_tokens_total": ("counter", "Prompt tokens of answered requests.", REQUEST, None),
    "slimserve_generation_tokens_total": ("counter", "Generated tokens of answered requests.", REQUEST, None),
    "slimserve_shadow_requests_total": ("counter", "Copies of requests sent to the shadow variant, by outcome (HTTP status, `error` or `dropped`).", REQUEST + ("status",), None),
    "slimserve_shadow_e2e_request_latency_seconds": ("histogram", "End-to-end latency of shadow copies (the client never waits on them).", REQUEST, E2E_BUCKETS),
    "slimserve_variant_up": ("gauge", "1 when the variant's engine answers its health check, else 0 (probed by the ingress).", REQUEST, None),
    "slimserve_traffic_weight": ("gauge", "Configured traffic weight of the variant.", REQUEST, None),
    # live quality probes (probe: block), recorded by the ingress; `variant` is the candidate
    "slimserve_live_probes_total": ("counter", "Live probes against the baseline, by outcome: `match` / `mismatch` (first N greedy tokens equal or not), `dropped` (shed under load), `failed`.", REQUEST + ("outcome",), None),
    "slimserve_live_agreement": ("gauge", "Fraction of this ingress replica's last probes (probe.window) whose first N greedy tokens equal the baseline's.", REQUEST, None),
    "slimserve_live_prefix_tokens": ("histogram", "Greedy tokens a probe's answer shares with the baseline's from the start.", REQUEST, PREFIX_BUCKETS),
    "slimserve_live_kl_per_token": ("histogram", "Estimated KL(baseline || variant) per token over the probe's shared context, nats (top-logprob truncated: a lower bound).", REQUEST, KL_BUCKETS),
    # Ray exports a histogram's _sum rebuilt from bucket midpoints (a prefix of 8 counts as 6):
    # these counters carry the exact sums (mean = sum / slimserve_live_prefix_tokens_count).
    "slimserve_live_shared_tokens_total": ("counter", "Greedy tokens the probes' answers share with the baseline's from the start, summed over probes (exact).", REQUEST, None),
    "slimserve_live_kl_nats_total": ("counter", "The probes' per-token KL estimates (slimserve_live_kl_per_token), summed over probes (exact).", REQUEST, None),
    # progressive rollout (rollout: block), recorded by the ingress; `variant` is the candidate
    "slimserve_rollout_percent": ("gauge", "The candidate's share of its pair's traffic now, %.", REQUEST, None),
    "slimserve_rollout_step": ("gauge", "The rollout's current step (1-based).", REQUEST, None),
    "slimserve_rollout_status": ("gauge", "1 for the rollout's status (running, paused, promoted, rolled_back, aborted), else 0.", REQUEST + ("status",), None),
    "slimserve_rollout_decisions_total": ("counter", "Rollout events by action: start, advance, promote, rollback (a guardrail breach), pause, resume, abort.", REQUEST + ("action",), None),
    # per engine replica, recorded by the engine deployment
    "slimserve_model_weight_bytes": ("gauge", "Bytes of the served weight tensors as stored (packed for quantized layers).", REQUEST, None),
    "slimserve_checkpoint_bytes": ("gauge", "Bytes of the served checkpoint folder on disk.", REQUEST, None),
    "slimserve_process_rss_bytes": ("gauge", "Resident memory of the engine replica and its engine processes.", REQUEST, None),
    "slimserve_gpu_memory_used_bytes": ("gauge", "GPU memory held by the variant's own engine workers (torch reserved memory: weights, KV cache, activations; GPU hosts only).", REQUEST, None),
    "slimserve_optimization_seconds": ("gauge", "Seconds the replica spent preparing its checkpoint (optimizing, or verifying a cached one).", REQUEST + ("method",), None),
    "slimserve_optimization_runs_total": ("counter", "Checkpoint preparations at replica start, by artifact cache `hit` or `miss`.", REQUEST + ("method", "cache"), None),
    "slimserve_quality_ratio": ("gauge", "Quality of the variant against its base: `ppl_ratio` (perplexity / base perplexity) or `teacher_agreement`.", REQUEST + ("metric",), None),
    "slimserve_optimization_failed": ("gauge", "1 when the variant could not be prepared at load and is not served (its traffic goes to the others).", REQUEST, None),
    "slimserve_optimization_retries_total": ("counter", "Retries of a variant's preparation after a transient failure (cache lock timeout, out of memory, full disk); prepare_retry bounds them.", REQUEST, None),
    "slimserve_quality_gate_failed": ("gauge", "1 when the variant failed its quality gate and the base model is served instead.", REQUEST, None),
}

_lock = threading.Lock()
_made: dict[str, Any] = {}


def metric(name: str):
    """The `ray.util.metrics` object for `name` (created on first use in this process)."""
    with _lock:
        m = _made.get(name)
        if m is None:
            from ray.util import metrics as rm

            kind, description, tags, buckets = METRICS[name]
            # Ray appends `_total` to counters itself; give it the bare name.
            base = name.removesuffix("_total") if kind == "counter" else name
            if kind == "counter":
                m = rm.Counter(base, description=description, tag_keys=tags)
            elif kind == "gauge":
                m = rm.Gauge(name, description=description, tag_keys=tags)
            else:
                m = rm.Histogram(name, description=description, boundaries=buckets, tag_keys=tags)
            _made[name] = m
        return m
