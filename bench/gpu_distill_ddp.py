"""Data-parallel `slimserve distill` over several GPUs (torchrun + DDP through transformers'
Trainer): tokens/s on 1 and on N GPUs of one host, same per-GPU micro-batch and steps.

    PYTHONPATH=... python bench/gpu_distill_ddp.py TOKENIZER_DIR OUT_JSON [N]

The teacher is bench/gpu_distill.py's 50M Llama, trained briefly (throughput does not depend on
how well it was trained); the student is its 50%-MLP / 50%-depth pruned copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
import gpu_distill as G  # noqa: E402


def main(tokenizer_dir: str, out_json: str, gpus: int) -> None:
    G.WORK.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    files = [f for f in files if "test" not in f.parts and f.stat().st_size < 400_000]
    text = "\n\n".join(f.read_text(errors="replace") for f in files)[:24_000_000]
    (G.WORK / "train.txt").write_text(text)
    teacher, info = G.train_teacher(tokenizer, text, steps=200)
    results = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "teacher": info, "runs": {}}
    prune = '{"mlp_keep": 0.5, "layers_keep": 0.5, "calibration": {"samples": 16, "seq_len": 512}}'
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}  # no NVLink multicast on lent machines
    for n in sorted({1, gpus}):
        out = G.WORK / f"ddp{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "slimserve.optimizers.training.distill", "--teacher", str(teacher), "--student-prune", prune,
               "--text", str(G.WORK / "train.txt"), "--seq-len", "512", "--batch-size", "16", "--steps", "150",
               "--bf16", "--out", str(out)]
        t0 = time.monotonic()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            results["runs"][f"gpus{n}"] = {"error": r.stderr[-3000:]}
            print(r.stderr[-3000:], flush=True)
            continue
        train = json.loads((out / "distill-report.json").read_text())["train"]
        train.pop("history", None)
        results["runs"][f"gpus{n}"] = {**train, "wall_seconds": round(time.monotonic() - t0, 1)}
        print(n, json.dumps(results["runs"][f"gpus{n}"]), flush=True)
    Path(out_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else torch.cuda.device_count())
