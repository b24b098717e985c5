"""Each quantization method on SmolLM2: the checkpoint it writes, what vLLM CPU does with it,
its size, and its perplexity against the base (bounds documented in docs/OPTIMIZATIONS.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors import safe_open

from slimserve.optimizers.pipeline import optimize
from slimserve.optimizers.quality import QualityGateFailed

# The optimizer child process, vLLM engines or training: minutes on CPU (not in `make test-fast`).
pytestmark = pytest.mark.heavy

SMALL_CALIBRATION = {"samples": 32, "seq_len": 256}
# Perplexity ratio (variant / base) that each method must stay under, on held-out Python docs:
# the same domain as the calibration text (the start of the same docs) but text it never saw.
# Out of domain (the default held-out text, fortunes) GPTQ loses to RTN on SmolLM2: see
# docs/OPTIMIZATIONS.md, "GPTQ vs RTN".
BOUNDS = {"rtn8": 1.02, "rtn4": 1.60, "gptq": 1.40, "fp8": 1.06, "w8a8sq": 1.10}
SPECS = {
    "gptq": {"method": "gptq", "calibration": SMALL_CALIBRATION},
    "rtn8": {"method": "rtn", "bits": 8},
    "rtn4": {"method": "rtn", "bits": 4},
    "fp8": {"method": "fp8"},
    "w8a8sq": {"method": "w8a8", "smoothquant": 0.8, "calibration": SMALL_CALIBRATION},
}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> dict:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    path = tmp_path_factory.mktemp("text") / "pydoc-tail.txt"
    path.write_text(text[350_000:])  # calibration reads from the start: ~65k characters here
    return {"held_out": {"text": str(path), "windows": 16, "seq_len": 256}}


@pytest.fixture(scope="module")
def built(tmp_path_factory, held_out):
    cache = tmp_path_factory.mktemp("quant-cache")
    return {name: optimize("default", spec, cache, held_out) for name, spec in SPECS.items()}


PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def plausible_first_tokens() -> set[int]:
    """The base model's 5 likeliest next tokens after PROMPT: a quantized variant that still
    works starts its answer with one of them (any non-empty text would not say that)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimserve.optimizers.models import resolve_source

    base = resolve_source("default")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        logits = model(tok(PROMPT, return_tensors="pt").input_ids).logits[0, -1]
    return set(logits.topk(5).indices.tolist())


def first_token(text: str) -> int:
    from transformers import AutoTokenizer

    from slimserve.optimizers.models import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("default"))(text, add_special_tokens=False).input_ids[0]


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
    # Own process group: on a timeout the engine's child processes are killed too, not orphaned.
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def result_of(proc) -> dict:
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[7:])


@pytest.mark.parametrize("name", ["gptq", "rtn4", "w8a8sq"])
def test_checkpoints_run_in_vllm_cpu(built, name, plausible_first_tokens):
    proc = vllm_generate(built[name].path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(proc)
    assert result["quantization"] == "compressed-tensors"
    assert first_token(result["text"]) in plausible_first_tokens, result


@pytest.mark.parametrize("name", ["fp8", "rtn8"])
def test_formats_vllm_cpu_cannot_run_are_valid_checkpoints(built, name, plausible_first_tokens):
    # vLLM CPU has no FP8 kernels (its engine hangs on such a checkpoint: seen here) and its
    # WNA16 kernels take grouped 4-bit weights only (int8 fails with "Failed to find a kernel").
    # The on-load hook refuses these methods on CPU hosts; the checkpoints run in transformers.
    from slimserve.optimizers.registry import parse
    from slimserve.serve.onload import check_runs_on

    spec = parse(SPECS[name])
    with pytest.raises(ValueError, match="smollm2/v: vLLM's CPU build has no kernels for"):
        check_runs_on(spec, "cpu", "smollm2/v")
    check_runs_on(spec, "gpu", "smollm2/v")  # fine on a GPU host
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built[name].path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out[0, ids.shape[1]].item() in plausible_first_tokens, tok.decode(out[0, ids.shape[1]:])


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


def test_quality_gate_fails_startup_or_serves_base(built, held_out):
    cache = built["rtn4"].path.parent
    ratio = built["rtn4"].manifest["report"]["quality"]["ppl_ratio"]
    strict = {**held_out, "max_ppl_ratio": ratio * 0.99}
    with pytest.raises(QualityGateFailed, match=r"ratio .* > max_ppl_ratio"):
        optimize("default", SPECS["rtn4"], cache, strict)
    fallback = optimize("default", SPECS["rtn4"], cache, {**strict, "on_quality_fail": "serve_base"})
    assert fallback.cache_hit is True  # the gate reads the stored ratio: no rebuild, no re-measure
    assert fallback.path == fallback.base and fallback.manifest["quality_gate"] == "failed: serving base"
    lenient = optimize("default", SPECS["rtn4"], cache, {**held_out, "max_ppl_ratio": ratio * 1.01})
    assert lenient.path == built["rtn4"].path


def test_already_quantized_inputs_are_served_as_is(built, tmp_path):
    from autogptq_format import to_autogptq

    ct = built["gptq"].path  # compressed-tensors, as llm-compressor writes it
    autogptq = to_autogptq(ct, tmp_path / "autogptq")  # GPTQ format, as AutoGPTQ/GPTQModel write it
    for source, method in ((ct, "compressed-tensors"), (autogptq, "gptq")):
        r = optimize(str(source), "none", tmp_path / "cache")
        assert r.path == source.resolve() and r.cache_hit is None  # no re-quantization
        with pytest.raises(ValueError, match=f"already quantized \\(quant_method '{method}'\\)"):
            optimize(str(source), "w8a8", tmp_path / "cache")
    proc = vllm_generate(autogptq)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(proc)
    assert "gptq" in result["quantization"] and result["text"].strip()  # vLLM names it auto_gptq
    # Same weights, other layout: greedy output matches the compressed-tensors checkpoint's.
    assert result["text"] == result_of(vllm_generate(ct))["text"]
