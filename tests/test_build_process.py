"""The optimizer's child process, for real (a stand-in worker script, real processes): a bounded
build that stops the child and everything it started, a failure that says why (its last lines of
output), the timeout from the config to optimize(); the quality gate's config check; and the
dtype scoring loads checkpoints in."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import process_alive as alive

from slimserve.optimizers.build import pipeline
from slimserve.optimizers.cache.store import ArtifactCache
from slimserve.optimizers.build.pipeline import OptimizationFailed, OptimizationTimedOut, optimize
from slimserve.serve.config.file import ConfigError, load_config
from slimserve.serve.handoff import OnLoadSpec

SPEC = {"method": "structured", "mlp_keep": 0.5}  # runs in this environment's Python: no optimizer env needed
NO_QUALITY = {"measure": False}

# A stand-in for the worker: 50 lines on stderr (one a progress bar redrawn with \r), a grandchild
# in its process group, then it hangs (ignoring SIGTERM) or fails.
FAKE_WORKER = """
import signal, subprocess, sys, time
mode, pid_file = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(pid_file, "w").write(str(grandchild.pid))
for i in range(1, 51):
    print(f"stderr line {i:02d} of 50", file=sys.stderr, flush=True)
    if i == 40:
        sys.stderr.write("\\rprogress 1/3\\rprogress 2/3\\rprogress 3/3\\n")
print("not a result, on stdout", flush=True)
if mode == "fail":
    print("ValueError: the real reason", file=sys.stderr, flush=True)
    grandchild.kill()
    sys.exit(1)
time.sleep(300)
"""


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text(textwrap.dedent(FAKE_WORKER))
    pid_file = tmp_path / "grandchild.pid"

    def use(mode: str) -> Path:
        monkeypatch.setattr(pipeline, "_child_command", lambda python, request: [sys.executable, str(script), mode, str(pid_file)])
        return pid_file

    monkeypatch.setattr(pipeline, "_KILL_GRACE_S", 1.0)
    return use


def test_a_build_past_its_timeout_is_stopped_with_everything_it_started(tmp_path, fake_worker, capsys):
    pid_file = fake_worker("hang")
    t0 = time.monotonic()
    with pytest.raises(OptimizationTimedOut) as e:
        optimize("default", SPEC, tmp_path / "cache", NO_QUALITY, build_timeout_s=3)
    took = time.monotonic() - t0
    assert 3 <= took < 30, took  # SIGTERM ignored: SIGKILL after the grace period
    message = str(e.value)
    first, *rest = message.splitlines()
    assert "did not finish within 3 s (the variant's build_timeout_s) and was stopped: stderr line 50 of 50" in first
    tail = "\n".join(rest)
    # The last 30 lines of its stderr; the progress bar as its last state; stdout not mixed in.
    assert "stderr line 22 of 50" in tail and "stderr line 21 of 50" not in tail
    assert "progress 3/3" in tail and "progress 2/3" not in tail
    assert "on stdout" not in tail
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild), "a process the build started outlived it"
    # Still streamed to this process's stderr (the replica's log), as it came.
    err = capsys.readouterr().err
    assert "stderr line 01 of 50" in err and "not a result, on stdout" in err
    # The cache is left clean: no temporary folder, no lock file.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".base-digests.json"]


def test_a_failed_build_says_why_in_its_error(tmp_path, fake_worker):
    fake_worker("fail")
    with pytest.raises(OptimizationFailed) as e:
        optimize("default", SPEC, tmp_path / "cache", NO_QUALITY)
    assert not isinstance(e.value, OptimizationTimedOut)
    first, *rest = str(e.value).splitlines()
    assert first.endswith("failed (exit 1): ValueError: the real reason")
    assert "see the log above" not in str(e.value)
    assert len(rest) == 1 + pipeline.STDERR_TAIL_LINES and rest[-1] == "ValueError: the real reason"


def test_the_build_timeout_comes_from_the_variant_and_reaches_the_on_load_hook():
    cfg = load_config({
        "cache_max_gib": 20,
        "models": [{"name": "m", "variants": [{"name": "a"}, {"name": "b", "build_timeout_s": 600}]}],
    })
    a, b = cfg.models[0].variants
    assert a.build_timeout_s == pipeline.DEFAULT_BUILD_TIMEOUT_S == 3600 and b.build_timeout_s == 600
    assert cfg.cache_max_gib == 20 and load_config({"models": [{"name": "m", "variants": [{"name": "a"}]}]}).cache_max_gib is None
    common = dict(model="m", variant="b", source="default", optimization={"method": "none"}, cache_dir="/c", accelerator="cpu")
    spec = OnLoadSpec.model_validate(OnLoadSpec(**common, build_timeout_s=600, cache_max_gib=20).model_dump(mode="json"))
    assert (spec.build_timeout_s, spec.cache_max_gib) == (600, 20)
    assert (OnLoadSpec(**common).build_timeout_s, OnLoadSpec(**common).cache_max_gib) == (3600, None)


def test_bad_timeouts_and_caps_are_config_errors():
    with pytest.raises(ConfigError) as e:
        load_config({"cache_max_gib": 0, "models": [{"name": "m", "variants": [{"name": "a", "build_timeout_s": -1}]}]})
    assert "cache_max_gib: Input should be greater than 0" in str(e.value)
    assert "models.0.variants.0.build_timeout_s: Input should be greater than 0" in str(e.value)


def test_a_quality_limit_without_measuring_is_refused_with_its_path(tmp_path):
    path = tmp_path / "slimserve.yaml"
    path.write_text(textwrap.dedent("""
        models:
          - name: smollm2
            variants:
              - {name: baseline}
              - {name: int8, optimization: w8a8, quality: {measure: false, max_ppl_ratio: 1.1}}
              - {name: rtn, optimization: rtn, quality: {measure: false}}
    """))
    r = subprocess.run([sys.executable, "-m", "slimserve.serve.commands.cli", "config", "validate", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert ("models.0.variants.1.quality: max_ppl_ratio 1.1 with measure: false is never checked (nothing is "
            "measured); set measure: true, or drop max_ppl_ratio") in r.stderr
    assert "variants.2" not in r.stderr  # not measuring, with no limit, is fine
    with pytest.raises(ValueError, match="never checked"):
        optimize("default", "w8a8", tmp_path, {"measure": False, "max_ppl_ratio": 1.1})


def test_checkpoints_are_scored_in_the_dtype_they_were_saved_in(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimserve.optimizers.models import resolve_source
    from slimserve.optimizers.quality import load_for_inference

    model = load_for_inference(resolve_source("default"))  # saved in bf16: not widened to fp32
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=128)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(tmp_path / "fp16")
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp32")
    assert next(load_for_inference(tmp_path / "fp16").parameters()).dtype == torch.float16
    assert next(load_for_inference(tmp_path / "fp32").parameters()).dtype == torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == device


def test_a_build_that_ends_normally_is_unchanged(tmp_path, monkeypatch):
    """A stand-in worker that reports success: its report reaches the manifest, no process is left."""
    script = tmp_path / "ok_worker.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        from pathlib import Path
        out = Path(json.loads(sys.argv[1])["out"])
        (out / "config.json").write_text("{}")
        print("building", file=sys.stderr)
        print("SLIMSERVE_RESULT " + json.dumps({"optimize_seconds": 0.1, "ok": 1}))
    """))
    monkeypatch.setattr(pipeline, "_child_command", lambda python, request: [sys.executable, str(script), request])
    r = optimize("default", SPEC, tmp_path, NO_QUALITY, build_timeout_s=60)
    assert r.cache_hit is False and r.manifest.report.to_json_dict() == {"optimize_seconds": 0.1, "ok": 1}
    assert optimize("default", SPEC, tmp_path, NO_QUALITY).cache_hit is True
    assert [e.key for e in ArtifactCache(tmp_path).entries()] == [r.path.name]
