"""Issue 16's tables on a lent GPU: the training methods against the one-shot ones on a trained
model, one run per comparison.

1. The teacher of bench/gpu_distill.py: a ~50M Llama trained from scratch here (bf16 autocast)
   on the Python standard library's source, every 20th file held out.
2. bench/training_methods.py against it, through slimserve's pipeline (artifact cache, quality
   gate): `rtn` / `gptq` / `qat` / `qlora` at W4A16 (group 128), and `structured` + KD healing
   vs `gradual_prune` at 50 % of the MLP, with the same steps, text and KD for the trained ones;
   held-out perplexity on the held-out files.

    python3 bench/gpu_training_methods.py TOKENIZER_DIR OUT_DIR [TEACHER_STEPS] [METHOD_STEPS] [ONLY]

ONLY: comma-separated variant names of bench/training_methods.py (default: all).

Each finished variant is in OUT_DIR/training_methods_gpu.json as soon as it is measured; a second
call reuses the teacher and the artifact cache (a run cut by the lease's time limit continues)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gpu_distill  # noqa: E402  (its teacher recipe and work folder)

WORK = gpu_distill.WORK


def texts() -> tuple[Path, Path]:
    train, held = WORK / "train.txt", WORK / "heldout.txt"
    if not held.exists():
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
        files = [f for f in files if "test" not in f.parts and f.stat().st_size < 400_000]
        read = lambda fs: "\n\n".join(f.read_text(errors="replace") for f in fs)  # noqa: E731
        WORK.mkdir(parents=True, exist_ok=True)
        train.write_text(read([f for i, f in enumerate(files) if i % 20])[:24_000_000])
        held.write_text(read(files[::20]))
    return train, held


def main(tokenizer_dir: str, out_dir: str, teacher_steps: int = 600, method_steps: int = 200, only: str | None = None) -> None:
    from transformers import AutoTokenizer

    out = Path(out_dir)
    train, held = texts()
    teacher = WORK / "teacher"
    info_file = WORK / "teacher.json"
    if not (teacher / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        _, info = gpu_distill.train_teacher(tokenizer, train.read_text(), steps=teacher_steps)
        info_file.write_text(json.dumps(info))
        print("teacher", info, flush=True)
    (out / "teacher.json").write_text(info_file.read_text())
    cmd = [sys.executable, str(Path(__file__).parent / "training_methods.py"), "--source", str(teacher),
           "--text", str(train), "--held-out", str(held), "--windows", "64", "--steps", str(method_steps),
           "--seq-len", "512", "--batch-size", "16", "--calibration-samples", "128",
           "--cache", str(WORK / "methods-cache"), "--out", str(out / "training_methods_gpu.json"),
           *(["--only", only] if only else [])]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.monotonic()
    rc = subprocess.call(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"training_methods.py exited {rc} after {time.monotonic() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5]), *sys.argv[5:6])
