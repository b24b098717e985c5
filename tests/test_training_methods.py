"""The methods that train (issue 16) on SmolLM2, CPU-sized: quantization-aware training,
quantized fine-tuning (QLoRA), gradual pruning and gradual 2:4 sparsity. Each ends in a checkpoint: what it is, that training did what it promises, that
the quality gate judges it, and that vLLM CPU serves it."""

from __future__ import annotations

import json

import pytest
from builds import build_each
from vllm_checkpoints import assert_serves_the_judged_model, vllm_load_each

from slimserve.optimizers.build.pipeline import QualityGateFailed, optimize

# Training, the optimizer child process and a vLLM engine: minutes on CPU (not in `make test-fast`).
pytestmark = pytest.mark.heavy

STEPS = 8  # a CPU-sized run (8 steps of 4 x 64 tokens: ~40 s per method on one core)
HELD_OUT = {"held_out": {"text": "fortunes", "windows": 4, "seq_len": 128}}
QAT = {
    "method": "qat", "bits": 4,
    # KD from the unquantized model only, 4 x 64 tokens a step.
    "train": {"steps": STEPS, "seq_len": 64, "batch_size": 4, "lr": 2e-5, "alpha": 1.0, "temperature": 1.0},
    "eval": {"text": "fortunes", "windows": 4, "seq_len": 128},
}
GRADUAL = {
    "method": "gradual_prune", "mlp_keep": 0.5, "start": 0.0, "end": 0.75, "every": 1,
    "train": {"steps": STEPS, "seq_len": 64, "batch_size": 4, "lr": 3e-4, "alpha": 0.5, "temperature": 2.0},
    "eval": {"text": "fortunes", "windows": 4, "seq_len": 128},
}
QLORA = {
    "method": "qlora", "bits": 4, "rank": 8,
    "train": {"steps": STEPS, "seq_len": 64, "batch_size": 4, "lr": 1e-3, "alpha": 1.0, "temperature": 1.0},
    "eval": {"text": "fortunes", "windows": 4, "seq_len": 128},
}
GRADUAL_24 = {
    "method": "gradual_sparse", "pattern": "2:4", "start": 0.0, "end": 0.75, "every": 1,
    "train": {"steps": STEPS, "seq_len": 64, "batch_size": 4, "lr": 3e-4, "alpha": 0.5, "temperature": 2.0},
    "eval": {"text": "fortunes", "windows": 4, "seq_len": 128},
}
SPECS = {"qat": QAT, "gradual": GRADUAL, "qlora": QLORA, "gradual24": GRADUAL_24}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("training-cache")


@pytest.fixture(scope="module")
def built(cache):
    return build_each(SPECS, cache, HELD_OUT)


def test_qat_trains_through_the_quantizer_and_exports_what_it_trained(built):
    qat = built["qat"]
    report = qat.manifest.report
    assert report.scheme == "W4A16" and report.group_size == 64  # SmolLM2's 576 takes 64
    assert report.training["steps_run"] == STEPS and report.training["tokens"] == STEPS * 4 * 64
    # Before training the fake-quantized model is what round-to-nearest gives; training lowers it.
    assert report.perplexity_fake_quant_after < report.perplexity_fake_quant_before, report
    # The exported int4 weights are the ones training saw through torchao's fake quantizer.
    assert report.export_matches_training["layers"] == 30 * 7
    assert report.export_matches_training["equal_share"] > 0.95, report.export_matches_training
    quant = json.loads((qat.path / "config.json").read_text())["quantization_config"]
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (quant["quant_method"], weights["num_bits"], weights["group_size"], weights["symmetric"]) == (
        "compressed-tensors", 4, 64, True)


def test_gradual_pruning_follows_its_schedule_to_a_smaller_dense_model(built):
    report = built["gradual"].manifest.report
    assert report.intermediate_size == [1536, 768]
    kept = [k for _, k in report.schedule]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 768 and len(kept) >= 5, report.schedule
    assert report.schedule[-1][0] <= 0.75 * STEPS  # the last quarter trains the final shape
    # Cutting out the masked channels changes nothing the model computes.
    assert report.perplexity_after == pytest.approx(report.perplexity_masked_before_cut, rel=1e-3)
    assert report.parameters[1] < 0.75 * report.parameters[0]
    config = json.loads((built["gradual"].path / "config.json").read_text())
    assert (config["intermediate_size"], config["num_hidden_layers"]) == (768, 30)


def test_qlora_trains_adapters_through_the_quantizer_and_serves_them_merged(built):
    qlora = built["qlora"]
    report = qlora.manifest.report
    assert report.scheme == "W4A16" and report.group_size == 64
    assert report.adapted_linears == 30 * 7  # every decoder projection; lm_head left alone
    config = json.loads((qlora.path / "config.json").read_text())
    # rank x (in + out) for each of the 7 adapted Linears of a layer, and nothing else trains.
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    per_layer = 2 * (h + h) + 2 * (h + kv) + 3 * (h + i)
    assert report.adapter_parameters == 8 * per_layer * config["num_hidden_layers"]
    assert report.training["steps_run"] == STEPS
    # Before training the model is round-to-nearest's (B = 0); the adapters, seen through the
    # quantizer, lower its perplexity.
    assert report.perplexity_fake_quant_after < report.perplexity_fake_quant_before, report
    # Served merged: what training fake-quantized is what was exported, no adapter weights left.
    assert report.export_matches_training["layers"] == 30 * 7
    assert report.export_matches_training["equal_share"] > 0.95, report.export_matches_training
    quant = config["quantization_config"]
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (quant["quant_method"], weights["num_bits"], weights["group_size"]) == ("compressed-tensors", 4, 64)
    from safetensors import safe_open

    names = [k for f in qlora.path.glob("*.safetensors") for k in safe_open(f, "pt").keys()]
    assert names and not [k for k in names if "lora" in k or "original" in k], names[:5]


def test_gradual_sparsity_grows_to_2_4_and_saves_it_dense(built):
    r = built["gradual24"]
    report = r.manifest.report
    shares = [share for _, share in report.schedule]
    assert shares == sorted(shares) and shares[-1] == 0.5 and len(shares) >= 5, report.schedule
    assert report.schedule[-1][0] <= 0.75 * STEPS  # the last quarter trains the final mask
    # As saved: half of every decoder projection zero, exactly the 2:4 pattern, dense on disk.
    assert report.weight_sparsity == pytest.approx(0.5, abs=1e-3) and report.is_2_4 is True
    assert report.dense_on_disk is True and report.serving_effect.startswith("none:")
    assert report.training["steps_run"] == STEPS
    from safetensors import safe_open

    with safe_open(str(next(r.path.glob("*.safetensors"))), "pt") as st:
        w = st.get_tensor("model.layers.7.mlp.up_proj.weight")
    assert ((w.view(-1, 4) == 0).sum(-1) == 2).all()


@pytest.mark.parametrize("name", list(SPECS))
def test_the_quality_gate_judges_each_checkpoint(built, cache, name):
    ratio = built[name].manifest.report.quality.ppl_ratio
    assert ratio > 1.0, ratio
    again = optimize("default", SPECS[name], cache, {**HELD_OUT, "max_ppl_ratio": ratio * 1.01})
    assert again.cache_hit and again.path == built[name].path
    with pytest.raises(QualityGateFailed, match=r"ratio .* > max_ppl_ratio"):
        optimize("default", SPECS[name], cache, {**HELD_OUT, "max_ppl_ratio": ratio * 0.99})


def test_vllm_cpu_serves_each_checkpoint(built, tmp_path):
    results = vllm_load_each([built[name].path for name in SPECS], tmp_path, held_out=HELD_OUT["held_out"])
    assert results[1]["intermediate_size"] == 768
    assert all(r["text"].strip() for r in results), results
    for name, result in zip(SPECS, results):
        assert_serves_the_judged_model(result, built[name].manifest.report.quality)
