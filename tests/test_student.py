"""Distilled-student swap: a student made by `slimserve distill` (SmolLM2 depth-pruned, a few KD
steps) is served under the teacher's public name; the build measures its agreement with the
teacher and the quality gate applies; the running engine holds the student's weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimserve.optimizers.cache.store import MANIFEST, sha256_file
from slimserve.optimizers.build.pipeline import optimize
from slimserve.optimizers.quality import QualityGateFailed

# The optimizer child process, vLLM engines or training: minutes on CPU (not in `make test-fast`).
pytestmark = pytest.mark.heavy

QUALITY = {"held_out": {"text": "fortunes", "windows": 4, "seq_len": 128}}


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "smollm2-student"
    prune = '{"layers_keep": 0.7, "calibration": {"samples": 4, "seq_len": 64}}'
    r = subprocess.run(
        [sys.executable, "-m", "slimserve.serve.commands.cli", "distill", "--teacher", "default", "--student-prune", prune,
         "--out", str(out), "--steps", "3", "--seq-len", "64", "--batch-size", "2", "--lr", "3e-4"],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    shutil.rmtree(out / "student-init")  # keep only what a user would hand over
    return out


def test_student_build_measures_agreement_and_is_cached_by_content(student, tmp_path):
    first = optimize("default", {"method": "student", "path": str(student)}, tmp_path, QUALITY)
    report = first.manifest.report
    assert json.loads((first.path / "config.json").read_text())["num_hidden_layers"] == 21
    assert sha256_file(first.path / "model.safetensors") == sha256_file(student / "model.safetensors")
    agree = report.agreement
    assert 0.05 < agree.top1_agreement < 1 and agree.kl_per_token > 0 and agree.tokens == 8 * 256
    assert report.parameters[1] < report.parameters[0]
    assert report.quality.ppl_ratio > 1  # the gate's numbers are there: student vs teacher

    again = optimize("default", {"method": "student", "path": str(student)}, tmp_path, QUALITY)
    assert again.cache_hit is True and again.path == first.path
    # A retrained student (other bytes, same path) is a new cache key, never the stale artifact.
    from slimserve.optimizers.build.pipeline import cache_key
    from slimserve.optimizers.registry import parse

    spec = parse({"method": "student", "path": str(student)})
    before = cache_key("base", spec, {})
    gen = student / "generation_config.json"
    saved = gen.read_bytes()
    try:
        gen.write_text(json.dumps({"max_new_tokens": 7}))
        assert cache_key("base", spec, {}) != before
    finally:
        gen.write_bytes(saved)
    assert cache_key("base", spec, {}) == before

    ratio = report.quality.ppl_ratio
    with pytest.raises(QualityGateFailed, match="student has perplexity"):
        optimize("default", {"method": "student", "path": str(student)}, tmp_path, {**QUALITY, "max_ppl_ratio": ratio * 0.99})


def test_a_student_with_another_tokenizer_is_refused(student, tmp_path):
    alien = tmp_path / "alien"
    shutil.copytree(student, alien)
    cfg = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**cfg, "vocab_size": 32000}))
    with pytest.raises(RuntimeError, match="failed"):  # the child process says why on stderr
        optimize("default", {"method": "student", "path": str(alien)}, tmp_path, QUALITY)
    from slimserve.optimizers.methods.student import _check_tokenizer
    from slimserve.optimizers.models import resolve_source

    with pytest.raises(ValueError, match="must share the teacher's tokenizer"):
        _check_tokenizer(resolve_source("default"), alien)


@pytest.mark.e2e
def test_student_answers_under_the_teachers_name_with_its_own_weights(student, serve_url, session_cache):
    import httpx
    import openai

    from conftest import check_engine_computes_the_checkpoint, deploy_and_wait, engine_info, release_main_app, undeploy

    release_main_app()
    config = {
        "cache_dir": str(session_cache),
        "models": [{
            "name": "smollm2", "engine": {"max_model_len": 512},
            "variants": [{"name": "student", "student": str(student), "quality": QUALITY}],
        }],
    }
    deploy_and_wait(config, "student")
    try:
        cards = {c["id"]: c for c in httpx.get(f"{serve_url}/v1/models", timeout=30).json()["data"]}
        engine = cards["smollm2--student"]["metadata"]["engine"]
        assert engine["optimization"]["method"] == "student"
        assert "top1_agreement" in engine["optimization"]["report"]["agreement"]
        # The live engine loaded the artifact holding the student's bytes.
        checkpoint = Path(engine_info("smollm2--student", app="student")["checkpoint"])
        assert checkpoint.parent == session_cache
        assert sha256_file(checkpoint / "model.safetensors") == sha256_file(student / "model.safetensors")
        assert (checkpoint / MANIFEST).exists()

        client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)
        raw = client.completions.with_raw_response.create(model="smollm2", prompt="Hi", max_tokens=1)
        assert raw.headers["x-slimserve-variant"] == "student"
        # Its next-token distribution is the student's in transformers, computed on the student's folder.
        check_engine_computes_the_checkpoint(client, "smollm2", "The capital of France is", student)

        # The agreement the build measured is exported as the variant's quality gauge.
        import time

        from conftest import METRICS_PORT

        agreement = engine["optimization"]["report"]["agreement"]["top1_agreement"]

        def exported() -> float | None:
            for line in httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text.splitlines():
                if line.startswith("ray_slimserve_quality_ratio{") and 'metric="teacher_agreement"' in line and 'variant="student"' in line:
                    return float(line.rsplit(" ", 1)[1])
            return None

        t0 = time.monotonic()
        while (value := exported()) is None:
            assert time.monotonic() - t0 < 60, "no teacher_agreement gauge for the student"
            time.sleep(2)
        assert value == pytest.approx(agreement)
    finally:
        undeploy("student")


def test_a_student_recipe_is_built_once_then_cached(tmp_path):
    recipe = {"config": {"num_hidden_layers": 2},
              "distill": {"steps": 2, "seq_len": 32, "batch_size": 2, "text": "fortunes"}}
    spec = {"method": "student", "recipe": recipe, "agreement": {"text": "fortunes", "windows": 2, "seq_len": 64}}
    first = optimize("default", spec, tmp_path, {"measure": False})
    report = first.manifest.report
    assert report.distill["steps_run"] == 2 and report.distill["tokens"] == 2 * 2 * 32
    assert json.loads((first.path / "config.json").read_text())["num_hidden_layers"] == 2
    assert (first.path / "tokenizer.json").exists() and report.agreement.tokens == 2 * 64
    assert not any(p.name.endswith(".student-work") for p in tmp_path.iterdir())  # no leftovers
    assert optimize("default", spec, tmp_path, {"measure": False}).cache_hit is True
