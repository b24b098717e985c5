"""GPU numbers for `slimserve distill` (issue #4), run on a lent H100 (see docs/BENCHMARKS.md).

1. A teacher: a ~50M Llama trained here from scratch (bf16 autocast) on the Python standard
   library's source, every 20th file held out (the recipe of bench/gpu_quant.py).
2. Throughput of `slimserve distill` (the same entry point, `slimserve.optimizers.training.distill.main`)
   on a 50%-MLP / 50%-depth pruned student: fp32 (no autocast), bf16 autocast, bf16 autocast
   with 4-step gradient accumulation. Same micro-batch, same steps.
3. Quality: the pruned student distilled from the teacher (alpha 0.5, T 2) against the same
   student trained alone on hard labels (alpha 0) for the same steps and data; and the same pair
   for a randomly initialised smaller config (half the layers). Perplexity on the held-out files.

    PYTHONPATH=... python bench/gpu_distill.py TOKENIZER_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slimserve.optimizers.training import distill as D
from slimserve.optimizers.quality import HeldOut, perplexity

WORK = Path("/tmp/slimserve-distill")
SMOKE = bool(int(__import__("os").environ.get("SMOKE", "0")))  # a few steps of everything, to check the script


def train_teacher(tokenizer, text: str, steps: int, seq: int = 512, batch: int = 32) -> tuple[Path, dict]:
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=1024,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = (len(ids) - 1) // seq
    windows = ids[: n * seq].view(n, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    t0 = time.monotonic()
    for step in range(steps):
        x = windows[torch.randint(0, n, (batch,))].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    secs = time.monotonic() - t0
    path = WORK / "teacher"
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, {"parameters": sum(p.numel() for p in model.parameters()), "steps": steps,
                  "tokens": steps * batch * seq, "seconds": round(secs, 1), "final_loss": round(loss.item(), 3)}


def run(name: str, *args: str) -> dict:
    out = WORK / name
    t0 = time.monotonic()
    D.main([*args, "--out", str(out)])
    rep = json.loads((out / "distill-report.json").read_text())
    rep["wall_seconds"] = round(time.monotonic() - t0, 1)
    rep["train"].pop("history", None)
    print(name, json.dumps(rep["train"]), flush=True)
    torch.cuda.empty_cache()
    return rep


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
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d")}
    import transformers

    results["transformers"] = transformers.__version__
    teacher, info = train_teacher(tokenizer, train_text, steps=60 if SMOKE else int(sys.argv[3]) if len(sys.argv) > 3 else 600)
    results["teacher"] = info
    held = HeldOut(text=str(WORK / "heldout.txt"), windows=64, seq_len=512)
    results["teacher"]["perplexity"] = round(perplexity(teacher, held), 3)
    print(json.dumps(results), flush=True)

    common = ["--teacher", str(teacher), "--text", str(WORK / "train.txt"), "--seq-len", "512"]
    prune = ["--student-prune", '{"mlp_keep": 0.5, "layers_keep": 0.5, "calibration": {"text": "%s", "samples": 64, "seq_len": 512}}' % (WORK / "train.txt")]

    # Throughput: same student, micro-batch 16 x 512, 100 optimizer steps each.
    tp = {}
    for name, extra in {"fp32": ["--no-bf16"], "bf16": ["--bf16"], "bf16_accum4": ["--bf16", "--grad-accum", "4"]}.items():
        rep = run(f"tp-{name}", *common, *prune, "--steps", "10" if SMOKE else "100", "--batch-size", "16", *extra)
        tp[name] = {k: rep["train"][k] for k in ("tokens", "seconds", "tokens_per_s", "tokens_per_s_steady", "bf16", "train_loss")}
        tp[name]["grad_accum"] = 4 if "accum" in name else 1
    results["throughput"] = tp

    # Quality: distilled vs alone, same init, same steps and data order (seed).
    steps, q = ("10" if SMOKE else "600"), {}
    ev = ["--eval-text", str(WORK / "heldout.txt")]
    for student, init in {"pruned": prune, "small_config": ["--student-config", '{"num_hidden_layers": 4}']}.items():
        for mode, alpha in {"distilled": "0.5", "alone": "0"}.items():
            rep = run(f"q-{student}-{mode}", *common, *init, *ev, "--steps", steps, "--batch-size", "16",
                      "--lr", "1e-3", "--bf16", "--alpha", alpha, "--temperature", "2")
            q[f"{student}_{mode}"] = {
                "perplexity_before": rep.get("perplexity_before"), "perplexity_after": rep["perplexity_after"],
                "teacher_perplexity": rep["teacher_perplexity"], "agreement": rep["agreement"],
                "student_parameters": rep["student_parameters"], "tokens": rep["train"]["tokens"],
                "tokens_per_s": rep["train"]["tokens_per_s"], "alpha": float(alpha),
            }
            Path(out_json).write_text(json.dumps({**results, "quality": q}, indent=1))
    results["quality"] = q
    results["quality_steps"] = int(steps)
    Path(out_json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
