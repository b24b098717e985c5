"""Pruning on SmolLM2 with vLLM CPU: what each pruning variant buys in serving, against bf16 in
the same run. Checkpoint size, parameters, perplexity ratio (fortunes, 16 x 256 tokens) and
generation throughput at batch 1 and 8 (engine bound to core 0, eager, greedy, 128 tokens).

    .venv/bin/python bench/prune_cpu.py [--cache DIR] [--out docs/results/prune_cpu.json] [--repeat 2]

Expect: 2:4 / unstructured variants run at the base's speed and size (saved dense, no sparse
kernels); structured variants are smaller dense models and faster. Measure on a quiet machine
only (another busy process on the 2 cores slows a vLLM CPU engine 20-30x). Every checkpoint is
built before the first engine is timed; the variants are timed in turn, `--repeat` rounds, so
that drift of the machine shows up as spread rather than as a difference between variants."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quant_cpu import throughput, write_result  # noqa: E402  (same engine script and binding as the quantization bench)

from slimserve.optimizers.models import slimserve_home
from slimserve.optimizers.build.pipeline import optimize
from slimserve.optimizers.report import size_on_disk

VARIANTS = {
    "bf16": "none",
    "sparsegpt-2:4": {"method": "sparse", "algorithm": "sparsegpt", "pattern": "2:4"},
    "wanda-2:4": {"method": "sparse", "algorithm": "wanda", "pattern": "2:4"},
    "structured-mlp50": {"method": "structured", "mlp_keep": 0.5},
    "structured-mlp50-healed": {"method": "structured", "mlp_keep": 0.5,
                                "heal": {"steps": 100, "seq_len": 256, "batch_size": 4, "lr": 2e-4}},
    "depth-70-healed": {"method": "structured", "layers_keep": 0.7,
                        "heal": {"steps": 100, "seq_len": 256, "batch_size": 4, "lr": 2e-4}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=str(slimserve_home() / "artifacts"))
    ap.add_argument("--out", default="docs/results/prune_cpu.json")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    built = {name: optimize("default", spec, args.cache) for name, spec in VARIANTS.items()}
    base_size = size_on_disk(built["bf16"].base)
    rows = {}
    for name, r in built.items():
        report = r.manifest.report if r.manifest else None
        facts, q = (report.model_extra, report.quality) if report else ({}, None)  # the method's own facts; the gate's
        rows[name] = {
            "method": r.method,
            "optimize_seconds": report.optimize_seconds if report else None,
            "size_mb": round(size_on_disk(r.path) / 1e6, 1),
            "size_vs_bf16": round(size_on_disk(r.path) / base_size, 3),
            "parameters": facts.get("parameters"),
            "weight_sparsity": facts.get("weight_sparsity"),
            "healing": {k: facts["healing"][k] for k in ("perplexity_before", "perplexity_after", "steps", "seconds")}
            if facts.get("healing") else None,
            "ppl": q.perplexity if q else None,
            "ppl_ratio": q.ppl_ratio if q else None,
            "runs": [],
        }
    for _ in range(args.repeat):
        for name, r in built.items():
            rows[name]["runs"].append(throughput(r.path))
            print(name, rows[name]["runs"][-1], flush=True)
    for row in rows.values():
        for key in ("batch1_tok_s", "batch8_tok_s"):
            vals = [run[key] for run in row["runs"] if key in run]
            row[key] = round(sum(vals) / len(vals), 1) if vals else None
    write_result(args.out, "bench/prune_cpu.py", rows)


if __name__ == "__main__":
    main()
