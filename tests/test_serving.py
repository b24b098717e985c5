"""The first slice end to end: a real Ray cluster, two real vLLM CPU engines (bf16 and W8A8
built on load into an empty cache), one OpenAI ingress, the real `openai` client. The app is
conftest's `main_app` (shared with the A/B and metrics tests)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import httpx
import openai
import pytest

from conftest import engine_info


pytestmark = pytest.mark.e2e

APP = "main"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture
def base_url(main_app):
    return main_app


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_public_name_and_variants(client):
    models = {m.id: m for m in client.models.list()}
    assert {"smollm2", "smollm2--baseline", "smollm2--int8"} <= set(models)
    variants = models["smollm2"].model_extra["metadata"]["variants"]
    assert {(v["variant"], v["model_id"], v["traffic_share"]) for v in variants} == {
        ("baseline", "smollm2--baseline", 0.7),
        ("int8", "smollm2--int8", 0.3),
    }


def test_quantized_variant_was_built_on_load_and_the_engine_runs_it(base_url, session_cache):
    cards = {c["id"]: c for c in httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]}
    int8 = cards["smollm2--int8"]["metadata"]["engine"]
    base = cards["smollm2--baseline"]["metadata"]["engine"]
    # What the running vLLM engine reports, not what the config asked for:
    assert int8["quantization"] == "compressed-tensors"
    assert base["quantization"] is None
    assert int8["device"] == "cpu" and int8["tensor_parallel_size"] == 1
    # The session cache starts empty and only on-load hooks write to it: the artifact checked
    # below was built on load in this session — by this replica (cache_hit False) or, if a test
    # restarted the engine since, by its first replica (True). Either way, whatever ran before.
    assert isinstance(int8["optimization"]["cache_hit"], bool) and int8["optimization"]["method"] == "w8a8"
    # API clients see the artifact's cache key, never server paths or process ids.
    assert "pid" not in int8 and "checkpoint" not in int8 and "base" not in int8["optimization"]
    assert "/" not in json.dumps(int8["optimization"]["artifact"])
    # The engine loaded the artifact that the on-load hook built into the (empty) session cache
    # (the full record, through Ray).
    int8_full, base_full = engine_info("smollm2--int8"), engine_info("smollm2--baseline")
    checkpoint = Path(int8_full["checkpoint"])
    assert checkpoint.parent == session_cache and (checkpoint / "slimserve-manifest.json").exists()
    assert checkpoint.name == int8["optimization"]["artifact"]
    assert base_full["checkpoint"] == base_full["optimization"]["base"]


@pytest.mark.parametrize("variant", ["baseline", "int8"])
def test_each_variant_answers_sensibly(client, variant):
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=QUESTION, max_tokens=24, temperature=0,
        extra_headers={"x-slimserve-variant": variant},
    )
    assert raw.headers["x-slimserve-variant"] == variant
    answer = raw.parse()
    assert answer.model == "smollm2"  # the name the client asked for; the variant is in the header
    assert "Paris" in answer.choices[0].message.content


def test_chat_and_completion_round_trips(client):
    # Greedy, so that the answer can be checked against the variant the header names.
    ask = {"model": "smollm2", "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    chat = client.chat.completions.with_raw_response.create(messages=QUESTION, **ask)
    variant = chat.headers["x-slimserve-variant"]
    assert variant in {"baseline", "int8"}
    body = chat.parse()
    # Exactly the tokens asked for (ignore_eos), counted by the engine, and text for them: the
    # named variant's own answer (the same request forced to it answers the same).
    assert (body.usage.completion_tokens, body.choices[0].finish_reason) == (8, "length")
    forced = client.chat.completions.create(messages=QUESTION, extra_headers={"x-slimserve-variant": variant}, **ask)
    assert body.choices[0].message.content == forced.choices[0].message.content
    assert body.choices[0].message.content.strip()

    comp = client.completions.with_raw_response.create(prompt="The capital of France is", **ask)
    variant = comp.headers["x-slimserve-variant"]
    assert variant in {"baseline", "int8"}
    assert (comp.parse().usage.completion_tokens, comp.parse().choices[0].finish_reason) == (8, "length")
    forced = client.completions.create(prompt="The capital of France is", extra_headers={"x-slimserve-variant": variant}, **ask)
    assert comp.parse().choices[0].text == forced.choices[0].text and forced.choices[0].text.strip()


def test_a_variant_id_can_be_asked_for_directly(client):
    raw = client.completions.with_raw_response.create(model="smollm2--int8", prompt="Hello", max_tokens=4)
    assert raw.headers["x-slimserve-variant"] == "int8"


def test_streaming_chat_and_completion(client):
    """A greedy stream carries what the same request answers non-streamed, one chunk per
    generated token (as the engine counts them)."""
    # Lengths the model fills with ordinary tokens (its answer "The capital of France is Paris."
    # is 7 tokens, then end of turn): each one is a chunk of text.
    ask = {"model": "smollm2", "max_tokens": 6, "temperature": 0, "extra_headers": {"x-slimserve-variant": "baseline"}}
    whole = client.chat.completions.create(messages=QUESTION, **ask).choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
        messages=QUESTION, stream=True, stream_options={"include_usage": True}, **ask
    ) as response:
        assert response.headers["x-slimserve-variant"] == "baseline"
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = [c for c in response.parse()]
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[-1].usage.completion_tokens == 6 and len(texts) == 6, [c.model_dump() for c in chunks]
    assert "".join(texts) == whole

    ask["max_tokens"] = 16
    whole = client.completions.create(prompt="Once upon a time", **ask).choices[0].text
    stream = client.completions.create(prompt="Once upon a time", stream=True, stream_options={"include_usage": True}, **ask)
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert chunks[-1].usage.completion_tokens == 16 and len(texts) == 16, [c.model_dump() for c in chunks]
    assert "".join(texts) == whole


def test_sse_stream_ends_with_done(base_url):
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-slimserve-variant"]
        events = [l for l in r.iter_lines() if l.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_traffic_is_split_between_variants(client):
    seen = collections.Counter(
        client.completions.with_raw_response.create(model="smollm2", prompt="Hi", max_tokens=1, user=f"u{i}").headers[
            "x-slimserve-variant"
        ]
        for i in range(24)
    )
    # 70/30 split: P(one variant gets all 24) = 0.7**24 + 0.3**24 < 2e-4.
    assert set(seen) == {"baseline", "int8"}, seen


def test_unknown_model_is_a_404_in_openai_shape(client, base_url):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=QUESTION)
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "gpt-17", "prompt": "x"}, timeout=30)
    assert r.status_code == 404
    error = r.json()["error"]
    assert "gpt-17" in error["message"] and error["code"] == 404 and error["type"]


def test_unknown_forced_variant_is_a_400(base_url):
    r = httpx.post(
        f"{base_url}/v1/completions",
        json={"model": "smollm2", "prompt": "x", "max_tokens": 1},
        headers={"x-slimserve-variant": "fp4"},
        timeout=30,
    )
    assert r.status_code == 400
    assert "fp4" in r.json()["error"]["message"]


def test_malformed_request_is_a_400_in_openai_shape(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"model": "smollm2", "messages": "nope"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["message"]
