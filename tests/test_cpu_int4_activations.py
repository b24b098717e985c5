"""4-bit checkpoints on a CPU host are served as the quality gate measured them: vLLM CPU on
AMX machines otherwise quantizes their activations to int8 too (VLLM_CPU_INT4_W4A8, on by
default), which costs perplexity the gate never saw (tests/test_quantization.py measures the
served perplexity; docs/BENCHMARKS.md has both settings side by side)."""

from __future__ import annotations

from slimserve.serve.app import llm_config_for
from slimserve.serve.config.file import load_config

CONFIG = {"models": [{"name": "m", "variants": [
    {"name": "gptq", "optimization": {"method": "gptq"}},
    {"name": "fast", "optimization": {"method": "rtn", "bits": 4}, "engine": {"cpu_int4_activations": "int8"}},
]}]}


def engine_env(variant: int, accel: str) -> dict[str, str]:
    cfg = load_config(CONFIG)
    model = cfg.models[0]
    return llm_config_for(cfg, model, model.variants[variant], accel).runtime_env["env_vars"]


def test_a_cpu_engine_computes_4_bit_checkpoints_in_bf16_unless_the_variant_opts_in():
    assert engine_env(0, "cpu")["VLLM_CPU_INT4_W4A8"] == "0"
    assert engine_env(1, "cpu")["VLLM_CPU_INT4_W4A8"] == "1"  # the operator's choice, per variant
    assert "VLLM_CPU_INT4_W4A8" not in engine_env(0, "gpu")  # a CPU-build setting only


def test_deployment_env_still_has_the_last_word():
    # `deployment.env` is the documented escape hatch for any vLLM variable.
    cfg = load_config({"models": [{"name": "m", "deployment": {"env": {"VLLM_CPU_INT4_W4A8": "1"}},
                                   "variants": [{"name": "a"}]}]})
    env = llm_config_for(cfg, cfg.models[0], cfg.models[0].variants[0], "cpu").runtime_env["env_vars"]
    assert env["VLLM_CPU_INT4_W4A8"] == "1"
