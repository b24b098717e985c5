"""Tensor parallelism on CI's 2-core machine: one engine split over both cores
(vLLM CPU, VLLM_CPU_OMP_THREADS_BIND='0|1', two {CPU: 1} placement bundles).

SmolLM2 has 9 attention heads (3 KV groups), which 2 does not divide: the TP=2 variant is
SmolLM2 with one KV group pruned (`structured`, 6 heads), which is also what a user must do."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import check_engine_computes_the_checkpoint, deploy_and_wait, engine_info, release_main_app, undeploy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def base_url(serve_url, session_cache):
    release_main_app()
    deploy_and_wait(
        {
            "cache_dir": str(session_cache),
            "models": [{
                "name": "smollm2",
                "engine": {"max_model_len": 1024},
                "variants": [{
                    "name": "tp2",
                    "optimization": {"method": "structured", "heads_keep": 0.67, "calibration": {"samples": 16}},
                    "engine": {"tensor_parallel_size": 2},
                }],
            }],
        },
        "tp",
    )
    yield serve_url
    undeploy("tp")


def test_tp2_variant_starts_and_answers(base_url):
    cards = {c["id"]: c for c in httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]}
    engine = cards["smollm2--tp2"]["metadata"]["engine"]
    assert engine["tensor_parallel_size"] == 2
    assert engine["optimization"]["report"]["heads"] == [9, 6]

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=24,
        temperature=0,
    )
    assert raw.headers["x-slimserve-variant"] == "tp2"
    answer = raw.parse()
    # Within max_tokens, and a shorter answer is one the model ended itself.
    assert 1 <= answer.usage.completion_tokens <= 24
    assert answer.choices[0].finish_reason == ("length" if answer.usage.completion_tokens == 24 else "stop"), answer

    # Pruned without healing, the model is no longer a good chat model (it ends the turn at once,
    # in transformers too), so check the split engine computes what the unsplit model computes.
    comp = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, extra_body={"min_tokens": 8}
    )
    assert comp.usage.completion_tokens == 8 and comp.choices[0].text
    checkpoint = engine_info("smollm2--tp2", app="tp")["checkpoint"]
    check_engine_computes_the_checkpoint(client, "smollm2", "The capital of France is", checkpoint)
