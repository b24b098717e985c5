"""On-load optimization for real: SmolLM2 → W8A8 with llm-compressor in the optimizer environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from slimserve.optimizers.build.build_report import ArtifactManifest
from slimserve.optimizers.cache.store import MANIFEST
from slimserve.optimizers.build.pipeline import optimize

# The optimizer child process, vLLM engines or training: minutes on CPU (not in `make test-fast`).
pytestmark = pytest.mark.heavy


def test_none_serves_the_base_checkpoint(tmp_path):
    r = optimize("default", "none", tmp_path)
    assert r.path == r.base and r.cache_hit is None
    assert (r.path / "config.json").exists()
    assert not any(tmp_path.iterdir())  # nothing cached for the baseline


@pytest.fixture(scope="module")
def w8a8_cache(tmp_path_factory):
    """One cache for this module's w8a8 tests: a build of SmolLM2 takes minutes here."""
    return tmp_path_factory.mktemp("w8a8-cache")


def test_w8a8_builds_an_int8_checkpoint_then_hits_the_cache(w8a8_cache):
    tmp_path = w8a8_cache
    first = optimize("default", {"method": "w8a8"}, tmp_path)
    assert first.cache_hit is False
    qc = json.loads((first.path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == 8 and group["input_activations"]["dynamic"] is True
    with safe_open(str(first.path / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("mlp.down_proj.weight")}
    assert dtypes == {"I8"}
    assert (first.path / "tokenizer.json").exists()
    # The manifest on disk reads as the typed model, the method's facts in its report.
    assert ArtifactManifest.model_validate_json((first.path / MANIFEST).read_text()) == first.manifest
    assert first.manifest.report.scheme == "W8A8"

    # A restart: the same request is a verified cache hit and runs no optimization.
    second = optimize("default", {"method": "w8a8"}, tmp_path)
    assert second.cache_hit is True and second.path == first.path
    assert second.seconds < first.seconds / 3, (second.seconds, first.seconds)

    # A damaged artifact is detected and rebuilt, never served.
    weights = first.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    third = optimize("default", {"method": "w8a8"}, tmp_path)
    assert third.cache_hit is False
    assert weights.stat().st_size == json.loads((third.path / MANIFEST).read_text())["files"]["model.safetensors"]["size"]


def test_optimize_cli_prints_a_table(tmp_path, w8a8_cache):
    # The artifact of the test above (built here if this test runs alone): the table of a cache hit
    # shows what its manifest recorded of the build.
    optimize("default", {"method": "w8a8"}, w8a8_cache)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"cache_dir: {w8a8_cache}\n"
        "models:\n  - name: smollm2\n    variants:\n      - {name: baseline}\n      - {name: int8, optimization: w8a8}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "slimserve.serve.commands.cli", "optimize", "--config", str(cfg), "--variant", "int8"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.strip().splitlines()
    assert header.split() == ["variant", "method", "cache", "seconds", "MB", "size", "ppl_base", "ppl", "ppl_ratio", "checkpoint"]
    cols = row.split()
    assert cols[:3] == ["smollm2/int8", "w8a8", "hit"]
    assert 0.4 < float(cols[5].rstrip("x")) < 0.75  # int8 linears, bf16 embeddings
    base_ppl, ppl, ratio = map(float, cols[6:9])
    assert 5 < base_ppl < 200 and abs(ratio - ppl / base_ppl) < 0.01
