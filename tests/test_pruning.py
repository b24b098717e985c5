"""Pruning on SmolLM2, for real: llm-compressor's Wanda and SparseGPT (2:4 and unstructured),
magnitude, structured width and depth pruning with KD healing. Checks what each checkpoint is
(sparsity, pattern, sizes), what it costs in perplexity, that healing helps, and that vLLM CPU
loads and runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from slimserve.optimizers.registry import parse
from slimserve.optimizers.report import size_on_disk
from builds import build_each
from vllm_checkpoints import assert_serves_the_judged_model, vllm_load_each

# The optimizer child process, vLLM engines or training: minutes on CPU (not in `make test-fast`).
pytestmark = pytest.mark.heavy

TINY_CALIBRATION = {"samples": 8, "seq_len": 128}
HELD_OUT = {"held_out": {"text": "fortunes", "windows": 4, "seq_len": 128}}
SPECS = {
    "magnitude-2:4": {"method": "sparse", "algorithm": "magnitude", "pattern": "2:4"},
    "wanda-50": {"method": "sparse", "algorithm": "wanda", "pattern": "unstructured", "calibration": TINY_CALIBRATION},
    "sparsegpt-2:4": {"method": "sparse", "algorithm": "sparsegpt", "calibration": TINY_CALIBRATION},
    "mlp50": {"method": "structured", "mlp_keep": 0.5, "calibration": TINY_CALIBRATION},
    # Depth and width together, then 4 KD steps from the unpruned model (a CPU-sized budget).
    "depth-healed": {
        "method": "structured", "layers_keep": 0.8, "mlp_keep": 0.75, "calibration": TINY_CALIBRATION,
        "heal": {"steps": 4, "seq_len": 128, "batch_size": 4, "lr": 3e-4, "temperature": 2.0, "alpha": 0.5},
        "heal_eval": {"text": "fortunes", "windows": 4, "seq_len": 128},
    },
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("prune-cache")
    return build_each(SPECS, cache, HELD_OUT)


def test_bad_patterns_are_config_errors():
    with pytest.raises(ValueError, match="set sparsity 0.5"):
        parse({"method": "sparse", "pattern": "2:4", "sparsity": 0.7})
    with pytest.raises(ValueError, match="N:M"):
        parse({"method": "sparse", "pattern": "4:2"})
    parse({"method": "sparse", "pattern": "unstructured", "sparsity": 0.7})


def linear_weights(checkpoint: Path) -> dict:
    out = {}
    for f in checkpoint.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys() if ".layers." in k and k.endswith("_proj.weight")})
    return out


@pytest.mark.parametrize("name", ["magnitude-2:4", "wanda-50", "sparsegpt-2:4"])
def test_sparse_checkpoints_are_sparse_dense_and_say_they_buy_nothing(built, name):
    r = built[name]
    report = r.manifest.report
    assert report.weight_sparsity == pytest.approx(0.5, abs=0.01)
    weights = linear_weights(r.path)
    w = weights["model.layers.3.mlp.down_proj.weight"]
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    if name.endswith("2:4"):
        assert report.is_2_4 is True
        assert ((w.view(-1, 4) == 0).sum(-1) >= 2).all()  # at least 2 zeros in every group of 4
    else:
        assert report.is_2_4 is False
    # Saved dense: same size as the base, and the manifest says what it buys in serving: nothing.
    assert size_on_disk(r.path) == pytest.approx(size_on_disk(r.base), rel=0.01)
    assert report.dense_on_disk is True and report.serving_effect.startswith("none:")
    assert 1.0 < report.quality.ppl_ratio < 50  # lossy, but not destroyed


def test_calibrated_pruning_beats_magnitude_at_2_4(built):
    ratio = lambda n: built[n].manifest.report.quality.ppl_ratio  # noqa: E731
    assert ratio("sparsegpt-2:4") < ratio("magnitude-2:4"), (ratio("sparsegpt-2:4"), ratio("magnitude-2:4"))


def mlp_params(weights: dict) -> int:
    return sum(t.numel() for k, t in weights.items() if ".mlp." in k)


def test_half_the_mlp_is_half_the_mlp_parameters_and_bytes(built):
    r = built["mlp50"]
    base_w, pruned_w = linear_weights(r.base), linear_weights(r.path)
    assert mlp_params(pruned_w) * 2 == mlp_params(base_w)
    assert r.manifest.report.intermediate_size == [1536, 768]
    # The checkpoint shrinks by exactly the removed MLP weights (bf16: 2 bytes each).
    removed = (mlp_params(base_w) - mlp_params(pruned_w)) * 2
    assert size_on_disk(r.base) - size_on_disk(r.path) == pytest.approx(removed, rel=0.005)
    # Attention is untouched.
    assert {k: v.shape for k, v in pruned_w.items() if "self_attn" in k} == {k: v.shape for k, v in base_w.items() if "self_attn" in k}


def test_depth_pruning_drops_the_least_influential_layers(built):
    r = built["depth-healed"]
    report = r.manifest.report
    assert report.layers == [30, 24] and len(report.dropped_layers) == 6
    assert 0 not in report.dropped_layers  # the first layer changes its input most
    cfg = json.loads((r.path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 24 and cfg["intermediate_size"] == 1152
    assert not any(".layers.24." in k for k in linear_weights(r.path))


def test_healing_lowers_perplexity_against_the_unhealed_model(built):
    healing = built["depth-healed"].manifest.report.healing
    assert healing["steps_run"] == 4 and healing["tokens"] == 4 * 4 * 128
    assert healing["perplexity_after"] < 0.9 * healing["perplexity_before"], healing


def test_vllm_cpu_loads_and_generates_from_pruned_checkpoints(built, tmp_path):
    # A sparse (dense-saved) and a depth+width-pruned healed model.
    names = ["sparsegpt-2:4", "depth-healed"]
    results = vllm_load_each([built[n].path for n in names], tmp_path, held_out=HELD_OUT["held_out"])
    assert (results[0]["layers"], results[0]["intermediate_size"]) == (30, 1536)
    assert (results[1]["layers"], results[1]["intermediate_size"]) == (24, 1152)
    assert all(r["text"].strip() for r in results), results
    for name, result in zip(names, results):
        assert_serves_the_judged_model(result, built[name].manifest.report.quality)
