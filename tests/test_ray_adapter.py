"""What serve/rayllm.py relies on of Ray's private parts, checked against the installed Ray: a Ray
upgrade that moves, renames or reshapes one fails here, with a message naming it and what slimserve
does with it, rather than in a replica at serving time. No cluster: Ray's classes are built or read
as source (the vLLM engine's module is read, not imported: importing it imports vLLM).

Both pins are meant to pass: Ray 2.60 (CPU hosts) and 2.58.1 (GPU hosts); where they differ the
test says so."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import gc
import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from slimserve.serve import rayllm

RAY = tuple(int(x) for x in ray.__version__.split(".")[:2])


def changed(what: str, used_for: str) -> str:
    return (f"Ray {ray.__version__}: {what} is gone or changed. slimserve uses it {used_for}; "
            "adapt serve/rayllm.py (the one place that touches it) and this test.")


def source(module: str) -> str:
    """A Ray module's source, read without importing it."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, changed(f"module {module}", "(read as source here)")
    return Path(spec.origin).read_text(encoding="utf-8")


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# --- private modules and names --------------------------------------------------------------


def adapter_uses() -> list[tuple[str, str]]:
    """(module, name) for every name serve/rayllm.py imports from Ray, and every attribute it reads
    of a Ray module it imports (`constants.ENGINE_START_TIMEOUT_S`, `internal_kv._internal_kv_get`),
    read from its source: a new use is checked here without a new line."""
    tree = ast.parse(Path(rayllm.__file__).read_text(encoding="utf-8"))
    uses, modules = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
            for alias in node.names:
                uses.add((node.module, alias.name))
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if importlib.util.find_spec(modules[node.value.id]) is not None:  # a module, not a class
                uses.add((modules[node.value.id], node.attr))
    return sorted(uses)


@pytest.mark.parametrize("module, name", adapter_uses(), ids=[f"{m}.{n}" for m, n in adapter_uses()])
def test_each_ray_name_the_adapter_uses_is_still_there(module, name):
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        pytest.fail(changed(f"module {module} ({e})", "in serve/rayllm.py"))
    if not hasattr(found, name):
        try:
            importlib.import_module(f"{module}.{name}")  # a submodule not imported yet
        except ImportError:
            pytest.fail(changed(f"{module}.{name}", "in serve/rayllm.py"))


def test_the_adapter_uses_ray_serve_llms_private_modules():
    assert {m for m, _ in adapter_uses()} >= {
        "ray.llm._internal.common.callbacks.base", "ray.llm._internal.serve.core.configs.openai_api_models",
        "ray.llm._internal.serve.core.ingress.middleware", "ray.llm._internal.serve.utils.batcher",
        "ray.llm._internal.serve.utils.server_utils", "ray.llm._internal.serve.constants",
    }


def test_the_engine_start_limit_is_the_environment_knob_ray_serve_llm_reads():
    from ray.llm._internal.serve import constants

    assert isinstance(rayllm.engine_start_timeout_s(), int), changed("constants.ENGINE_START_TIMEOUT_S (an int)", "as the start budget")
    assert "RAYLLM_ENGINE_START_TIMEOUT_S" in source(constants.__name__), changed(
        "ENGINE_START_TIMEOUT_S read from $RAYLLM_ENGINE_START_TIMEOUT_S", "to give each replica its start budget (app.py)")
    assert "timeout=ENGINE_START_TIMEOUT_S" in source("ray.llm._internal.serve.core.server.llm_server"), changed(
        "LLMServer.start bounded by ENGINE_START_TIMEOUT_S", "to refuse builds that cannot fit it (engine/onload.py)")


def test_the_ray_serve_environment_slimserve_run_sets_is_what_ray_serve_reads():
    """`commands/local.RAY_SERVE_ENV` (set before Ray Serve is imported, so it stays out of
    rayllm.py, which imports Ray Serve): each name is read by Ray Serve's constants, with the
    effect the comment there describes (throughput-optimized mode turns direct ingress on; the
    draining period's default is 30 s). A fresh process: the constants are read at import."""
    import json
    import os
    import subprocess
    import sys

    from slimserve.serve.commands.local import RAY_SERVE_ENV

    def changed_env(what: str, used_for: str) -> str:
        return changed(what, used_for).replace("serve/rayllm.py", "serve/commands/local.py (RAY_SERVE_ENV)")

    constants = "ray.serve._private.constants"
    for name in RAY_SERVE_ENV:
        assert f'"{name}"' in source(constants), changed_env(
            f"{constants}.{name} read from ${name}", "in `slimserve run`'s environment and the Helm chart's")
    # The constants with RAY_SERVE_ENV set, then (reloaded) with none of it.
    read = ("import importlib, json, os, sys, ray.serve._private.constants as c\n"
            "seen = [c.RAY_SERVE_THROUGHPUT_OPTIMIZED, c.RAY_SERVE_ENABLE_DIRECT_INGRESS, c.RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S]\n"
            "[os.environ.pop(k) for k in sys.argv[1:]]\n"
            "print(json.dumps(seen + [importlib.reload(c).RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S]))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS")}
    out = subprocess.run([sys.executable, "-c", read, *RAY_SERVE_ENV], env={**env, **RAY_SERVE_ENV},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    optimized, direct, draining, default_draining = json.loads(out.stdout.strip().splitlines()[-1])
    assert optimized is True and direct is True, changed_env(
        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 turning on RAY_SERVE_ENABLE_DIRECT_INGRESS", "to serve HTTP from the ingress replica")
    assert draining == float(RAY_SERVE_ENV["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]), changed_env(
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "to stop `slimserve run` in seconds")
    assert default_draining == 30, changed_env("the direct ingress's 30 s minimum draining period",
                                               "(the reason `slimserve run` sets 2)")


def test_the_stream_batching_interval_is_an_experimental_config_ray_serve_llm_reads():
    assert '"stream_batching_interval_ms"' in source("ray.llm._internal.serve.core.server.llm_server"), changed(
        "LLMConfig.experimental_configs['stream_batching_interval_ms']", "for the streamed answers' batching (rayllm.experimental_configs)")


def test_the_gcs_store_functions_take_a_namespace():
    from ray.experimental import internal_kv

    assert params(internal_kv._internal_kv_get)[:1] == ["key"] and "namespace" in params(internal_kv._internal_kv_get), \
        changed("_internal_kv_get(key, *, namespace)", "to read the rollout state (rayllm.GcsKeyValue)")
    assert params(internal_kv._internal_kv_put)[:3] == ["key", "value", "overwrite"] and "namespace" in params(
        internal_kv._internal_kv_put), changed("_internal_kv_put(key, value, overwrite, *, namespace)", "to write the rollout state")
    assert isinstance(internal_kv._internal_kv_initialized(), bool), changed("_internal_kv_initialized()", "to find the GCS store")


# --- Application._bound_deployment, Deployment._version (app.py) ----------------------------


def test_a_pinned_version_is_what_serve_run_sends_the_controller():
    from ray.serve.deployment import Application, Deployment

    from slimserve.serve.app import build_app

    app = build_app({"models": [{"name": "m", "source": "default", "variants": [{"name": "a"}, {"name": "b"}]}]})
    assert isinstance(rayllm.bound_deployment(app), Deployment), changed("Application._bound_deployment", "to pin versions (app.py)")
    engines = rayllm.bound_engines(app)
    assert set(engines) == {"m--a", "m--b"} and all(isinstance(e, Application) for e in engines.values()), changed(
        "build_openai_app's ingress bound with init_kwargs['llm_deployments'] (model id -> Application)",
        "to pin each engine's version (app.py)")
    rayllm.pin_version(engines["m--a"], "pinned")
    assert rayllm.bound_deployment(engines["m--a"]).version == "pinned", changed("Deployment._version", "to pin versions")
    assert "version=deployment._version or get_random_string()" in source("ray.serve._private.client"), changed(
        "serve.run sending `deployment._version` (else a random version) to the controller",
        "so that a redeploy replaces only the deployments that changed (app.py: _pin_versions)")


# --- OpenAiIngress and the ASGI replica (http/ingress.py) -----------------------------------


class FakeHandle:
    """A DeploymentHandle's shape as OpenAiIngress calls it: options(...).<method>.remote(...)."""

    def options(self, **kwargs):
        return self

    @property
    def chat(self):
        async def stream(body, raw_request_info):
            yield "one"
            yield "two"
        return SimpleNamespace(remote=stream)


def test_openai_ingress_keeps_the_handles_and_the_model_ids():
    from ray.serve.llm.ingress import OpenAiIngress

    handles = {"m--a": FakeHandle(), "m--b": FakeHandle()}
    ingress = OpenAiIngress(handles, {"m--a": "card a", "m--b": "card b"})
    assert rayllm.variant_handles(ingress) == handles, changed("OpenAiIngress._default_serve_handles", "for variant health (http/health.py)")
    assert rayllm.model_ids(ingress) == ["m--a", "m--b"], changed("OpenAiIngress._model_cards", "to list the variants' cards")


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")  # the wrapper's async __del__
def test_the_ingress_seams_are_what_ray_calls_in_the_class_it_builds():
    """The class Ray Serve LLM deploys (make_fastapi_ingress, then serve.ingress): Ray Serve hands
    it the FastAPI app through `_set_asgi_app`, and every route answers from `_get_response`."""
    from ray.llm._internal.serve.core.ingress.ingress import make_fastapi_ingress
    from ray.serve.llm.ingress import OpenAiIngress

    from slimserve.serve.http.ingress import SlimserveIngress

    deployed = make_fastapi_ingress(SlimserveIngress)
    for seam in ("_set_asgi_app", "_get_response"):
        assert getattr(deployed, seam) is getattr(rayllm.IngressSeams, seam), changed(
            f"the seam `{seam}` (something between Ray's deployed class and IngressSeams defines it)", "for the ingress")
    assert params(OpenAiIngress._get_response) == ["self", "body", "call_method", "raw_request"], changed(
        "OpenAiIngress._get_response(self, *, body, call_method, raw_request)", "to time and rename every answer")
    assert source("ray.llm._internal.serve.core.ingress.ingress").count("self._get_response(") >= 2, changed(
        "OpenAiIngress's routes answering from self._get_response", "to time and rename every answer")

    seen = {}

    class Probe(rayllm.IngressSeams, OpenAiIngress):
        def on_asgi_app(self, app):
            seen["app"] = app

        async def engine_response(self, **kw):
            async for item in super().engine_response(**kw):
                yield item.upper()

    async def run():
        deployed = make_fastapi_ingress(Probe)
        obj = deployed.__new__(deployed)
        await obj.__init__({"m": FakeHandle()}, {"m": "card"})  # as a Serve replica constructs it
        return obj, [x async for x in obj._get_response(body=SimpleNamespace(model="m"), call_method="chat")]

    obj, items = asyncio.run(run())
    assert seen.get("app") is not None and seen["app"] is obj.app, changed(
        "Ray Serve handing the replica's FastAPI app over through `_set_asgi_app` at construction",
        "to put the guard middleware and the admin routes in front of every route")
    assert items == ["ONE", "TWO"], changed("OpenAiIngress._get_response's stream", "to time and rename every answer")
    assert "._callable._set_asgi_app(" in source("ray.serve._private.replica"), changed(
        "the replica calling `_set_asgi_app` on a late-built ASGI app", "to guard every route")
    del obj
    gc.collect()  # its async __del__ warns now, under this test's filter


# --- LLMServer and its vLLM engine (engine/server.py, engine/onload.py) --------------------------


def small_llm_config():
    from ray.serve.llm import LLMConfig

    return LLMConfig(model_loading_config={"model_id": "m"}, experimental_configs={"stream_batching_interval_ms": 20})


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")  # LLMServer's async __del__
def test_llm_server_keeps_its_config_and_batches_streams_through_one_method():
    from ray.serve.llm.deployment import LLMServer

    from slimserve.serve.engine.server import SlimServer

    config = small_llm_config()
    server = SlimServer.sync_init(config, engine_cls=object)
    assert rayllm.llm_config_of(server) is config, changed("LLMServer._llm_config", "for the hook's arguments and results (engine/server.py)")
    assert server.engine is None, changed("LLMServer.engine", "to reach vLLM's engine client")
    assert params(LLMServer._batch_output_stream) == ["self", "generator"], changed(
        "LLMServer._batch_output_stream(self, generator)", "to send a stream's first chunk at once (rayllm.FirstChunkAtOnce)")
    assert "self._batch_output_stream(" in source("ray.llm._internal.serve.core.server.llm_server"), changed(
        "LLMServer batching streams through self._batch_output_stream", "to send a stream's first chunk at once")
    assert SlimServer._batch_output_stream is rayllm.FirstChunkAtOnce._batch_output_stream

    async def chunks():
        return [b async for b in server._batch_output_stream(_tokens(3))]

    assert [t for b in asyncio.run(chunks()) for t in b] == ["t0", "t1", "t2"]


async def _tokens(n):
    for i in range(n):
        yield f"t{i}"


def test_the_vllm_engine_keeps_the_objects_the_adapter_reads():
    text = source("ray.llm._internal.serve.engines.vllm.vllm_engine")
    assert "self._engine_client = " in text, changed("VLLMEngine._engine_client", "for the engine's facts (rayllm.engine_client)")
    assert "self._oai_serving_tokenization" in text and '"openai_serving_tokenization"' in text, changed(
        "VLLMEngine._oai_serving_tokenization (from vLLM's state.openai_serving_tokenization)",
        "to serve /tokenize and /detokenize (rayllm.adopt_renamed_serving_objects)")
    if RAY >= (2, 60):
        assert "self._app_state = " in text, changed("VLLMEngine._app_state", "to find vLLM 0.32's serving_tokenization")
    # Ray 2.58.1 (GPU pin) keeps no _app_state: adopt_renamed_serving_objects then does nothing,
    # which is right there (vLLM 0.26 still uses the old name).
    server = SimpleNamespace(engine=SimpleNamespace(_engine_client="client", _oai_serving_tokenization=None,
                                                    _app_state=SimpleNamespace(serving_tokenization="tok")))
    assert rayllm.engine_client(server) == "client"
    rayllm.adopt_renamed_serving_objects(server)
    assert server.engine._oai_serving_tokenization == "tok"


def test_the_on_load_hook_has_the_callback_shape_it_relies_on():
    from ray.llm._internal.common.callbacks.base import CallbackCtx
    from ray.serve.llm import LLMConfig

    assert params(rayllm.CallbackBase.__init__) == ["self", "llm_config", "raise_error_on_callback", "ctx_kwargs", "kwargs"], \
        changed("CallbackBase.__init__(llm_config, raise_error_on_callback, ctx_kwargs, **kwargs)", "for the on-load hook")
    for hook in ("on_before_node_init", "on_after_node_init"):
        assert inspect.iscoroutinefunction(getattr(rayllm.CallbackBase, hook, None)), changed(f"CallbackBase.{hook}", "as the on-load hook")
    fields = {f.name for f in dataclasses.fields(CallbackCtx)}
    assert {"custom_data", "run_init_node"} <= fields, changed("CallbackCtx.custom_data / run_init_node", "to hand results over and skip the download")
    assert "callback.ctx.run_init_node" in source("ray.llm._internal.serve.engines.vllm.vllm_engine"), changed(
        "the engine start honouring ctx.run_init_node", "to skip the download of a local checkpoint")
    assert "self._callback_instance is not None" in inspect.getsource(LLMConfig.get_or_create_callback), changed(
        "LLMConfig.get_or_create_callback returning one cached instance",
        "to read the hook's results in the server (the same object the engine ran)")
    engine = small_llm_config().get_engine_config()
    engine.hf_model_id = "/local/checkpoint"
    assert engine.actual_hf_model_id == "/local/checkpoint", changed("VLLMEngineConfig.hf_model_id", "to point the engine at the build")


# --- Serve's words (http/health.py) ----------------------------------------------------------


def test_serve_still_says_a_replica_waits_to_be_scheduled_in_these_words():
    assert rayllm.NOT_SCHEDULED in source("ray.serve._private.deployment_state"), changed(
        f"Serve's status message for replicas not placed ({rayllm.NOT_SCHEDULED!r})", "to show `waiting_for_resources`")
    assert rayllm.waiting_for_resources("... have taken more than 30s to be scheduled. ...")


# --- names of ours that Ray's classes must not have -------------------------------------------


def _ray_private_names(classes, extra_sources=()) -> set[str]:
    names = set()
    for cls in classes:
        if not cls.__module__.startswith("ray."):
            continue
        names |= {n for n in vars(cls) if n.startswith("_") and not n.startswith("__")}
        try:
            text = inspect.getsource(cls)
        except (OSError, TypeError):
            text = source(cls.__module__)
        names |= set(re.findall(r"self\.(_[a-z]\w*)", text))
    for text in extra_sources:
        names |= set(re.findall(r"_callable\.(_[a-z]\w*)", text))
    return names


def _own_private_names(cls) -> set[str]:
    text = inspect.getsource(cls)
    # What the class body defines (not what Python adds, such as a Protocol's `_abc_impl`) and sets.
    own = {n for n in vars(cls) if n.startswith("_") and not n.startswith("__") and re.search(rf"\b{n}\b", text)}
    return own | set(re.findall(r"self\.(_[a-z]\w*)\s*(?::[^=\n]*)?=", text))


def test_our_subclasses_override_no_private_name_of_ray_but_the_seams():
    """A Ray upgrade that gives LLMServer, OpenAiIngress or the ASGI replica a private name that
    our subclass also uses would silently override it (or be overridden)."""
    from ray.llm._internal.serve.core.ingress.ingress import make_fastapi_ingress

    from slimserve.serve.engine.onload import OptimizeOnLoad
    from slimserve.serve.engine.server import SlimServer
    from slimserve.serve.http.ingress import SlimserveIngress

    replica = source("ray.serve._private.replica")
    for ours, mro in ((SlimserveIngress, make_fastapi_ingress(SlimserveIngress).__mro__),
                      (SlimServer, SlimServer.__mro__), (OptimizeOnLoad, OptimizeOnLoad.__mro__)):
        clash = _own_private_names(ours) & _ray_private_names(mro, [replica])
        assert not clash, changed(f"{sorted(clash)}, now also used by Ray's bases of {ours.__name__}", "as names of its own")
