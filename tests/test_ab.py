"""The traffic split's arithmetic (no cluster): weights, stickiness, and how few users move when
weights change a little. The same code runs in the ingress (tested end to end in
test_ab_metrics.py)."""

from __future__ import annotations

import collections
import random

import pytest

from slimserve.serve.http.split import RouteError, Router, Target, TrafficSplit, VariantRoute
from slimserve.serve.config.file import ConfigError, load_config


def split(**weights: float) -> TrafficSplit:
    return TrafficSplit([VariantRoute(v, f"m--{v}", w) for v, w in weights.items()], rng=random.Random(0))


USERS = [f"user-{i}" for i in range(20000)]


def test_sticky_users_always_get_the_same_variant():
    s = split(a=70, b=30)
    first = {u: s.pick(u).variant for u in USERS[:500]}
    assert all(s.pick(u).variant == v for u, v in first.items() for _ in range(3))
    # Another ingress replica (a new object) agrees: no shared state needed.
    assert all(split(a=70, b=30).pick(u).variant == v for u, v in first.items())


@pytest.mark.parametrize("user_keyed", [True, False])
def test_shares_follow_the_weights(user_keyed):
    s = split(a=70, b=20, c=10)
    seen = collections.Counter(s.pick(u if user_keyed else None).variant for u in USERS)
    n = len(USERS)
    for v, p in {"a": 0.7, "b": 0.2, "c": 0.1}.items():
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(seen[v] - n * p) < 4 * sd, (v, seen)


def test_a_small_weight_change_moves_few_users():
    before = split(a=70, b=30)
    after = split(a=65, b=35)  # 5 % of the traffic moves from a to b
    moved = [u for u in USERS if before.pick(u).variant != after.pick(u).variant]
    share = len(moved) / len(USERS)
    # The minimum possible is 5 %; a plain `hash % 100` bucketing would also reach it, but
    # re-hashing with the new weights (random choice per user) would move ~42 %.
    assert 0.04 < share < 0.07, share
    assert all(before.pick(u).variant == "a" and after.pick(u).variant == "b" for u in moved)


def test_weight_zero_is_never_picked():
    s = split(a=1, shadow=0)
    assert {s.pick(u).variant for u in USERS[:2000]} == {"a"}
    assert {s.pick().variant for _ in range(2000)} == {"a"}


def test_shadow_must_name_a_variant_of_the_model():
    with pytest.raises(ConfigError) as e:
        load_config({"models": [{"name": "m", "shadow": "nope", "variants": [{"name": "a"}]}]})
    assert "models.0" in str(e.value) and "shadow: 'nope' is not one of this model's variants" in str(e.value)


def test_a_down_variant_moves_only_its_own_users():
    s = split(a=50, b=30, c=20)
    before = {u: s.pick(u).variant for u in USERS[:5000]}
    after = {u: s.pick(u, exclude={"c"}).variant for u in USERS[:5000]}
    assert all(after[u] == v for u, v in before.items() if v != "c")  # nobody else moves
    moved = collections.Counter(after[u] for u, v in before.items() if v == "c")
    assert set(moved) == {"a", "b"} and moved["a"] > moved["b"]  # in proportion to weight (5:3)
    assert s.pick(exclude={"a", "b", "c"}) is None and s.pick("x", exclude={"a", "b", "c"}) is None


# --- routing (serve/http/split.py Router): pure, no Ray ----------------------------------------------

def router(**kw) -> Router:
    splits = {
        "m": [VariantRoute("a", "m--a", 70), VariantRoute("b", "m--b", 30), VariantRoute("s", "m--s", 0)],
        "n": [VariantRoute("x", "n--x", 1)],
    }
    return Router(splits, **{"shadows": {"m": "s"}, **kw})


def route(r: Router, model, forced=None, user=None, down=()):
    return r.route(model, forced, user, lambda m: m not in down, lambda m: "loading" if m in down else "ready")


def test_a_variant_id_reaches_that_variant_without_a_shadow_copy():
    assert route(router(), "m--b") == Target("m", "b", "m--b", None)


def test_a_public_name_gets_a_weighted_variant_and_its_shadow():
    t = route(router(), "m", user="alice")
    assert t.variant in ("a", "b") and t.model_id == f"m--{t.variant}" and t.shadow_model_id == "m--s"


def test_forcing_the_shadow_variant_sends_no_copy_to_itself():
    assert route(router(), "m", forced="s").shadow_model_id is None


def test_unknown_model_is_404_and_missing_model_400_when_ambiguous():
    with pytest.raises(RouteError) as e:
        route(router(), "gpt-9")
    assert e.value.status == 404 and "available: m, n" in e.value.message
    with pytest.raises(RouteError) as e:
        route(router(), None)
    assert e.value.status == 400
    only = Router({"n": [VariantRoute("x", "n--x", 1)]})
    assert route(only, None).model_id == "n--x"  # the only model is the default


def test_forced_variants():
    assert route(router(), "m", forced="b").variant == "b"
    with pytest.raises(RouteError) as e:
        route(router(), "m", forced="zzz")
    assert e.value.status == 400 and "has: a, b, s" in e.value.message
    with pytest.raises(RouteError) as e:
        route(router(), "m", forced="b", down={"m--b"})
    assert e.value.status == 503 and "variant `b` of `m` is not available: loading" in e.value.message
    # Forcing disabled: the header is ignored, the split decides.
    assert route(router(allow_forced=False), "m", forced="zzz", user="u").variant in ("a", "b")


def test_down_variants_are_skipped_and_all_down_is_503_naming_each():
    r = router()
    assert {route(r, "m", user=f"u{i}", down={"m--a"}).variant for i in range(50)} == {"b"}
    with pytest.raises(RouteError) as e:
        route(r, "m", down={"m--a", "m--b"})
    assert e.value.status == 503 and "a: loading; b: loading" in e.value.message


def test_candidates_are_what_availability_must_be_known_for():
    r = router()
    assert r.candidates("m", None) == ["m--a", "m--b", "m--s"]
    assert r.candidates("m", "b") == ["m--b"]
    assert r.candidates("n--x", None) == ["n--x"]
    assert r.candidates("gpt-9", None) == []


def test_new_weights_apply_in_place_and_keep_the_rest():
    r = router()
    r.set_weights({"m": {"a": 0, "b": 5}})
    assert {route(r, "m", user=f"u{i}").variant for i in range(200)} == {"b"}
    assert r.weights()["m"] == {"a": 0.0, "b": 5.0, "s": 0.0}  # `s` was left out: unchanged
    assert r.by_model_id["m--b"][1].weight == 5.0  # what /v1/models and the gauges read


@pytest.mark.parametrize("weights, message", [
    ({"gpt-9": {"a": 1}}, "`gpt-9` is not a model this ingress serves"),
    ({"m": {"zzz": 1}}, "weights.m: no variant zzz (has: a, b, s)"),
    ({"m": {"a": -1}}, "weights.m: weights must be >= 0"),
    ({"m": {"a": 0, "b": 0}}, "weights.m: all variant weights are 0"),
])
def test_bad_weights_are_refused_whole(weights, message):
    r = router()
    before = r.weights()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        r.set_weights({"n": {"x": 9}, **weights})  # a good part is not applied either
    assert r.weights() == before


def test_a_rollouts_pair_is_split_per_request_and_its_users_stay_with_the_pair():
    """rollout.sticky false (the default): a sticky user is kept on the rollout's pair as one route
    of their summed weight, and each of its requests goes to the baseline or the candidate by
    their weights; users of the model's other variants stay where they were while the pair's
    inner split moves."""
    def pair_split(base: float, cand: float) -> TrafficSplit:
        return split(base=base, cand=cand, other=50)
    step1, step2 = pair_split(47.5, 2.5), pair_split(25, 25)
    pair = ("base", "cand")
    outside = {u for u in USERS[:4000] if step1.pick(u, per_request=pair).variant == "other"}
    assert abs(len(outside) / 4000 - 0.5) < 0.04
    assert all(step2.pick(u, per_request=pair).variant == "other" for u in outside)
    # A pair user's requests go to both variants, the candidate's share by weight.
    user = next(u for u in USERS if u not in outside and step1.pick(u, per_request=pair).variant != "other")
    seen = collections.Counter(step2.pick(user, per_request=pair).variant for _ in range(4000))
    assert set(seen) == {"base", "cand"} and abs(seen["cand"] / 4000 - 0.5) < 0.04, seen
    seen = collections.Counter(step1.pick(user, per_request=pair).variant for _ in range(4000))
    assert abs(seen["cand"] / 4000 - 0.05) < 0.015, seen
    # Without per_request, the same user always gets one variant.
    assert len({step2.pick(user).variant for _ in range(50)}) == 1
    # The router applies it to the model whose rollout asks for it.
    routes = [VariantRoute(v, f"m--{v}", w) for v, w in (("base", 25), ("cand", 25))]
    router = Router({"m": routes}, per_request={"m": pair})
    got = {router.route("m", None, user, lambda _: True, str).variant for _ in range(200)}
    assert got == {"base", "cand"}
    assert len({Router({"m": routes}).route("m", None, user, lambda _: True, str).variant for _ in range(200)}) == 1
    # /v1/models says so, beside `sticky`.
    from slimserve.serve.http.health import State, VariantHealth
    from slimserve.serve.http.model_cards import public_card
    card = public_card("m", router, lambda _: VariantHealth(State.READY)).metadata
    assert (card["sticky"], card["split_per_request"]) == (True, ["base", "cand"])
    assert "split_per_request" not in public_card("m", Router({"m": routes}), lambda _: VariantHealth(State.READY)).metadata
