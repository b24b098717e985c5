"""What slimserve's layer costs: TTFT and end-to-end latency through slimserve (A/B ingress with
metrics; streams: first chunk at once, the rest batched every 50 ms) against a plain Ray Serve
LLM app (`build_openai_app`, default ingress: streams batched every 50 ms, the first chunk
included), the same with Ray Serve LLM's stream batching off (`experimental_configs:
stream_batching_interval_ms: 0`), and the bare `vllm.entrypoints.openai.api_server`, same model
(SmolLM2 bf16), same engine settings, same run, at concurrency 1 and 8.

    .venv/bin/python bench/overhead.py [--requests 48] [--out docs/results/overhead_cpu.json]

Each server runs alone with its engine bound to core 0; the client and Ray's processes share
core 1. Measure on a quiet machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from servers import stop_server

from slimserve.optimizers.models import resolve_source

PORT = 18555
PROMPT = "Write a short story about a lighthouse keeper."
MAX_TOKENS = 32
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0", "HF_HUB_OFFLINE": "1"}

RAY_SERVER = """
import os, sys, time, ray
from ray import serve
kind, model, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
experimental = {"stream_batching_interval_ms": 0} if kind == "ray-serve-llm-interval0" else {}
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": port})
if kind == "slimserve":
    from slimserve.serve.app import build_app
    app = build_app({"models": [{"name": "m", "source": model, "engine": {"max_model_len": 1024},
                                 "deployment": {"cpu_threads_bind": "0"},
                                 "variants": [{"name": "bf16", "quality": {"measure": False}}]}]})
    name = "m"
else:
    from ray.serve.llm import LLMConfig, build_openai_app
    cfg = LLMConfig(model_loading_config={"model_id": "m", "model_source": model},
                    engine_kwargs={"enforce_eager": True, "max_model_len": 1024, "dtype": "auto"},
                    runtime_env={"env_vars": %r},
                    placement_group_config={"bundles": [{"CPU": 1}]}, experimental_configs=experimental,
                    deployment_config={"ray_actor_options": {"num_cpus": 0}})
    app = build_openai_app({"llm_configs": [cfg], "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}})
serve.run(app, name="bench", route_prefix="/")
print("READY", flush=True)
while True:
    time.sleep(3600)
""" % (ENGINE_ENV,)


def start(kind: str, model: Path) -> subprocess.Popen:
    env = {**os.environ, **ENGINE_ENV}
    if kind == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", "m",
               "--port", str(PORT), "--host", "127.0.0.1", "--enforce-eager", "--max-model-len", "1024"]
    else:
        cmd = [sys.executable, "-c", RAY_SERVER, kind, str(model), str(PORT)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    stop_server(proc)


async def one(client: httpx.AsyncClient) -> tuple[float, float]:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft = None
    async with client.stream("POST", f"http://127.0.0.1:{PORT}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                ttft = time.perf_counter() - t0
    return ttft, time.perf_counter() - t0


async def load(concurrency: int, n: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        await one(client)  # warm-up
        queue = list(range(n))
        results: list[tuple[float, float]] = []

        async def worker():
            while queue:
                queue.pop()
                results.append(await one(client))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    e2e = sorted(r[1] for r in results)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {
        "requests": n,
        "ttft_p50_ms": round(1000 * statistics.median(ttft), 1), "ttft_p95_ms": round(1000 * q(ttft, 0.95), 1),
        "e2e_p50_ms": round(1000 * statistics.median(e2e), 1), "e2e_p95_ms": round(1000 * q(e2e, 0.95), 1),
        "tokens_per_s": round(n * MAX_TOKENS / wall, 1),
    }


def wait_ready(proc: subprocess.Popen, timeout_s: float = 600) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.post(f"http://127.0.0.1:{PORT}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1},
                          timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("server not ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--out", default="docs/results/overhead_cpu.json")
    args = ap.parse_args()
    model = resolve_source("default")
    results = {}
    for kind in ("vllm", "ray-serve-llm", "ray-serve-llm-interval0", "slimserve"):
        proc = start(kind, model)
        try:
            wait_ready(proc)
            results[kind] = {f"c{c}": asyncio.run(load(c, args.requests)) for c in (1, 8)}
        finally:
            stop(proc)
        print(kind, json.dumps(results[kind]), flush=True)
    for c in ("c1", "c8"):
        base, ours = results["ray-serve-llm"][c], results["slimserve"][c]
        results.setdefault("slimserve_vs_ray_serve_llm", {})[c] = {
            k: round(ours[k] / base[k] - 1, 3) for k in ("ttft_p50_ms", "ttft_p95_ms", "e2e_p50_ms", "e2e_p95_ms")
        }
        # The GPU issue's target, on CPU: slimserve's TTFT p50 minus the bare engine's.
        results.setdefault("ttft_p50_over_bare_vllm_ms", {})[c] = {
            kind: round(results[kind][c]["ttft_p50_ms"] - results["vllm"][c]["ttft_p50_ms"], 1)
            for kind in ("ray-serve-llm", "ray-serve-llm-interval0", "slimserve")
        }
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}
    results["settings"] = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True, "engine": "bf16, eager, core 0",
                           "slimserve": "stream_batching_interval_ms 50 (its default), first chunk at once"}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("slimserve_vs_ray_serve_llm", "ttft_p50_over_bare_vllm_ms")}, indent=2))


if __name__ == "__main__":
    main()
