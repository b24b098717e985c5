"""Each quantization method on SmolLM2: the checkpoint it writes, what vLLM CPU does with it,
its size, and its perplexity against the base (bounds documented in docs/OPTIMIZATIONS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors import safe_open

from slimserve.optimizers.pipeline import optimize
from slimserve.optimizers.quality import QualityGateFailed

SMALL_CALIBRATION = {"samples": 32, "seq_len": 256}
# Perplexity ratio (variant / base) on the held-out text that each method must stay under.
BOUNDS = {"w8a8": 1.10, "rtn8": 1.05, "rtn4": 1.60, "gptq": 1.35, "fp8": 1.10}
SPECS = {
    "gptq": {"method": "gptq", "calibration": SMALL_CALIBRATION},
    "rtn8": {"method": "rtn", "bits": 8},
    "rtn4": {"method": "rtn", "bits": 4},
    "fp8": {"method": "fp8"},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("quant-cache")
    return {name: optimize("default", spec, cache) for name, spec in SPECS.items()}


def vllm_generate(checkpoint: Path) -> subprocess.CompletedProcess:
    """Load a checkpoint in vLLM CPU (a fresh process, as the engine would) and generate greedily."""
    code = textwrap.dedent(f"""
        import json, os
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM, SamplingParams
        llm = LLM({str(checkpoint)!r}, enforce_eager=True, max_model_len=512)
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=12, temperature=0))
        print("RESULT " + json.dumps({{"text": out[0].outputs[0].text,
              "quantization": llm.llm_engine.vllm_config.model_config.quantization}}))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def result_of(proc) -> dict:
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[7:])


@pytest.mark.parametrize("name", ["gptq", "rtn8", "rtn4"])
def test_weight_only_checkpoints_run_in_vllm_cpu(built, name):
    proc = vllm_generate(built[name].path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(proc)
    assert result["quantization"] == "compressed-tensors"
    assert "Paris" in result["text"] or result["text"].strip(), result


def test_fp8_is_refused_by_vllm_cpu_but_runs_in_transformers(built):
    # vLLM CPU has no FP8 kernels (documented); the checkpoint is still valid and generates.
    proc = vllm_generate(built["fp8"].path)
    assert proc.returncode != 0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built["fp8"].path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip()


def linear_bytes(checkpoint: Path) -> int:
    """Bytes of every tensor belonging to the decoder layers' Linear modules."""
    total = 0
    for f in checkpoint.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if ".layers." in k and ("_proj." in k):
                    t = st.get_tensor(k)
                    total += t.numel() * t.element_size()
    return total


def test_gptq_w4a16_group_size_and_size(built):
    r = built["gptq"]
    report = r.manifest["report"]
    # SmolLM2's hidden size 576 is not divisible by 128: the largest dividing group is used, and said.
    assert report["group_size_requested"] == 128 and report["group_size"] == 64
    qc = json.loads((r.path / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert linear_bytes(r.path) <= 0.35 * linear_bytes(r.base)


@pytest.mark.parametrize("name", list(SPECS))
def test_perplexity_ratio_within_documented_bound(built, name):
    q = built[name].manifest["report"]["quality"]
    assert q["base_perplexity"] > 1
    assert 0.9 < q["ppl_ratio"] <= BOUNDS[name], q


def test_gptq_beats_rtn_at_4_bits(built):
    gptq = built["gptq"].manifest["report"]["quality"]["ppl_ratio"]
    rtn = built["rtn4"].manifest["report"]["quality"]["ppl_ratio"]
    assert gptq < rtn, (gptq, rtn)


def test_quality_gate_fails_startup_or_serves_base(built, tmp_path):
    cache = built["rtn4"].path.parent
    ratio = built["rtn4"].manifest["report"]["quality"]["ppl_ratio"]
    strict = {"max_ppl_ratio": ratio * 0.99}
    with pytest.raises(QualityGateFailed, match=r"ratio .* > max_ppl_ratio"):
        optimize("default", SPECS["rtn4"], cache, strict)
    fallback = optimize("default", SPECS["rtn4"], cache, {**strict, "on_quality_fail": "serve_base"})
    assert fallback.cache_hit is True  # the gate reads the stored ratio: no rebuild, no re-measure
    assert fallback.path == fallback.base and fallback.manifest["quality_gate"] == "failed: serving base"
    lenient = optimize("default", SPECS["rtn4"], cache, {"max_ppl_ratio": ratio * 1.01})
    assert lenient.path == built["rtn4"].path
