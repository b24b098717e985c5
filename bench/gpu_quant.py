"""GPU numbers for the quantization issue, run on a lent H100 (see docs/BENCHMARKS.md).

1. GPTQ W4A16 (group 128, 128 x 512 calibration tokens) on a randomly initialised 1.1B
   Llama (TinyLlama's shape): wall time and peak GPU memory of slimserve's `gptq` method.
2. A small Llama trained here from scratch (EPOCHS passes, default 1) on the Python standard
   library's source (every 20th file held out), then RTN and GPTQ at 4 and 8 bits, group 128:
   perplexity on the held-out files.

Usage (on the GPU machine, with llm-compressor importable and slimserve on PYTHONPATH):
    python bench/gpu_quant.py TOKENIZER_DIR OUT_JSON [EPOCHS]
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slimserve.optimizers.calibration import Calibration
from slimserve.optimizers.methods.gptq import GPTQ
from slimserve.optimizers.quality import HeldOut, perplexity
from slimserve.optimizers.methods.rtn import RTN

WORK = Path("/tmp/slimserve-gpu")


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def timed_run(spec, base: Path, out: Path) -> dict:
    torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    report = spec.run(base, out)
    return {**report, "seconds": round(time.monotonic() - t0, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def gptq_1b(tokenizer, calib: Calibration) -> dict:
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    base = save(model, tokenizer, WORK / "random-1b")
    del model
    result = timed_run(GPTQ(group_size=128, calibration=calib), base, WORK / "random-1b-gptq")
    return {"parameters": params, **result}


def train_small(tokenizer, train_ids: torch.Tensor, steps: int, seq: int = 512, batch: int = 32) -> tuple[Path, dict]:
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=seq,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    n = (len(train_ids) - 1) // seq
    windows = train_ids[: n * seq].view(n, seq)
    t0 = time.monotonic()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,))
        x = windows[idx].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step} loss {loss.item():.3f}", flush=True)
    secs = time.monotonic() - t0
    model = model.to(torch.bfloat16).eval()
    path = save(model, tokenizer, WORK / "small-trained")
    return path, {"parameters": sum(p.numel() for p in model.parameters()), "steps": steps,
                  "tokens": steps * batch * seq, "train_seconds": round(secs, 1), "final_loss": round(loss.item(), 3)}


def main(tokenizer_dir: str, out_json: str) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    files = [f for f in files if "test" not in f.parts and f.stat().st_size < 400_000]
    read = lambda fs: "\n\n".join(f.read_text(errors="replace") for f in fs)  # noqa: E731
    train_text = read([f for i, f in enumerate(files) if i % 20])[:24_000_000]
    (WORK / "train.txt").write_text(train_text)
    (WORK / "heldout.txt").write_text(read(files[::20]))
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    calib_1b = Calibration(text=str(WORK / "train.txt"), samples=128, seq_len=512)
    results["gptq_1b"] = gptq_1b(tokenizer, calib_1b)
    print(json.dumps(results, indent=1), flush=True)
    shutil.rmtree(WORK / "random-1b", ignore_errors=True)

    train_ids = tokenizer(train_text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    epochs = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    steps = int(epochs * len(train_ids) / (32 * 512))
    small, train_info = train_small(tokenizer, train_ids, steps=steps)
    results["small_model"] = {**train_info, "train_tokens_available": len(train_ids)}
    held_out = HeldOut(text=str(WORK / "heldout.txt"), windows=64, seq_len=512)
    rows = {"bf16": perplexity(small, held_out)}
    calib = Calibration(text=str(WORK / "train.txt"), samples=128, seq_len=512)
    for name, spec in {
        "rtn_w4_g128": RTN(bits=4, group_size=128),
        "gptq_w4_g128": GPTQ(group_size=128, calibration=calib),
        "rtn_w4_channel": RTN(bits=4, group_size=None),
        "gptq_w4_channel": GPTQ(group_size=None, calibration=calib),
        "rtn_w8_g128": RTN(bits=8, group_size=128),
        "gptq_w8_g128": GPTQ(bits=8, group_size=128, calibration=calib),
    }.items():
        info = timed_run(spec, small, WORK / name)
        rows[name] = perplexity(WORK / name, held_out)
        results.setdefault("quant_runs", {})[name] = info
    results["perplexity_heldout"] = {k: round(v, 3) for k, v in rows.items()}
    results["ppl_ratio"] = {k: round(v / rows["bf16"], 4) for k, v in rows.items()}
    print(json.dumps(results, indent=1), flush=True)
    Path(out_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
