"""`slimserve distill` mechanics on a tiny Llama that shares SmolLM2's tokenizer (CPU, seconds):
the KD loss, student kinds, checkpoints and resume, gradient accumulation, the tokens/s log,
and data parallelism over two processes through torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimserve.optimizers.models import resolve_source

# The optimizer child process, vLLM engines or training: minutes on CPU (not in `make test-fast`).
pytestmark = pytest.mark.heavy

# `slimserve distill` as two data-parallel processes (gloo on CPU).
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "slimserve.optimizers.training.distill")
FAST = ["--seq-len", "32", "--batch-size", "2", "--lr", "1e-3", "--text", "fortunes"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (2 layers, hidden 64)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base = resolve_source("default")
    tok = AutoTokenizer.from_pretrained(base)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "teacher"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cli(*args, runner=(sys.executable, "-m", "slimserve.serve.commands.cli")):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*runner, *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def report(out: Path) -> dict:
    return json.loads((out / "distill-report.json").read_text())


def test_kd_loss_is_ce_at_alpha_0_and_zero_kl_for_equal_logits():
    import torch

    from slimserve.optimizers.training.kd_trainer import kd_loss

    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    loss, ce, kl = kd_loss(logits, logits.clone(), ids, temperature=2.0, alpha=0.5)
    assert kl.item() == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(0.5 * ce.item())
    loss0, ce0, kl0 = kd_loss(logits, torch.randn(2, 5, 11), ids, temperature=2.0, alpha=0.0)
    assert kl0 is None and loss0.item() == pytest.approx(ce0.item())
    _, _, kl1 = kd_loss(logits, torch.randn(2, 5, 11), ids, temperature=2.0, alpha=1.0)
    assert kl1.item() > 0


def test_distill_checkpoints_and_resumes(teacher, tmp_path):
    out = tmp_path / "student"
    t0 = time.monotonic()
    r = cli("distill", "--teacher", str(teacher), "--student-config", '{"num_hidden_layers": 1}', "--out", str(out),
            "--steps", "4", "--save-steps", "2", "--eval-text", "pydoc", *FAST)
    wall_s = time.monotonic() - t0
    first = report(out)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    t = first["train"]
    assert t["steps_run"] == 4 and t["tokens"] == 4 * 2 * 32 and t["world_size"] == 1
    # Training is part of the command's run: its rate is at least the tokens over the whole run.
    assert t["tokens_per_s"] >= t["tokens"] / wall_s, (t["tokens_per_s"], wall_s)
    # The progress log carries loss, its KL and CE parts, and tokens/s.
    assert {"loss", "ce", "kl", "tokens_per_s"} <= set(t["history"][-1])
    assert "tokens_per_s" in r.stdout + r.stderr
    assert first["student_parameters"] < first["teacher_parameters"]
    assert math.isfinite(first["perplexity_after"]) and 0 <= first["agreement"]["top1_agreement"] <= 1

    # Resume: two more steps from checkpoint-4, not six from scratch.
    cli("distill", "--teacher", str(teacher), "--student-config", '{"num_hidden_layers": 1}', "--out", str(out),
        "--steps", "6", "--save-steps", "2", "--resume", *FAST)
    second = report(out)["train"]
    assert second["resumed_from"].endswith("checkpoint-4") and second["steps_run"] == 2
    assert (out / "checkpoints" / "checkpoint-6").exists()


def test_gradient_accumulation_bf16_and_a_pruned_student(teacher, tmp_path):
    out = tmp_path / "student"
    cli("distill", "--teacher", str(teacher), "--student-prune", '{"mlp_keep": 0.5, "mlp_multiple": 16}',
        "--out", str(out), "--steps", "2", "--grad-accum", "3", "--bf16", *FAST)
    t = report(out)["train"]
    assert t["bf16"] is True and t["tokens"] == 2 * 3 * 2 * 32
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 64


def test_student_from_a_checkpoint_trained_alone(teacher, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(teacher, init)
    out = tmp_path / "student"
    cli("distill", "--teacher", str(teacher), "--student", str(init), "--out", str(out), "--steps", "2", "--alpha", "0", *FAST)
    t = report(out)["train"]
    assert t["alpha"] == 0 and not any("kl" in h for h in t["history"])


def test_data_parallel_over_two_processes_with_torchrun(teacher, tmp_path):
    out = tmp_path / "student"
    # A pruned student: rank 0 prunes, the other rank waits for the finished folder.
    prune = '{"mlp_keep": 0.5, "mlp_multiple": 16, "calibration": {"samples": 4, "seq_len": 32}}'
    cli("--teacher", str(teacher), "--student-prune", prune, "--out", str(out), "--steps", "2", *FAST, runner=TORCHRUN)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 64
    t = report(out)["train"]
    assert t["world_size"] == 2 and t["tokens"] == 2 * 2 * 32 * 2  # each rank its own micro-batches


def test_gradual_pruning_during_distillation_over_two_processes(teacher, tmp_path):
    out = tmp_path / "student"
    # Both ranks must drop the same channels: their scores are summed before every prune.
    cli("--teacher", str(teacher), "--gradual-prune", '{"mlp_keep": 0.5, "mlp_multiple": 16, "end": 0.5}',
        "--out", str(out), "--steps", "6", *FAST, runner=TORCHRUN)
    r = report(out)
    assert r["gradual_prune"]["intermediate_size"] == [128, 64]
    kept = [k for _, k in r["gradual_prune"]["schedule"]]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 64 and len(kept) >= 2, r["gradual_prune"]
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 64
    assert r["student_parameters"] < r["teacher_parameters"]


def test_gradual_2_4_sparsity_during_distillation_over_two_processes(teacher, tmp_path):
    out = tmp_path / "student"
    # Both ranks must zero the same weights: their input statistics are summed before every prune.
    cli("--teacher", str(teacher), "--gradual-sparse", '{"pattern": "2:4", "end": 0.5}',
        "--out", str(out), "--steps", "6", *FAST, runner=TORCHRUN)
    r = report(out)["gradual_sparse"]
    shares = [share for _, share in r["schedule"]]
    assert shares == sorted(shares) and shares[-1] == 0.5 and len(shares) >= 2, r
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as st:
        w = st.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert ((w.view(-1, 4) == 0).sum(-1) == 2).all()  # saved as trained: exactly 2:4


@pytest.mark.parametrize("method", ["qat", "qlora"])
def test_distill_trains_through_the_quantizer_in_the_optimizer_environment(teacher, tmp_path, method):
    import importlib.util

    # The serving environment has neither torchao nor llm-compressor: the command hands itself to
    # the optimizer environment's Python (SLIMSERVE_OPTIMIZER_PYTHON / .venv-opt).
    assert importlib.util.find_spec("torchao") is None
    out = tmp_path / method
    options = {"bits": 4, "eval": {"text": "fortunes", "windows": 2, "seq_len": 32}, **({"rank": 4} if method == "qlora" else {})}
    cli("distill", "--teacher", str(teacher), f"--{method}", json.dumps(options), "--steps", "3", *FAST, "--out", str(out))
    rep = report(out)
    # The method's own defaults, with what the command line set on top.
    assert rep["method"] == method and rep["spec"]["train"]["steps"] == 3 and rep["spec"]["train"]["lr"] == 1e-3
    assert rep["spec"]["train"]["alpha"] == 1.0  # the method's default (KD only), not the distill flag's 0.5
    assert rep["report"]["training"]["steps_run"] == 3
    assert rep["report"]["export_matches_training"]["equal_share"] > 0.95, rep["report"]["export_matches_training"]
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (quant["quant_method"], weights["num_bits"]) == ("compressed-tensors", 4)
    if method == "qlora":
        assert rep["report"]["adapted_linears"] == 2 * 7
