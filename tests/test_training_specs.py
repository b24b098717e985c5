"""The training methods' recipes (issue 16) as a user writes them: validation by field path, the
defaults, and the gradual pruning schedule itself (no training here: fast)."""

from __future__ import annotations

import pytest

from slimserve.optimizers.registry import methods, parse
from slimserve.serve.config.file import ConfigError, load_config


def test_the_training_methods_are_in_the_registry():
    assert {"qat", "gradual_prune", "qlora", "gradual_sparse"} <= set(methods())
    qat = parse("qat")
    assert (qat.bits, qat.group_size, qat.train.alpha) == (4, 128, 1.0)  # KD only: no labels needed
    assert parse("gradual_prune").needs_optimizer_env is False


@pytest.mark.parametrize("optimization, path", [
    ({"method": "qat", "bits": 3}, "optimization: bits: Input should be 4 or 8"),
    ({"method": "qat", "train": {"steps": 0}}, "optimization: train.steps: Input should be greater than or equal to 1"),
    ({"method": "qlora", "rank": 0}, "optimization: rank: Input should be greater than or equal to 1"),
    ({"method": "qlora", "target_modules": []}, "optimization: target_modules: Tuple should have at least 1 item"),
    ({"method": "gradual_prune", "mlp_keep": 1.0}, "optimization: mlp_keep: Input should be less than 1"),
    ({"method": "gradual_prune", "start": 0.8, "end": 0.5}, "optimization: start (0.8) must be before end (0.5)"),
    ({"method": "gradual_sparse", "pattern": "4:2"}, "optimization: pattern: pattern must be `unstructured` or `N:M`"),
    ({"method": "gradual_sparse", "pattern": "2:4", "sparsity": 0.7}, "optimization: pattern 2:4 zeroes 2/4 of the weights: set sparsity 0.5"),
])
def test_bad_recipes_are_named_by_path(tmp_path, optimization, path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models: [{{name: m, variants: [{{name: a, optimization: {optimization}}}]}}]\n".replace("'", '"'))
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert f"models.0.variants.0.{path}" in str(e.value), str(e.value)


def test_the_gradual_schedule_is_cubic_and_ends_at_the_final_width():
    spec = parse({"method": "gradual_prune", "mlp_keep": 0.5, "start": 0.1, "end": 0.6, "train": {"steps": 100}})
    kept = [spec.kept_at(step, 1536) for step in range(1, 101)]
    assert kept[:10] == [1536] * 10  # before `start`
    assert kept[59:] == [768] * 41  # from `end` on: the final width
    assert kept == sorted(kept, reverse=True)
    # Cubic: half of the channels to remove are gone after a fifth of the pruning span.
    removed_at = lambda step: 1536 - spec.kept_at(step, 1536)  # noqa: E731
    assert removed_at(20) > 0.45 * 768 and removed_at(35) > 0.85 * 768
    assert parse({"method": "gradual_prune", "mlp_keep": 0.3, "mlp_multiple": 64}).final_width(1536) == 448


def test_the_gradual_sparsity_schedule_is_cubic_and_ends_at_the_final_share():
    spec = parse({"method": "gradual_sparse", "pattern": "2:4", "start": 0.1, "end": 0.6, "train": {"steps": 100}})
    share = [spec.sparsity_at(step) for step in range(1, 101)]
    assert share[:10] == [0.0] * 10 and share[59:] == [0.5] * 41
    assert share == sorted(share)
    assert share[20] - share[10] > share[50] - share[40]  # fast at first, slow near the end


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64))


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_weight_masks_grow_monotonically_to_the_pattern(pattern):
    import torch

    from slimserve.optimizers.training.gradual_sparse import WeightMasks

    model = tiny_llama().train()
    masks = WeightMasks(model, pattern)
    model(torch.randint(0, 256, (2, 16)))  # the hooks gather input statistics while training
    masks.prune_to(0.25)
    first = {n: z.clone() for n, z in masks.zeroed.items()}
    masks.prune_to(0.5)
    for name, linear in masks.linears.items():
        w = linear.weight
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3), name
        assert (masks.zeroed[name] >= first[name]).all(), name  # what was zero stays zero
        if pattern == "2:4":
            assert ((w.view(-1, 4) == 0).sum(-1) == 2).all(), name  # exactly 2 zeros in every group of 4
            assert ((first[name].view(-1, 4)).sum(-1) <= 2).all(), name  # halfway: never more than N per group
    # An optimizer step moves pruned weights; apply() takes them back to zero.
    for linear in masks.linears.values():
        linear.weight.data += 0.01
    masks.apply()
    assert all((l.weight[masks.zeroed[n]] == 0).all() for n, l in masks.linears.items())
    masks.remove_hooks()
