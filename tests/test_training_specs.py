"""The training methods' recipes (issue 16) as a user writes them: validation by field path, the
defaults, and the gradual pruning schedule itself (no training here: fast)."""

from __future__ import annotations

import pytest

from slimserve.optimizers.registry import methods, parse
from slimserve.serve.config_file import ConfigError, load_config


def test_the_training_methods_are_in_the_registry():
    assert {"qat", "gradual_prune", "qlora"} <= set(methods())
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
