"""The training methods against the one-shot methods they would replace, one run per comparison,
same model, same held-out text, same training budget (issue 16):

  4-bit weights: `rtn` vs `gptq` vs `qat` vs `qlora` (W4A16, the same group size);
  50 % of the MLP: `structured` + KD healing vs `gradual_prune` (the same steps, text and KD);
  2:4 sparsity: one-shot Wanda vs one-shot + healing vs `gradual_sparse` (the same training).

Every variant is built through slimserve's pipeline (the artifact cache, the quality gate's
held-out perplexity), so the numbers are the ones a variant's manifest shows when served.

    .venv/bin/python bench/training_methods.py [--source default] [--steps 40] [--seq-len 128] \\
        [--batch-size 4] [--held-out fortunes] [--windows 16] [--out docs/results/training_methods_cpu.json]

On CPU (SmolLM2-135M) measure on a quiet machine only; on a GPU pass `--source` a checkpoint
folder and larger budgets."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from slimserve.optimizers.models import slimserve_home
from slimserve.optimizers.build.pipeline import optimize
from slimserve.optimizers.report import size_on_disk


def variants(a: argparse.Namespace) -> dict[str, dict]:
    train = {"steps": a.steps, "seq_len": a.seq_len, "batch_size": a.batch_size, "text": a.text}
    calibration = {"text": a.text, "samples": a.calibration_samples, "seq_len": a.seq_len}
    return {
        "rtn-w4a16": {"method": "rtn", "bits": 4},
        "gptq-w4a16": {"method": "gptq", "bits": 4, "calibration": calibration},
        "qat-w4a16": {"method": "qat", "bits": 4, "train": {**train, "lr": a.qat_lr, "alpha": 1.0, "temperature": 1.0}},
        "qlora-w4a16": {"method": "qlora", "bits": 4, "rank": a.qlora_rank,
                        "train": {**train, "lr": a.qlora_lr, "alpha": 1.0, "temperature": 1.0}},
        "structured-mlp50-healed": {"method": "structured", "mlp_keep": 0.5, "calibration": calibration,
                                    "heal": {**train, "lr": a.prune_lr, "alpha": 0.5, "temperature": 2.0}},
        "gradual-mlp50": {"method": "gradual_prune", "mlp_keep": 0.5,
                          "train": {**train, "lr": a.prune_lr, "alpha": 0.5, "temperature": 2.0}},
        # 2:4: one-shot Wanda (no training), the same 2:4 cut after the first step and then trained
        # (one-shot + healing at the same budget), and the cut grown on the cubic schedule.
        "wanda-2:4": {"method": "sparse", "algorithm": "wanda", "pattern": "2:4", "calibration": calibration},
        "oneshot-2:4-healed": {"method": "gradual_sparse", "pattern": "2:4", "end": 1 / a.steps,
                               "train": {**train, "lr": a.prune_lr, "alpha": 0.5, "temperature": 2.0}},
        "gradual-2:4": {"method": "gradual_sparse", "pattern": "2:4",
                        "train": {**train, "lr": a.prune_lr, "alpha": 0.5, "temperature": 2.0}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="default")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--text", default="pydoc", help="training / calibration text")
    ap.add_argument("--calibration-samples", type=int, default=64)
    ap.add_argument("--qat-lr", type=float, default=2e-5)
    ap.add_argument("--qlora-lr", type=float, default=1e-3)
    ap.add_argument("--qlora-rank", type=int, default=16)
    ap.add_argument("--prune-lr", type=float, default=3e-4)
    ap.add_argument("--held-out", default="fortunes")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--cache", default=str(slimserve_home() / "artifacts"))
    ap.add_argument("--out", default="docs/results/training_methods_cpu.json")
    ap.add_argument("--only", help="comma-separated variant names (default: all)")
    a = ap.parse_args()
    gate = {"held_out": {"text": a.held_out, "windows": a.windows, "seq_len": 256}}
    rows = {}
    only = set(a.only.split(",")) if a.only else None
    for name, spec in variants(a).items():
        if only and name not in only:
            continue
        t0 = time.monotonic()
        r = optimize(a.source, spec, a.cache, gate)
        q = r.manifest.report.quality if r.manifest else None
        facts = r.manifest.report.model_extra if r.manifest else {}  # the method's own facts
        rows[name] = {
            "spec": spec, "cache_hit": r.cache_hit, "seconds": round(time.monotonic() - t0, 1),
            "ppl": q.perplexity if q else None, "ppl_ratio": q.ppl_ratio if q else None,
            "size_vs_base": round(size_on_disk(r.path) / size_on_disk(r.base), 3),
            **{k: facts[k] for k in ("parameters", "perplexity_fake_quant_before", "perplexity_fake_quant_after",
                                      "export_matches_training", "intermediate_size", "adapter_parameters",
                                      "weight_sparsity", "is_2_4") if k in facts},
        }
        print(f"{name:26s} ppl ratio {rows[name]['ppl_ratio']}  size {rows[name]['size_vs_base']}x  "
              f"{rows[name]['seconds']} s", flush=True)
        # Written after every variant: a run cut short (a GPU lease's limit) keeps what it measured.
        result = {"machine": platform.node(), "processor": platform.processor(), "device": _device(),
                  "date": time.strftime("%Y-%m-%d"), "source": a.source, "held_out": gate["held_out"],
                  "args": vars(a), "variants": rows}
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
