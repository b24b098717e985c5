"""What live probes cost the client: TTFT and end-to-end latency through slimserve with `probe:`
off, at 2 % and at 10 % sampling, same engines, same run (only the ingress is replaced between
settings). SmolLM2 as bf16 + W8A8 (the demo's pair), streamed completions at concurrency 1, each
request a new user (the split decides).

    .venv/bin/python bench/probe_overhead.py [--requests 200] [--out docs/results/probe_overhead_cpu.json]

Measure on a quiet machine: on a 2-core host each engine has one core, and a probe is extra work
for both engines (two 16-token greedy completions)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import httpx

from slimserve.serve.config.file import load_config
from slimserve.serve.commands.local import deploy, local_cluster, wait_ready

PORT = 18556
PROMPT = "Write a short story about a lighthouse keeper."
MAX_TOKENS = 32
SETTINGS = {"off": None, "2%": {"sample": 0.02, "tokens": 16}, "10%": {"sample": 0.10, "tokens": 16}}


def config(probe: dict | None) -> dict:
    return {
        "models": [{
            "name": "m", "engine": {"max_model_len": 1024},
            "variants": [{"name": "bf16"}, {"name": "int8", "optimization": "w8a8"}],
            **({"probe": probe} if probe else {}),
        }],
    }


def one(client: httpx.Client, i: int) -> tuple[float, float]:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True, "user": f"bench-{i}"}
    t0 = time.perf_counter()
    ttft = None
    with client.stream("POST", f"http://127.0.0.1:{PORT}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if ttft is None and line.startswith("data: {"):
                ttft = time.perf_counter() - t0
    return ttft, time.perf_counter() - t0


def measure(n: int) -> dict:
    with httpx.Client(timeout=600) as client:
        for i in range(3):
            one(client, -i - 1)  # warm-up
        results = [one(client, i) for i in range(n)]
    ttft, e2e = sorted(r[0] for r in results), sorted(r[1] for r in results)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"requests": n, "ttft_p50_ms": round(1000 * statistics.median(ttft), 1), "ttft_p95_ms": round(1000 * q(ttft, 0.95), 1),
            "e2e_p50_ms": round(1000 * statistics.median(e2e), 1), "e2e_p95_ms": round(1000 * q(e2e, 0.95), 1)}


def probes_done() -> dict:
    text = httpx.get("http://127.0.0.1:8092/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_slimserve_live_probes_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = out.get(outcome, 0) + float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", default="docs/results/probe_overhead_cpu.json")
    args = ap.parse_args()
    results: dict = {}
    with local_cluster(load_config(config(None)), host="127.0.0.1", port=PORT, metrics_port=8092):
        for name, probe in SETTINGS.items():
            deploy(load_config(config(probe)))
            wait_ready()
            time.sleep(3)
            before = probes_done()
            results[name] = measure(args.requests)
            time.sleep(10)  # the last probes finish and are exported
            after = probes_done()
            results[name]["probes"] = {k: round(after.get(k, 0) - before.get(k, 0)) for k in after}
            print(name, json.dumps(results[name]), flush=True)
    for name in ("2%", "10%"):
        results.setdefault("vs_off", {})[name] = {
            k: round(results[name][k] / results["off"][k] - 1, 3) for k in ("ttft_p50_ms", "ttft_p95_ms", "e2e_p50_ms")
        }
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}
    results["settings"] = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True, "concurrency": 1,
                           "variants": "bf16 + w8a8 (50/50), each engine on its own core", "probe_tokens": 16}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["vs_off"], indent=2))


if __name__ == "__main__":
    main()
