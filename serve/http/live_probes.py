"""The live quality signal: a sample of real requests is replayed in the background to a model's
baseline and to each other variant as a short greedy completion, and their agreement is
recorded per variant. It is the quality gate measured on the prompts the model actually serves
(the load-time gate measures a fixed held-out text).

A probe never delays the client (it starts after the request was routed, as a task of its own)
and is the first thing shed under load: at most `max_in_flight` run per ingress replica, and a
variant whose queue is full drops it. Both count as `dropped` in slimserve_live_probes_total."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ray.serve.exceptions import BackPressureError

from slimserve.serve.metrics import metric
from slimserve.serve.config.probe import LiveProbeSettings

log = logging.getLogger("slimserve.live_probes")

# get_response(body=..., call_method=..., raw_request=None) -> the engine's answer, as an async iterator
GetResponse = Callable[..., AsyncIterator[Any]]


@dataclass(frozen=True)
class Greedy:
    """One side's greedy answer: its tokens, and per position the top tokens' log-probabilities."""

    tokens: list[str]
    top: list[dict[str, float]]


@dataclass(frozen=True)
class Agreement:
    match: bool  # the first N tokens are the same
    prefix: int  # tokens the two answers share from the start
    kl_per_token: float | None  # estimated KL(baseline || candidate), nats per token


def compare(base: Greedy, cand: Greedy, n: int) -> Agreement:
    """Agreement of two greedy answers to one prompt. The KL estimate uses only the positions
    where both sides saw the same context (the shared prefix, and the first position after it),
    and sums over the baseline's top tokens; a token missing from the candidate's top list gets
    the smallest log-probability the candidate listed, an upper bound of its own, so the
    estimate is a lower bound of the truncated KL. Each position's term is at least 0."""
    a, b = base.tokens[:n], cand.tokens[:n]
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    terms = []
    for i in range(min(prefix + 1, len(base.top), len(cand.top), n)):
        p, q = base.top[i], cand.top[i]
        if not p or not q:
            continue
        floor = min(q.values())
        terms.append(max(0.0, sum(math.exp(lp) * (lp - q.get(t, floor)) for t, lp in p.items())))
    return Agreement(a == b, prefix, sum(terms) / len(terms) if terms else None)


def greedy_of(answer: Any) -> Greedy | None:
    """The tokens and top log-probabilities of a non-streamed completion or chat answer (Ray
    Serve LLM's response models, or their dicts); None for an error or an empty answer."""
    data = answer.model_dump() if hasattr(answer, "model_dump") else answer
    if not isinstance(data, dict) or not data.get("choices"):
        return None
    logprobs = data["choices"][0].get("logprobs") or {}
    if "content" in logprobs:  # chat: [{token, logprob, top_logprobs: [{token, logprob}]}]
        content = logprobs["content"] or []
        return Greedy([c["token"] for c in content],
                      [{t["token"]: t["logprob"] for t in c.get("top_logprobs") or []} for c in content])
    if "tokens" in logprobs:  # completions: tokens, top_logprobs: [{token: logprob}]
        return Greedy(list(logprobs["tokens"] or []), [dict(t or {}) for t in logprobs.get("top_logprobs") or []])
    return None


def probe_body(body, model_id: str, settings: LiveProbeSettings):
    """The client's request as a short greedy probe to `model_id`, with log-probabilities."""
    update: dict[str, Any] = {"model": model_id, "stream": False, "temperature": 0.0, "max_tokens": settings.tokens,
                              "n": 1, "user": None}
    for name, value in (("stream_options", None), ("max_completion_tokens", None), ("best_of", None),
                        ("echo", False), ("min_tokens", 0), ("ignore_eos", False), ("seed", None)):
        if hasattr(body, name):
            update[name] = value
    if hasattr(body, "messages"):
        update.update(logprobs=True, top_logprobs=settings.top_logprobs)
    else:
        update["logprobs"] = settings.top_logprobs
    return body.model_copy(deep=True, update=update)


@dataclass
class ProbePlan:
    """A public name's probes: its baseline and the variants compared with it."""

    model: str
    baseline: tuple[str, str]  # (variant, model id)
    candidates: list[tuple[str, str]]
    settings: LiveProbeSettings
    recent: dict[str, deque] = field(default_factory=dict)  # variant -> last `window` matches (1/0)


class LiveProbes:
    def __init__(self, plans: dict[str, ProbePlan], get_response: GetResponse, rng: random.Random | None = None,
                 on_result: Callable[[str, str, bool], None] | None = None):
        self._plans = plans
        self._on_result = on_result  # (model, variant, matched): the rollout's agreement evidence
        self._get_response = get_response
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task] = set()

    def maybe_probe(self, body, call_method: str, model: str) -> None:
        """Called for every routed request of public name `model`: start a probe for a sample."""
        plan = self._plans.get(model)
        if plan is None or self._rng.random() >= plan.settings.sample:
            return
        prompt = getattr(body, "prompt", None)
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > 1:
            return  # several prompts in one request: not one comparison
        if len(self._tasks) >= plan.settings.max_in_flight:
            for variant, _ in plan.candidates:
                self._count(plan, variant, "dropped")
            return
        # Copied now: the request goes on to its engine (and is changed on the way) meanwhile.
        task = asyncio.get_running_loop().create_task(self._probe(plan, body.model_copy(deep=True), call_method))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, plan: ProbePlan, body, call_method: str) -> None:
        base = await self._answer(plan, body, call_method, plan.baseline[1])
        for variant, model_id in plan.candidates:
            if not isinstance(base, Greedy):
                self._count(plan, variant, base)  # the baseline's outcome decides for all
                continue
            cand = await self._answer(plan, body, call_method, model_id)
            if not isinstance(cand, Greedy):
                self._count(plan, variant, cand)
                continue
            result = compare(base, cand, plan.settings.tokens)
            try:
                self._record(plan, variant, result)
            except Exception as e:  # a task's exception would otherwise vanish unseen
                log.warning("live probe of %s/%s: recording failed: %s", plan.model, variant, e)

    async def _answer(self, plan: ProbePlan, body, call_method: str, model_id: str) -> Greedy | str:
        """The greedy answer of `model_id`, or the probe's outcome label when there is none."""
        try:
            answer = None
            async for item in self._get_response(body=probe_body(body, model_id, plan.settings),
                                                 call_method=call_method, raw_request=None):
                answer = item
        except BackPressureError:
            return "dropped"
        except Exception as e:  # recorded, never raised: no client waits on this
            log.warning("live probe of %s to %s failed: %s", plan.model, model_id, e)
            return "failed"
        greedy = greedy_of(answer) if answer is not None else None
        return greedy if greedy is not None and greedy.tokens else "failed"

    def _count(self, plan: ProbePlan, variant: str, outcome: str) -> None:
        metric("slimserve_live_probes_total").inc(1, tags={"model": plan.model, "variant": variant, "outcome": outcome})

    def _record(self, plan: ProbePlan, variant: str, result: Agreement) -> None:
        labels = {"model": plan.model, "variant": variant}
        self._count(plan, variant, "match" if result.match else "mismatch")
        recent = plan.recent.setdefault(variant, deque(maxlen=plan.settings.window))
        recent.append(1.0 if result.match else 0.0)
        metric("slimserve_live_agreement").set(sum(recent) / len(recent), tags=labels)
        if self._on_result is not None:
            self._on_result(plan.model, variant, result.match)
        metric("slimserve_live_prefix_tokens").observe(result.prefix, tags=labels)
        # The histograms' _sum are approximate (Ray rebuilds them from bucket midpoints): exact
        # sums too. Ray's Counter refuses an increment of 0.
        if result.prefix > 0:
            metric("slimserve_live_shared_tokens_total").inc(result.prefix, tags=labels)
        if result.kl_per_token is not None:
            metric("slimserve_live_kl_per_token").observe(result.kl_per_token, tags=labels)
            if result.kl_per_token > 0:
                metric("slimserve_live_kl_nats_total").inc(result.kl_per_token, tags=labels)

    def set_gauges(self) -> None:
        """Set the agreement gauges again (Ray drops a gauge that is not set for a while)."""
        for plan in self._plans.values():
            for variant, recent in plan.recent.items():
                if recent:
                    metric("slimserve_live_agreement").set(sum(recent) / len(recent), tags={"model": plan.model, "variant": variant})

    def agreement(self, model: str, variant: str) -> tuple[float, int] | None:
        """(match fraction, probes) over this replica's last `window` probes of `variant`."""
        plan = self._plans.get(model)
        recent = plan.recent.get(variant) if plan else None
        return (sum(recent) / len(recent), len(recent)) if recent else None


def probe_plans(spec) -> dict[str, ProbePlan]:
    """Each probed public name's plan, from the ingress's IngressSpec."""
    plans = {}
    for model, settings in spec.probes.items():
        routes = {r.variant: r.model_id for r in spec.splits[model]}
        baseline = settings.baseline or next(iter(routes))
        plans[model] = ProbePlan(model, (baseline, routes[baseline]),
                                 [(v, m) for v, m in routes.items() if v != baseline], settings)
    return plans
