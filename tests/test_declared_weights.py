"""Weights from a Serve config file (what `serve deploy` and KubeRay's RayService apply, and what
the Helm chart writes): the application's `args` without weights, the weights as the ingress
deployment's `user_config`. A change of weights alone reaches the live ingress: no replica of the
app is replaced and a stream in flight finishes."""

from __future__ import annotations

import collections
import copy
import json
import threading

import httpx
import pytest

from conftest import MAIN_CONFIG, release_main_app, slimserve_info, undeploy, wait_for

pytestmark = pytest.mark.e2e

APP, PREFIX = "declared", "/declared"


def serve_config(session_cache, weights: dict[str, float]) -> dict:
    args = copy.deepcopy(MAIN_CONFIG)
    args["cache_dir"] = str(session_cache)
    for variant in args["models"][0]["variants"]:
        variant.pop("weight", None)
    return {"applications": [{
        "name": APP, "route_prefix": PREFIX, "import_path": "slimserve.serve.app:build_app", "args": args,
        "deployments": [{"name": "SlimserveIngress", "user_config": {"weights": {"smollm2": weights}}}],
    }]}


def deploy_declared(config: dict) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    # What the dashboard's REST API does for `serve deploy` and for KubeRay (no dashboard here).
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def replica_pids() -> dict[str, int]:
    out = {}
    for name in ("SlimserveIngress", "SlimServer:smollm2--baseline", "SlimServer:smollm2--int8"):
        out[name] = slimserve_info(name, APP, timeout_s=30)["pid"]
    return out


def ingress_weights() -> dict | None:
    try:
        return slimserve_info("SlimserveIngress", APP)["weights"]
    except Exception:
        return None


def test_a_weight_change_in_a_serve_config_reaches_the_live_ingress(serve_url, session_cache):
    from ray import serve

    release_main_app()  # its engines hold the cores
    base = f"{serve_url}{PREFIX}"
    deploy_declared(serve_config(session_cache, {"baseline": 1, "int8": 0}))
    try:
        wait_for(lambda: getattr(serve.status().applications.get(APP), "status", None) == "RUNNING", 900, "app running")
        assert ingress_weights() == {"smollm2": {"baseline": 1.0, "int8": 0.0}}
        pids = replica_pids()

        result: list[tuple[int, str, dict | None, str | None]] = []
        streaming = threading.Event()

        def stream():
            body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True,
                    "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as r:
                parts, usage, finish = [], None, None
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        for choice in chunk["choices"]:  # the last chunk, usage only, has none
                            parts.append(choice["text"])
                            finish = choice.get("finish_reason") or finish
                        usage = chunk.get("usage") or usage
                        streaming.set()
                result.append((r.status_code, "".join(parts), usage, finish))

        t = threading.Thread(target=stream)
        t.start()
        assert streaming.wait(120), "the stream did not start"
        deploy_declared(serve_config(session_cache, {"baseline": 0, "int8": 1}))
        wait_for(lambda: ingress_weights() == {"smollm2": {"baseline": 0.0, "int8": 1.0}}, 120, "new weights live")
        t.join(300)
        # Not cut by the change: all 48 tokens asked for (ignore_eos) came, and the stream ended normally.
        [(code, text, usage, finish)] = result
        assert (code, usage["completion_tokens"], finish) == (200, 48, "length") and text.strip(), result
        assert replica_pids() == pids  # ingress and engines: the same processes
        seen = collections.Counter(
            httpx.post(f"{base}/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 1,
                                                       "user": f"u{i}"}, timeout=120).headers["x-slimserve-variant"]
            for i in range(10))
        assert seen == {"int8": 10}, seen
    finally:
        undeploy(APP)
