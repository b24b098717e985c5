"""4-bit checkpoints on vLLM CPU with bf16 activations (slimserve's default) vs int8 activations
(vLLM's default on AMX CPUs, VLLM_CPU_INT4_W4A8=1): perplexity as the engine computes it, on the
quality gate's own held-out windows, and generation throughput at batch 1 and 8; bf16 baseline
in the same run.

    .venv/bin/python bench/cpu_int4_activations.py [--cache DIR] [--out docs/results/cpu_int4_activations.json]

Measure on a quiet machine: each engine runs alone, bound to core 0."""

from __future__ import annotations

import argparse

from quant_cpu import throughput, write_result  # the same engine script, binding and prompts

from slimserve.optimizers.models import slimserve_home
from slimserve.optimizers.build.pipeline import optimize

CHECKPOINTS = {"bf16": "none", "gptq-w4-g64": {"method": "gptq"}, "rtn-w4-g64": {"method": "rtn", "bits": 4}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=str(slimserve_home() / "artifacts"))
    ap.add_argument("--out", default="docs/results/cpu_int4_activations.json")
    args = ap.parse_args()
    # Build everything first, so that no optimization runs while an engine is timed.
    built = {name: optimize("default", spec, args.cache) for name, spec in CHECKPOINTS.items()}
    quality = built["gptq-w4-g64"].manifest.report.quality
    rows = {}
    for name, r in built.items():
        gate = r.manifest.report.quality.perplexity if r.manifest and r.manifest.report.quality else quality.base_perplexity
        for int8 in (False, True) if name != "bf16" else (False,):
            measured = throughput(r.path, "int8" if int8 else "bfloat16", quality.held_out.model_dump())
            if "error" in measured:
                raise RuntimeError(f"{name}: {measured['error']}")
            row = {"gate_perplexity_transformers": gate, **measured}
            row["ppl_ratio_vs_bf16_gate"] = round(row["perplexity"] / quality.base_perplexity, 4)
            rows[f"{name} {'int8' if int8 else 'bf16'} activations"] = row
            print(name, int8, row, flush=True)
    write_result(args.out, "bench/cpu_int4_activations.py", rows)


if __name__ == "__main__":
    main()
