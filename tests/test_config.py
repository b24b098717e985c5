"""`slimserve config validate`: every error, with its field path, and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from slimserve.serve.config.file import ConfigError, load_config


def validate(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "slimserve.yaml"
    path.write_text(textwrap.dedent(text))
    return subprocess.run(
        [sys.executable, "-m", "slimserve.serve.commands.cli", "config", "validate", str(path)],
        capture_output=True, text=True,
    )


def test_valid_config_passes(tmp_path):
    r = validate(tmp_path, """
        models:
          - name: smollm2
            variants:
              - {name: baseline, weight: 70}
              - {name: int8, weight: 30, optimization: w8a8, engine: {tensor_parallel_size: 2}}
    """)
    assert r.returncode == 0, r.stderr
    assert "smollm2/int8: w8a8, weight 30, tp 2" in r.stdout


def test_every_error_is_reported_with_its_path(tmp_path):
    r = validate(tmp_path, """
        cache_dir: /tmp/x
        colour: blue
        models:
          - name: smollm2
            variants:
              - {name: a, weight: -1}
              - {name: a, optimization: {method: gptq9}}
              - {name: b, optimization: {method: w8a8, bits: 3}}
              - {name: c, engine: {tensor_parallel_size: 0, flash: true}}
          - name: zero
            variants:
              - {name: z, weight: 0}
    """)
    assert r.returncode == 1
    err = r.stderr
    assert "colour: Extra inputs are not permitted" in err
    assert "models.0.variants.0.weight: Input should be greater than or equal to 0" in err
    assert "models.0.variants: duplicate variant names: ['a']" in err
    assert "models.0.variants.1.optimization: unknown optimization method 'gptq9'; available: " in err
    assert "w8a8" in err.split("'gptq9'; available: ")[1].splitlines()[0]
    assert "models.0.variants.2.optimization: bits: Extra inputs are not permitted" in err
    assert "models.0.variants.3.engine.tensor_parallel_size: Input should be greater than or equal to 1" in err
    assert "models.0.variants.3.engine.flash: Extra inputs are not permitted" in err
    assert "models.1.variants: all variant weights are 0" in err


def test_yaml_syntax_error(tmp_path):
    r = validate(tmp_path, "models: [\n")
    assert r.returncode == 1
    assert "(yaml)" in r.stderr


def test_missing_file_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "slimserve.serve.commands.cli", "config", "validate", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True,
    )
    assert r.returncode == 1 and "cannot read" in r.stderr


def test_engine_extra_cannot_override_the_model():
    with pytest.raises(ConfigError, match=r"models.0.engine.extra: .*'model'"):
        load_config({"models": [{"name": "m", "engine": {"extra": {"model": "x"}}, "variants": [{"name": "a"}]}]})


def test_variant_engine_overrides_merge_with_model_engine():
    cfg = load_config({
        "models": [{
            "name": "m",
            "engine": {"max_model_len": 1024, "dtype": "bfloat16"},
            "variants": [{"name": "a"}, {"name": "b", "engine": {"tensor_parallel_size": 2}}],
        }]
    })
    m = cfg.models[0]
    a, b = (m.engine_for(v) for v in m.variants)
    assert (a.tensor_parallel_size, a.max_model_len, a.dtype) == (1, 1024, "bfloat16")
    assert (b.tensor_parallel_size, b.max_model_len, b.dtype) == (2, 1024, "bfloat16")


def test_public_name_may_not_clash_with_a_variant_id():
    with pytest.raises(ConfigError, match="clash"):
        load_config({"models": [
            {"name": "m", "variants": [{"name": "a"}]},
            {"name": "m--a", "variants": [{"name": "b"}]},
        ]})


def test_shipped_configs_validate():
    from slimserve.serve.commands.demo import demo_config_path

    cfg = load_config(demo_config_path())
    assert [v.optimization.method for v in cfg.models[0].variants] == ["none", "w8a8"]


def test_a_ray_serve_config_is_validated_application_by_application(tmp_path):
    (tmp_path / "ref.yaml").write_text("models: [{name: m, variants: [{name: a, optimization: {method: gptq9}}]}]\n")
    r = validate(tmp_path, f"""
        http_options: {{host: 0.0.0.0, port: 8000}}
        applications:
          - name: llm
            route_prefix: /
            import_path: slimserve.serve.app:build_app
            args:
              colour: blue
              models:
                - name: smollm2
                  variants: [{{name: a, weight: -1}}]
          - name: by-path
            route_prefix: /p
            import_path: slimserve.serve.app:build_app
            args: {{config: {tmp_path / "ref.yaml"}}}
          - name: gone
            route_prefix: /g
            import_path: slimserve.serve.app:build_app
            args: {{config: {tmp_path / "missing.yaml"}}}
          - name: other
            route_prefix: /o
            import_path: somebody.else:app
    """)
    assert r.returncode == 1, r.stdout
    err = r.stderr
    assert "invalid Ray Serve config" in err
    assert "applications.0[llm].args.colour: Extra inputs are not permitted" in err
    assert "applications.0[llm].args.models.0.variants.0.weight: Input should be greater than or equal to 0" in err
    assert f"applications.1[by-path].args.config ({tmp_path / 'ref.yaml'}): models.0.variants.0.optimization: unknown optimization method 'gptq9'" in err
    assert f"applications.2[gone].args.config ({tmp_path / 'missing.yaml'}): cannot read: No such file or directory" in err
    assert "other" not in err  # not a slimserve application: not ours to check


def test_a_valid_ray_serve_config_passes_and_lists_its_slimserve_apps(tmp_path):
    r = validate(tmp_path, """
        applications:
          - name: llm
            route_prefix: /llm
            import_path: slimserve.serve.app:build_app
            runtime_env: {env_vars: {A: b}}
            args:
              models:
                - name: smollm2
                  variants: [{name: baseline}, {name: int8, optimization: w8a8}]
    """)
    assert r.returncode == 0, r.stderr
    assert "ok (Ray Serve config, 1 slimserve application(s))" in r.stdout
    assert "application llm at /llm: 1 model(s), 2 variant(s)" in r.stdout
    assert "smollm2/int8: w8a8" in r.stdout
    assert "applications.0[llm].runtime_env" in r.stdout  # what `slimserve run` leaves to `serve run`


def test_a_serve_config_without_a_slimserve_application_is_refused(tmp_path):
    r = validate(tmp_path, """
        applications:
          - {name: other, route_prefix: /, import_path: "somebody.else:app"}
    """)
    assert r.returncode == 1
    assert "no application has import_path slimserve.serve.app:build_app" in r.stderr


@pytest.mark.parametrize("key", ["load_format", "trust_remote_code"])
def test_engine_extra_cannot_undo_the_loading_safety(key):
    with pytest.raises(ConfigError) as e:
        load_config({"models": [{"name": "m", "engine": {"extra": {key: "pt" if key == "load_format" else True}},
                                 "variants": [{"name": "a"}]}]})
    assert any(line.startswith("models.0.engine.extra:") and key in line for line in e.value.lines), e.value.lines


def test_default_max_tokens_must_be_within_the_limit():
    with pytest.raises(ConfigError) as e:
        load_config({"models": [{"name": "m", "variants": [{"name": "a"}]}],
                     "ingress": {"limits": {"max_tokens": 100, "default_max_tokens": 500}}})
    assert any("ingress.limits" in line and "default_max_tokens 500" in line for line in e.value.lines), e.value.lines


def test_the_built_in_default_max_tokens_follows_a_lower_cap():
    config = load_config({"models": [{"name": "m", "variants": [{"name": "a"}]}],
                          "ingress": {"limits": {"max_tokens": 4}}})
    assert config.ingress.limits.default_max_tokens == 4


WEIGHTED_SERVE_CONFIG = """
    applications:
      - name: llm
        import_path: slimserve.serve.app:build_app
        args:
          models:
            - name: smollm2
              variants: [{{name: baseline}}, {{name: int8, optimization: w8a8}}]
        deployments:
          - {{name: SlimserveIngress, user_config: {{weights: {weights}}}}}
"""


def test_the_ingress_user_config_of_a_serve_config_sets_the_weights(tmp_path):
    from slimserve.serve.config.file import load_config_file

    path = tmp_path / "serve.yaml"
    text = WEIGHTED_SERVE_CONFIG.format(weights="{smollm2: {int8: 3}}")
    path.write_text(textwrap.dedent(text) + '      - {name: "SlimServer:smollm2--int8", num_replicas: 2}\n')
    loaded = load_config_file(path)
    assert {v.name: v.weight for v in loaded.apps[0].config.models[0].variants} == {"baseline": 1.0, "int8": 3.0}
    assert loaded.ignored == ["applications.0[llm].deployments.1"]  # `slimserve run` does not apply it


@pytest.mark.parametrize("weights, line", [
    ("{smollm2: {int9: 1}}", "applications.0[llm].deployments.0.user_config.weights.smollm2.int9: not a variant of smollm2 (has: baseline, int8)"),
    ("{gpt: {a: 1}}", "applications.0[llm].deployments.0.user_config.weights.gpt: not a model of this application (has: smollm2)"),
    ("{smollm2: {baseline: 0, int8: 0}}", "applications.0[llm].deployments.0.user_config.weights -> models.0.variants: all variant weights are 0"),
])
def test_bad_weights_in_the_ingress_user_config_are_named_by_path(tmp_path, weights, line):
    r = validate(tmp_path, WEIGHTED_SERVE_CONFIG.format(weights=weights))
    assert r.returncode == 1 and line in r.stderr, r.stderr


def test_ingress_replicas_reach_the_ingress_deployment(tmp_path):
    from slimserve.serve.app import build_app
    from slimserve.serve.rayllm import bound_deployment

    cfg = {"models": [{"name": "m", "source": "default", "variants": [{"name": "a"}]}], "ingress": {"replicas": 3}}
    assert bound_deployment(build_app(cfg)).num_replicas == 3
    r = validate(tmp_path, """
        ingress: {replicas: 0}
        models:
          - {name: m, variants: [{name: a}]}
    """)
    assert r.returncode != 0 and "ingress.replicas" in r.stderr, r.stderr
