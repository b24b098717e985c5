"""The live quality signal's arithmetic and request shaping (no cluster); end to end in
test_ab_metrics.py."""

from __future__ import annotations

import math

import pytest

from slimserve.serve.config.file import ConfigError, load_config
from slimserve.serve.handoff import IngressSpec
from slimserve.serve.http.live_probes import Greedy, compare, greedy_of, probe_body, probe_plans
from slimserve.serve.config.probe import LiveProbeSettings


def g(tokens: str, tops: list[dict[str, float]] | None = None) -> Greedy:
    return Greedy(list(tokens), tops if tops is not None else [{t: 0.0} for t in tokens])


def test_identical_answers_match_with_zero_kl():
    tops = [{"a": math.log(0.7), "b": math.log(0.3)}] * 3
    r = compare(g("aaa", tops), g("aaa", tops), 3)
    assert (r.match, r.prefix, r.kl_per_token) == (True, 3, 0.0)


def test_only_the_first_n_tokens_count():
    assert compare(g("abcx"), g("abcy"), 3).match is True
    r = compare(g("abcx"), g("abyy"), 3)
    assert (r.match, r.prefix) == (False, 2)


def test_kl_uses_the_shared_context_only_and_bounds_missing_tokens():
    base = [{"a": math.log(0.9), "b": math.log(0.1)}, {"x": 0.0}, {"z": 0.0}]
    cand = [{"a": math.log(0.5), "b": math.log(0.5)}, {"y": 0.0}, {"q": math.log(0.01)}]
    r = compare(Greedy(["a", "x", "z"], base), Greedy(["a", "y", "q"], cand), 3)
    # Position 0: KL(0.9/0.1 || 0.5/0.5); position 1 (first divergence, same context): `x` is not
    # in the candidate's list, so it gets the candidate's lowest listed log-probability (0 here);
    # position 2 is after the divergence: its contexts differ, so it is not counted.
    kl0 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert r.prefix == 1 and r.kl_per_token == pytest.approx((kl0 + 0.0) / 2)


def test_answers_of_both_apis_are_read():
    completion = {"choices": [{"text": " a b", "logprobs": {"tokens": [" a", " b"],
                                                            "top_logprobs": [{" a": -0.1}, {" b": -0.2, " c": -2.0}]}}]}
    assert greedy_of(completion) == Greedy([" a", " b"], [{" a": -0.1}, {" b": -0.2, " c": -2.0}])
    chat = {"choices": [{"message": {"content": "Hi"}, "logprobs": {"content": [
        {"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -0.1}, {"token": "Hey", "logprob": -2.5}]}]}}]}
    assert greedy_of(chat) == Greedy(["Hi"], [{"Hi": -0.1, "Hey": -2.5}])
    assert greedy_of({"error": {"message": "x"}}) is None


def test_a_probe_is_a_short_greedy_request_with_logprobs():
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    settings = LiveProbeSettings(tokens=8, top_logprobs=3)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}], stream=True,
                                 temperature=0.9, max_completion_tokens=500, user="alice")
    p = probe_body(chat, "m--b", settings)
    assert (p.model, p.stream, p.temperature, p.max_tokens, p.max_completion_tokens, p.logprobs, p.top_logprobs, p.user) \
        == ("m--b", False, 0.0, 8, None, True, 3, None)
    assert chat.model == "m" and chat.stream is True  # the client's request is untouched
    comp = CompletionRequest(model="m", prompt="Once", max_tokens=300, n=2, echo=True)
    p = probe_body(comp, "m--b", settings)
    assert (p.prompt, p.max_tokens, p.n, p.echo, p.logprobs) == ("Once", 8, 1, False, 3)


def test_plans_compare_every_variant_with_the_baseline():
    cfg = {"models": [{"name": "m", "probe": {"sample": 0.5},
                       "variants": [{"name": "a"}, {"name": "b", "optimization": "w8a8"}, {"name": "c", "weight": 0}]}]}
    from slimserve.serve.app import build_ingress_spec

    plans = probe_plans(IngressSpec.model_validate(build_ingress_spec(load_config(cfg))))
    assert plans["m"].baseline == ("a", "m--a") and plans["m"].candidates == [("b", "m--b"), ("c", "m--c")]


@pytest.mark.parametrize("model, line", [
    ({"probe": {"baseline": "zz"}, "variants": [{"name": "a"}, {"name": "b"}]},
     "models.0: Value error, probe.baseline: 'zz' is not one of this model's variants ['a', 'b']"),
    ({"probe": {}, "variants": [{"name": "a"}]}, "models.0: Value error, probe: needs at least two variants to compare"),
    ({"probe": {"sample": 2}, "variants": [{"name": "a"}, {"name": "b"}]}, "models.0.probe.sample: Input should be less than or equal to 1"),
])
def test_bad_probe_settings_are_named_by_path(model, line):
    with pytest.raises(ConfigError) as e:
        load_config({"models": [{"name": "m", **model}]})
    assert any(line.replace("Value error, ", "") in l for l in e.value.lines), e.value.lines


def test_probe_and_rollout_change_the_ingress_only():
    """Their settings are the ingress's: adding them must not restart an engine (serve.run
    replaces the deployments whose version changed)."""
    from slimserve.serve.app import build_ingress_spec, engine_version, ingress_version

    plain = {"models": [{"name": "m", "variants": [{"name": "a", "weight": 3}, {"name": "b", "optimization": "w8a8"}]}]}
    probed = {"models": [{**plain["models"][0], "probe": {"sample": 0.1},
                          "rollout": {"candidate": "b", "guardrails": {"min_agreement": 0.5}}}]}
    reweighted = {"models": [{**plain["models"][0], "variants": [{"name": "a", "weight": 1}, {"name": "b", "optimization": "w8a8"}]}]}
    cfgs = [load_config(c) for c in (plain, probed, reweighted)]
    engines = [[engine_version(c, c.models[0], v, {}) for v in c.models[0].variants] for c in cfgs]
    assert engines[0] == engines[1] == engines[2]
    ingress = [ingress_version({"spec": build_ingress_spec(c)}) for c in cfgs]
    assert ingress[0] != ingress[1] and ingress[0] == ingress[2]  # weights alone: the user_config


def test_every_histogram_has_bounds_ray_accepts():
    """Ray refuses a histogram bound <= 0 when the metric is first used, inside a replica."""
    from slimserve.serve.metrics import METRICS

    for name, (kind, _, _, buckets) in METRICS.items():
        if kind == "histogram":
            assert buckets and all(b > 0 for b in buckets) and buckets == sorted(buckets), name
