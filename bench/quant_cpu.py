"""Quantization methods on SmolLM2 with vLLM CPU: optimization time, checkpoint size,
perplexity ratio, and generation throughput at batch 1 and 8 against bf16 in the same run.

    .venv/bin/python bench/quant_cpu.py [--cache DIR] [--out docs/results/quant_cpu.json]

Measure on a quiet machine: each engine runs alone, bound to core 0 (a vLLM CPU engine that
shares its core with another busy process slows 20-30x)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from slimserve.optimizers.models import slimserve_home
from slimserve.optimizers.build.pipeline import optimize
from slimserve.optimizers.report import size_on_disk
from slimserve.serve.app import CPU_INT4_W4A8
from slimserve.serve.config.schema import EngineSettings

VARIANTS = {
    "bf16": "none",
    "w8a8": {"method": "w8a8"},
    "gptq-w4-g64": {"method": "gptq"},
    "rtn-w4-g64": {"method": "rtn", "bits": 4},
    "structured-h67-m50": {"method": "structured", "heads_keep": 0.67, "mlp_keep": 0.5},
}

THROUGHPUT = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams
    llm = LLM(sys.argv[1], enforce_eager=True, max_model_len=1024, seed=0)
    out = {}
    if len(sys.argv) > 2:  # a quality gate's HeldOut: the perplexity the engine gives it, too
        from transformers import AutoTokenizer
        from slimserve.optimizers.quality import HeldOut, engine_perplexity
        held_out = HeldOut.model_validate_json(sys.argv[2])
        out["perplexity"] = round(engine_perplexity(llm, AutoTokenizer.from_pretrained(sys.argv[1]), held_out), 3)
    prompts = [f"Write a short story about a lighthouse keeper number {i}." for i in range(8)]
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=8))  # warm-up
    for batch in (1, 8):
        t0 = time.perf_counter()
        res = llm.generate(prompts[:batch], params)
        secs = time.perf_counter() - t0
        out[f"batch{batch}_tok_s"] = round(sum(len(r.outputs[0].token_ids) for r in res) / secs, 1)
    print("RESULT " + json.dumps(out))
""")


def throughput(checkpoint: Path, int4_activations: str | None = None, held_out: dict | None = None) -> dict:
    """Tokens/s at batch 1 and 8 of one engine bound to core 0; 4-bit checkpoints computed with
    `int4_activations` (`bfloat16` / `int8`; None: as slimserve configures CPU engines); with
    `held_out` (a quality gate's HeldOut), the engine's perplexity on it as well."""
    w4a8 = CPU_INT4_W4A8[int4_activations or EngineSettings().cpu_int4_activations]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_INT4_W4A8": w4a8}
    args = [str(checkpoint), *([json.dumps(held_out)] if held_out else [])]
    proc = subprocess.run([sys.executable, "-c", THROUGHPUT, *args], capture_output=True, text=True, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(line[0][7:])


def write_result(out: str, command: str, rows: dict) -> None:
    """The raw results of a CPU serving benchmark, with the machine and the date."""
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores (engine bound to core 0)",
        "command": command,
        "held_out": "fortunes (Debian fortunes-min), 16 x 256 tokens",
        "rows": rows,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=str(slimserve_home() / "artifacts"))
    ap.add_argument("--out", default="docs/results/quant_cpu.json")
    args = ap.parse_args()
    rows = {}
    # Build everything first, so that no optimization runs while an engine is timed.
    built = {name: optimize("default", spec, args.cache) for name, spec in VARIANTS.items()}
    base_size = size_on_disk(built["bf16"].base)
    for name, r in built.items():
        report = r.manifest.report if r.manifest else None
        q = report.quality if report else None
        rows[name] = {
            "method": r.method,
            "optimize_seconds": report.optimize_seconds if report else None,
            "size_mb": round(size_on_disk(r.path) / 1e6, 1),
            "size_vs_bf16": round(size_on_disk(r.path) / base_size, 3),
            "ppl": q.perplexity if q else None,
            "ppl_ratio": q.ppl_ratio if q else None,
            **throughput(r.path),
        }
        print(name, rows[name], flush=True)
    write_result(args.out, "bench/quant_cpu.py", rows)


if __name__ == "__main__":
    main()
