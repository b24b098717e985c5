"""The optimizer environment's Python never sees the API or admin keys: neither the build child
nor the library-version probe that `optimize` runs before it (both run third-party code)."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from slimserve.optimizers.build import pipeline
from slimserve.serve.app import llm_config_for
from slimserve.serve.config.file import load_config

CLIENT_ENV, ADMIN_ENV = "TEST_CHILD_ENV_CLIENT_KEYS", "TEST_CHILD_ENV_ADMIN_KEYS"


@pytest.fixture
def secret_env(tmp_path, monkeypatch):
    """The variables the replica withholds, as the app derives them from a config that names its
    own key variables; all of them set, with slimserve's default ones, plus one ordinary variable."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    cfg = load_config({"cache_dir": str(tmp_path / "cache"),
                       "ingress": {"api_keys_env": CLIENT_ENV, "admin_keys_env": ADMIN_ENV},
                       "models": [{"name": "m", "source": str(base), "variants": [{"name": "v"}]}]})
    withheld = llm_config_for(cfg, cfg.models[0], cfg.models[0].variants[0], "cpu") \
        .callback_config.callback_kwargs["secret_env"]
    assert sorted(withheld) == sorted([CLIENT_ENV, ADMIN_ENV])
    for name in (CLIENT_ENV, ADMIN_ENV, *pipeline.SECRET_ENV_DEFAULTS):
        monkeypatch.setenv(name, f"sk-{name.lower()}")
    monkeypatch.setenv("TEST_CHILD_ENV_ORDINARY", "kept")
    return withheld


SECRETS = (CLIENT_ENV, ADMIN_ENV, *pipeline.SECRET_ENV_DEFAULTS)


def test_child_environment_drops_the_configured_and_default_key_variables(secret_env):
    env = pipeline.child_environment(secret_env)
    assert [n for n in SECRETS if n in env] == []
    assert env["TEST_CHILD_ENV_ORDINARY"] == "kept"  # the rest of the environment is passed on
    assert env["HF_HUB_OFFLINE"] == "1"


def _env_recording_python(tmp_path):
    """A Python for the optimizer environment that records, on each call, which of the watched
    variables it was given; answers the version probe (`-c`), fails anything else (the build)."""
    record = tmp_path / "seen.jsonl"
    script = tmp_path / "python"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
watched = {list(SECRETS) + ["TEST_CHILD_ENV_ORDINARY"]!r}
with open({str(record)!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:3], "env": {{n: os.environ.get(n) for n in watched}}}}) + "\\n")
if sys.argv[1] == "-c":
    print(json.dumps({{n: "0.0" for n in sys.argv[3:]}}))
    sys.exit(0)
sys.exit(3)
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, record


def test_library_versions_runs_with_the_withheld_environment(secret_env, tmp_path):
    python, record = _env_recording_python(tmp_path)
    assert pipeline._library_versions(str(python), ("torch",), secret_env) == {"torch": "0.0"}
    [seen] = [json.loads(line) for line in record.read_text().splitlines()]
    assert seen["env"] == {**{n: None for n in SECRETS}, "TEST_CHILD_ENV_ORDINARY": "kept"}


def test_optimize_withholds_the_keys_from_every_optimizer_process(secret_env, tmp_path, monkeypatch):
    """Through `optimize` as the replica calls it: the version probe and the build child."""
    python, record = _env_recording_python(tmp_path)
    monkeypatch.setenv("SLIMSERVE_OPTIMIZER_PYTHON", str(python))
    with pytest.raises(pipeline.OptimizationFailed):  # the stand-in Python fails the build itself
        pipeline.optimize(str(tmp_path / "base"), {"method": "rtn"}, tmp_path / "cache", {"measure": False},
                          build_timeout_s=60, withhold_env=secret_env)
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert [s["argv"][0] for s in seen][:2] == ["-c", "-m"]  # the probe, then the build child
    for s in seen:
        assert s["env"] == {**{n: None for n in SECRETS}, "TEST_CHILD_ENV_ORDINARY": "kept"}, s["argv"]
    assert os.environ[CLIENT_ENV]  # this process keeps its keys
