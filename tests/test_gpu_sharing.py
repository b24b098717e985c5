"""Several variants on one GPU: the `gpu_share` field, its validation, the shares slimserve picks
when none is set, the fit check against a cluster's GPUs, and what reaches Ray Serve LLM and
vLLM. No GPU here: the cluster's GPUs are given as numbers, and the engine side is Ray Serve
LLM's own config code (which turns a fractional bundle into vLLM's per-worker GPU request)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from slimserve.serve.app import gpu_plan, llm_config_for
from slimserve.serve.config.file import ConfigError, load_config
from slimserve.serve.engine.placement import EngineDemand, resolve_shares, unplaceable


def config(*variants, engine=None, replicas=1):
    return load_config({
        "models": [{
            "name": "m", "source": "default", "engine": engine or {}, "deployment": {"replicas": replicas},
            "variants": [{"name": f"v{i}", **v} for i, v in enumerate(variants)],
        }]
    })


def test_one_variant_takes_a_whole_gpu():
    assert gpu_plan(config({}), [1]) == ({"m/v0": 1.0}, [])


def test_an_ab_on_one_gpu_splits_it_without_extra_config():
    shares, problems = gpu_plan(config({}, {"optimization": "w8a8"}), [1])
    assert shares == {"m/v0": 0.5, "m/v1": 0.5} and problems == []


def test_engines_get_whole_gpus_when_there_are_enough():
    assert gpu_plan(config({}, {}, {}), [2, 2])[0] == {"m/v0": 1.0, "m/v1": 1.0, "m/v2": 1.0}


def test_three_variants_on_two_gpus_pack_two_per_gpu():
    shares, problems = gpu_plan(config({}, {}, {}), [2])
    assert set(shares.values()) == {0.5} and problems == []


def test_no_gpu_in_the_cluster_yet_means_whole_gpus():
    # An autoscaler adds GPU nodes later: Ray Serve LLM's own default (one GPU per rank).
    assert gpu_plan(config({}, {}), [])[0] == {"m/v0": 1.0, "m/v1": 1.0}


def test_explicit_shares_are_kept_and_auto_ones_split_what_is_left():
    shares = resolve_shares(
        [EngineDemand("a", 1, 0.5), EngineDemand("b", 1, None), EngineDemand("c", 1, None)], [1]
    )
    assert shares == {"a": 0.5, "b": 0.25, "c": 0.25}


def test_tensor_parallel_engines_take_whole_gpus_and_auto_ones_fill_the_rest():
    demands = [EngineDemand("tp2", 2, None), EngineDemand("x", 1, None), EngineDemand("y", 1, None)]
    shares = resolve_shares(demands, [3])
    assert shares == {"tp2": 1.0, "x": 0.5, "y": 0.5}
    assert unplaceable(demands, shares, [3]) == []


def test_shares_that_do_not_fit_are_reported_by_engine():
    shares, problems = gpu_plan(config({}, {}, {}, engine={"gpu_share": 0.5}), [1])
    assert shares == {"m/v0": 0.5, "m/v1": 0.5, "m/v2": 0.5}
    assert problems == ["m/v2: needs 0.5 of a GPU; the cluster's nodes have 1 GPU(s), taken by the engines before it"]


def test_a_tensor_parallel_group_never_spans_nodes():
    demands = [EngineDemand("tp2", 2, None)]
    assert unplaceable(demands, resolve_shares(demands, [1, 1]), [1, 1]) == [
        "tp2: needs 2 whole GPU(s) on one node; the cluster's nodes have 1 GPU(s), 1 GPU(s), taken by the engines before it"
    ]


def test_replicas_count_as_engines():
    shares, problems = gpu_plan(config({}, replicas=3), [2])
    assert shares == {"m/v0": 0.5} and problems == []


def test_too_many_auto_engines_for_the_gpus_left_is_an_error():
    with pytest.raises(ValueError, match="too little to hold a model"):
        resolve_shares([EngineDemand("a", 1, 0.99)] + [EngineDemand(f"x{i}", 1, None) for i in range(3)], [1])


def test_gpu_share_reaches_ray_serve_llm_and_vllm():
    cfg = config({}, {"optimization": "w8a8"})
    model = cfg.models[0]
    llm = llm_config_for(cfg, model, model.variants[1], "gpu", gpu_share=0.5)
    assert llm.placement_group_config == {"bundles": [{"GPU": 0.5}], "strategy": "STRICT_PACK"}
    assert llm.engine_kwargs["gpu_memory_utilization"] == 0.45  # vLLM's 0.9 headroom, halved
    engine = llm.get_engine_config()  # Ray Serve LLM's own translation
    assert engine.get_runtime_env_with_local_env_vars()["env_vars"]["VLLM_RAY_PER_WORKER_GPUS"] == "0.5"
    assert engine.placement_bundles == [{"GPU": 0.5}]


def test_w4a16_engines_on_gpus_use_marlin_unless_the_user_says_otherwise():
    """vLLM picks Machete for compressed-tensors W4A16 on Hopper; Marlin measured faster
    (docs/BENCHMARKS.md): every weight-only 4-bit method turns Machete off on GPU hosts only."""
    for method in ("rtn", "gptq", "qat", "qlora"):
        cfg = config({}, {"optimization": {"method": method, "bits": 4}})
        model = cfg.models[0]
        env = llm_config_for(cfg, model, model.variants[1], "gpu", gpu_share=0.5).runtime_env["env_vars"]
        assert env["VLLM_DISABLED_KERNELS"] == "MacheteLinearKernel", method
        assert "VLLM_DISABLED_KERNELS" not in llm_config_for(cfg, model, model.variants[1], "cpu").runtime_env["env_vars"]
        assert "VLLM_DISABLED_KERNELS" not in llm_config_for(cfg, model, model.variants[0], "gpu").runtime_env["env_vars"]
    for other in ({"method": "rtn", "bits": 8}, "w8a8", "fp8"):
        cfg = config({}, {"optimization": other})
        env = llm_config_for(cfg, cfg.models[0], cfg.models[0].variants[1], "gpu").runtime_env["env_vars"]
        assert "VLLM_DISABLED_KERNELS" not in env, other
    cfg = load_config({"models": [{"name": "m", "deployment": {"env": {"VLLM_DISABLED_KERNELS": ""}},
                                   "variants": [{"name": "q", "optimization": {"method": "rtn", "bits": 4}}]}]})
    env = llm_config_for(cfg, cfg.models[0], cfg.models[0].variants[0], "gpu").runtime_env["env_vars"]
    assert env["VLLM_DISABLED_KERNELS"] == ""  # the operator's choice stays


def test_a_memory_share_set_by_the_user_is_kept():
    cfg = config({"engine": {"gpu_share": 0.5, "extra": {"gpu_memory_utilization": 0.3}}})
    model = cfg.models[0]
    assert llm_config_for(cfg, model, model.variants[0], "gpu", gpu_share=0.5).engine_kwargs["gpu_memory_utilization"] == 0.3


def test_stream_batching_interval_reaches_ray_serve_llm():
    cfg = config({}, {"engine": {}})
    model = cfg.models[0]
    assert llm_config_for(cfg, model, model.variants[0], "cpu").experimental_configs == {"stream_batching_interval_ms": 50}
    cfg = load_config({"models": [{"name": "m", "deployment": {"stream_batching_interval_ms": 0}, "variants": [{"name": "a"}]}]})
    assert llm_config_for(cfg, cfg.models[0], cfg.models[0].variants[0], "cpu").experimental_configs == {"stream_batching_interval_ms": 0}


@pytest.mark.parametrize(
    "engine, variant_engine, error",
    [
        ({"gpu_share": 0}, {}, "models.0.engine.gpu_share: Input should be greater than 0"),
        ({"gpu_share": 1.5}, {}, "models.0.engine.gpu_share: Input should be less than or equal to 1"),
        ({"gpu_share": 0.5, "tensor_parallel_size": 2}, {}, "the ranks of a tensor-parallel engine need whole GPUs"),
        # the model's TP with the variant's share: reported at the variant
        ({"tensor_parallel_size": 2}, {"gpu_share": 0.5}, "models.0: variants.0.engine (merged with the model's engine): gpu_share 0.5"),
        ({"gpu_share": 0.5, "extra": {"gpu_memory_utilization": 0.9}}, {}, "extra.gpu_memory_utilization 0.9 is more than gpu_share 0.5"),
    ],
)
def test_bad_gpu_shares_fail_validation_with_the_field_path(engine, variant_engine, error):
    with pytest.raises(ConfigError) as e:
        load_config({"models": [{"name": "m", "engine": engine, "variants": [{"name": "a", "engine": variant_engine}]}]})
    assert any(error in line for line in e.value.lines), e.value.lines


def test_config_validate_shows_the_gpu_share(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""
        models:
          - name: m
            variants:
              - {name: a}
              - {name: b, engine: {gpu_share: 0.4}}
    """))
    r = subprocess.run([sys.executable, "-m", "slimserve.serve.commands.cli", "config", "validate", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "m/a: none, weight 1, tp 1, gpu_share auto" in r.stdout
    assert "m/b: none, weight 1, tp 1, gpu_share 0.4" in r.stdout


@pytest.mark.standalone
def test_slimserve_run_refuses_variants_that_cannot_fit(tmp_path):
    """A real local Ray cluster; the GPU is what cannot exist here, so the host is declared a GPU
    host (SLIMSERVE_ACCELERATOR=gpu) and Ray is told the machine has one GPU (RAY_OVERRIDE_RESOURCES)."""
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""
        models:
          - name: m
            engine: {gpu_share: 0.6}
            variants: [{name: a}, {name: b}]
    """))
    env = {**os.environ, "SLIMSERVE_ACCELERATOR": "gpu", "RAY_OVERRIDE_RESOURCES": '{"GPU": 1}'}
    from conftest import free_port

    r = subprocess.run([sys.executable, "-m", "slimserve.serve.commands.cli", "run", str(path), "--port", str(free_port()),
                        "--metrics-port", str(free_port())],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the variants do not fit this machine's GPUs" in r.stderr
    assert "m/b: needs 0.6 of a GPU" in r.stderr
