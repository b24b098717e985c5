"""Untrusted input at the front door, end to end on the shared app: API keys (Bearer, 401 in
OpenAI's shape) and request limits (a 400 naming the parameter, 413 for the body; never a 500)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from conftest import MAIN_APP, TEST_API_KEYS_ENV, deploy_and_wait, main_config

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"n": 50}, "n"),
        ({"prompt": ["x"] * 100}, "prompt"),
    ],
)
def test_a_request_over_a_limit_is_a_400_naming_the_parameter(main_app, body, param):
    r = httpx.post(f"{main_app}/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 1, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert f"`{param}`" in error["message"] and "ingress.limits." in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"stop": [f"s{i}" for i in range(5)]},  # vLLM's VLLM_MAX_STOP_STRINGS
        {"max_tokens": 2000},  # prompt + max_tokens over max_model_len (1024)
        {"prompt": "word " * 1500},  # prompt alone over max_model_len
        {"temperature": -1},
        {"logprobs": 1000},
    ],
)
def test_what_vllm_refuses_is_a_400_too(main_app, body):
    r = httpx.post(f"{main_app}/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 1, **body}, timeout=60)
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"]["message"]


@pytest.mark.parametrize(
    "message",
    [
        {"content": "hi", "name": "x"},
        # Found by the schemathesis run: a Harmony-style message (no `role`) passes vLLM's schema,
        # then its chat renderer raised KeyError('role'): a 500 with a traceback.
        {"author": {"role": "user"}, "content": [{"type": "text", "text": "hi"}], "channel": None, "content_type": None},
    ],
)
def test_a_chat_message_without_role_is_a_400_not_a_500(main_app, message):
    r = httpx.post(f"{main_app}/v1/chat/completions",
                   json={"model": "smollm2", "messages": [message], "max_tokens": 1}, timeout=60)
    assert r.status_code == 400, r.text
    assert "role" in r.json()["error"]["message"] and "Traceback" not in r.text


def test_too_many_chat_messages_is_a_400(main_app):
    r = httpx.post(f"{main_app}/v1/chat/completions", json={"model": "smollm2", "messages": QUESTION * 300}, timeout=60)
    assert r.status_code == 400 and "`messages`" in r.json()["error"]["message"]


def test_an_oversized_body_is_a_413_before_any_parsing(main_app):
    r = httpx.post(f"{main_app}/v1/completions", json={"model": "smollm2", "prompt": "x" * 2_000_000}, timeout=60)
    assert r.status_code == 413
    assert "max_body_bytes" in r.json()["error"]["message"]


def test_a_request_within_the_limits_is_answered(main_app):
    r = httpx.post(f"{main_app}/v1/completions",
                   json={"model": "smollm2", "prompt": "x", "max_tokens": 2, "n": 2, "stop": ["\n"]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


@pytest.fixture
def keyed_app(main_app, session_cache):
    """The shared app with API keys switched on (only the ingress is replaced)."""
    deploy_and_wait(main_config(session_cache, ingress={"api_keys_env": TEST_API_KEYS_ENV}), MAIN_APP)
    t0 = time.monotonic()
    while httpx.get(f"{main_app}/v1/models", timeout=30).status_code != 401:
        assert time.monotonic() - t0 < 120, "the ingress with API keys did not take over"
        time.sleep(1)
    yield main_app
    deploy_and_wait(main_config(session_cache), MAIN_APP)
    while httpx.get(f"{main_app}/v1/models", timeout=30).status_code != 200:
        assert time.monotonic() - t0 < 240
        time.sleep(1)


def test_api_keys(keyed_app):
    for headers, why in (({}, "Missing API key"), ({"Authorization": "Bearer sk-wrong"}, "Incorrect API key")):
        r = httpx.post(f"{keyed_app}/v1/completions", json={"model": "smollm2", "prompt": "x"}, headers=headers, timeout=60)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error" and why in r.json()["error"]["message"]
    # The real openai client, with each of the two keys; health stays open for probes.
    for key in ("sk-test-one", "sk-test-two"):
        client = openai.OpenAI(base_url=f"{keyed_app}/v1", api_key=key, max_retries=0)
        assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=1).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_app}/v1", api_key="sk-nope", max_retries=0).models.list()
    assert httpx.get(f"{keyed_app}/-/healthz", timeout=30).status_code == 200


def test_a_chunked_body_without_length_is_bounded_too(main_app):
    def chunks():  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"model": "smollm2", "prompt": "'
        for _ in range(40):
            yield b"x" * 50_000
        yield b'"}'

    r = httpx.post(f"{main_app}/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]


def test_a_body_that_is_not_json_is_a_400(main_app):
    r = httpx.post(f"{main_app}/v1/chat/completions", content=b"hello", headers={"content-type": "text/plain"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and "JSON" in r.json()["error"]["message"]


def test_a_request_without_max_tokens_gets_the_default(main_app):
    # A chat request without max_tokens once ran to the context limit (67 s on CPU). With
    # ignore_eos the model cannot stop first: it is cut at exactly the main app's
    # ingress.limits.default_max_tokens.
    r = httpx.post(f"{main_app}/v1/chat/completions", timeout=120, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Tell a long story."}], "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert (r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["finish_reason"]) == (48, "length")


@pytest.mark.parametrize("route", ["/v1/embeddings", "/v1/score"])
def test_routes_a_generative_model_cannot_serve_are_refused_in_openai_shape(main_app, route):
    body = {"model": "smollm2", "input": "hi"} if route == "/v1/embeddings" else {"model": "smollm2", "text_1": "a", "text_2": "b"}
    r = httpx.post(f"{main_app}{route}", json=body, timeout=60)
    assert r.status_code == 400 and "generative" in r.json()["error"]["message"]


def test_tokenize_is_routed_to_a_variant(main_app):
    r = httpx.post(f"{main_app}/tokenize", json={"model": "smollm2", "prompt": "Hello world"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-slimserve-variant"] in ("baseline", "int8")
    # The engine's tokenizer is the model's (both variants keep it): the same ids as read here.
    from transformers import AutoTokenizer

    from slimserve.optimizers.models import resolve_source

    ids = AutoTokenizer.from_pretrained(resolve_source("default"))("Hello world").input_ids
    assert (r.json()["tokens"], r.json()["count"]) == (ids, len(ids)), r.json()
    r = httpx.post(f"{main_app}/tokenize", json={"model": "nope", "prompt": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_answers_name_the_model_the_client_asked_for(main_app):
    client = openai.OpenAI(base_url=f"{main_app}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=QUESTION, max_tokens=2)
    assert raw.parse().model == "smollm2" and raw.headers["x-slimserve-variant"] in ("baseline", "int8")
    stream = client.completions.create(model="smollm2", prompt="Hi", max_tokens=3, stream=True)
    assert {chunk.model for chunk in stream} == {"smollm2"}
    # Asking for a variant's own id gets that id back.
    assert client.completions.create(model="smollm2--int8", prompt="Hi", max_tokens=1).model == "smollm2--int8"


def test_error_answers_carry_the_request_id_and_the_variant_once_chosen(main_app):
    r = httpx.post(f"{main_app}/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 100_000}, timeout=60)
    assert r.status_code == 400 and r.headers["x-request-id"]
    r = httpx.post(f"{main_app}/v1/completions", json={"model": "smollm2", "prompt": "word " * 1500, "max_tokens": 1},
                   headers={"x-slimserve-variant": "int8"}, timeout=60)
    assert r.status_code == 400 and r.headers["x-slimserve-variant"] == "int8" and r.headers["x-request-id"]


def test_variant_ids_are_refused_when_forcing_is_off(main_app, session_cache):
    deploy_and_wait(main_config(session_cache, ingress={"allow_forced_variant": False}), MAIN_APP)
    try:
        t0 = time.monotonic()
        while True:
            r = httpx.post(f"{main_app}/v1/completions", json={"model": "smollm2--int8", "prompt": "x", "max_tokens": 1}, timeout=60)
            if r.status_code == 400:
                break
            assert time.monotonic() - t0 < 120, "the ingress without forced variants did not take over"
            time.sleep(1)
        assert "allow_forced_variant" in r.json()["error"]["message"]
        ok = httpx.post(f"{main_app}/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 1},
                        headers={"x-slimserve-variant": "int8"}, timeout=60)
        assert ok.status_code == 200  # the header is ignored, the split decides
    finally:
        deploy_and_wait(main_config(session_cache), MAIN_APP)


def test_with_forcing_off_the_client_cannot_choose_its_variant_by_user_name(main_app, session_cache):
    """`allow_forced_variant: false` makes the API key the sticky identity (ingress.sticky_user_from
    defaults to `api_key` then): two user names that the rendezvous hash sends to different
    variants reach the same variant under one key, and each key keeps its variant."""
    from slimserve.serve.http.split import TrafficSplit, VariantRoute

    split = TrafficSplit([VariantRoute("baseline", "smollm2--baseline", 70), VariantRoute("int8", "smollm2--int8", 30)])
    by_variant = {}
    for i in range(200):  # user names the header would route to each variant
        by_variant.setdefault(split.pick(f"user-{i}").variant, f"user-{i}")
    assert set(by_variant) == {"baseline", "int8"}
    deploy_and_wait(main_config(session_cache, ingress={"allow_forced_variant": False, "api_keys_env": TEST_API_KEYS_ENV}),
                    MAIN_APP)
    try:
        t0 = time.monotonic()
        while httpx.get(f"{main_app}/v1/models", timeout=30).status_code != 401:
            assert time.monotonic() - t0 < 120, "the ingress with API keys did not take over"
            time.sleep(1)
        for key in ("sk-test-one", "sk-test-two"):
            seen = set()
            for user in by_variant.values():
                for where in ("header", "body"):
                    r = httpx.post(f"{main_app}/v1/completions", timeout=60, json={
                        "model": "smollm2", "prompt": "x", "max_tokens": 1, **({"user": user} if where == "body" else {})},
                        headers={"authorization": f"Bearer {key}", **({"x-slimserve-user": user} if where == "header" else {})})
                    assert r.status_code == 200, r.text
                    seen.add(r.headers["x-slimserve-variant"])
            assert len(seen) == 1, (key, seen)
    finally:
        deploy_and_wait(main_config(session_cache), MAIN_APP)
