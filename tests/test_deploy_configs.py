"""The files in deploy/: each Serve config is a valid Ray Serve config whose application is
slimserve's build_app with a valid slimserve config; the Prometheus config passes promtool."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys

import pytest
import yaml

from helm_chart import REPO
from slimserve.serve.config.file import load_config, load_config_file

DEPLOY = REPO / "deploy"
# Every top-level YAML file in deploy/ is a Serve config.
SERVE_CONFIGS = sorted(p.name for p in DEPLOY.glob("*.yaml"))


def test_serve_configs_present():
    assert {"demo.yaml", "gpu-gptq-tp2.yaml", "ab-three-variants.yaml"} <= set(SERVE_CONFIGS)


def _slimserve_config(name: str):
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load((DEPLOY / name).read_text())
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "slimserve.serve.app:build_app"
    args = app["args"]
    # build_app takes the config itself, or {config: PATH} (relative to where `serve run` runs: the repo root)
    return load_config(REPO / args["config"]) if set(args) == {"config"} else load_config(args)


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_valid(name):
    assert _slimserve_config(name).models


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_slimserve_cli_takes_the_serve_config(name):
    """`slimserve config validate` (and so `run`, `optimize`) reads the files `serve run` takes,
    from the same directory (`args: {config: PATH}` is relative to it)."""
    r = subprocess.run(
        [sys.executable, "-m", "slimserve.serve.commands.cli", "config", "validate", f"deploy/{name}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "ok (Ray Serve config, 1 slimserve application(s))" in r.stdout
    with contextlib.chdir(REPO):
        (app,) = load_config_file(DEPLOY / name).apps
    assert (app.name, app.route_prefix) == ("slimserve", "/")
    assert app.config == _slimserve_config(name)


def test_gpu_config_uses_gptq_with_tensor_parallel_2():
    (model,) = _slimserve_config("gpu-gptq-tp2.yaml").models
    assert model.engine.tensor_parallel_size == 2
    assert {v.optimization.method for v in model.variants} == {"none", "gptq"}


def test_ab_config_has_three_weighted_variants():
    (model,) = _slimserve_config("ab-three-variants.yaml").models
    assert len(model.variants) == 3 and all(v.weight > 0 for v in model.variants)


def test_prometheus_config_passes_promtool():
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    result = subprocess.run([exe, "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout  # slimserve-alerts.yml, through the symlink


def test_rollout_config_rolls_int8_out_against_bf16_with_the_agreement_floor():
    (model,) = _slimserve_config("rollout.yaml").models
    r = model.rollout
    assert (r.candidate, r.baseline or model.variants[0].name, r.steps) == ("int8", "bf16", [5, 25, 50, 100])
    assert r.guardrails.min_agreement == 0.8 and model.probe is not None and r.significance == 0.05
    assert r.sticky is False and r.inconclusive_after == 3  # the defaults, written out
