"""Each method's `version` is bumped when its output changes: the cache key holds the version instead
of a hash of the code, so an edit that changes no output (a comment, a refactor) rebuilds nothing,
and an edit that does change it must bump the version (or every artifact built before would be
served as a hit for the new code).

Every method builds a tiny model (2 layers, hidden 64, SmolLM2's tokenizer, seed 0) through the real
optimizer child, one thread each; a digest of what it wrote (every tensor's name, dtype, shape and
bytes, and config.json less library versions; not file bytes, not the report) is compared with the
one recorded in tests/build_digests.json for the method's version and BUILD_VERSION. A changed
output without a bump fails, saying what to bump. After bumping (or after a library upgrade,
which the cache key holds already: no bump), re-record:

    SLIMSERVE_RECORD_DIGESTS=1 .venv/bin/python -m pytest tests/test_build_digests.py

Skipped by design: `none` (it builds nothing). Everything else builds here on CPU, `fp8` included
(only serving it needs a GPU); the training methods train for 2 steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from slimserve.optimizers.build import pipeline
from slimserve.optimizers.models import resolve_source
from slimserve.optimizers.registry import BUILD_VERSION, code_versions, methods, parse

pytestmark = pytest.mark.heavy

RECORD_ENV = "SLIMSERVE_RECORD_DIGESTS"
RECORDED = Path(__file__).with_name("build_digests.json")
TINY_TEXT = {"text": "pydoc", "samples": 4, "seq_len": 32}  # calibration
TINY_TRAIN = {"text": "pydoc", "steps": 2, "seq_len": 32, "batch_size": 2}
TINY_EVAL = {"text": "pydoc", "windows": 1, "seq_len": 32}
# One spec per method: its main path, on as little as it takes.
SPECS = {
    "w8a8": {"method": "w8a8"},
    "fp8": {"method": "fp8"},
    "gptq": {"method": "gptq", "calibration": TINY_TEXT},
    "rtn": {"method": "rtn", "bits": 4},
    "sparse": {"method": "sparse", "calibration": TINY_TEXT},
    "structured": {"method": "structured", "heads_keep": 0.5, "mlp_keep": 0.5, "calibration": TINY_TEXT,
                   "heal": TINY_TRAIN, "heal_eval": TINY_EVAL},
    "student": {"method": "student", "recipe": {"config": {"num_hidden_layers": 1}, "distill": TINY_TRAIN},
                "agreement": TINY_EVAL},
    "gradual_prune": {"method": "gradual_prune", "train": TINY_TRAIN, "eval": TINY_EVAL},
    "gradual_sparse": {"method": "gradual_sparse", "train": TINY_TRAIN, "eval": TINY_EVAL},
    "qat": {"method": "qat", "train": TINY_TRAIN, "eval": TINY_EVAL},
    "qlora": {"method": "qlora", "rank": 4, "train": TINY_TRAIN, "eval": TINY_EVAL},
}
SKIPPED_BY_DESIGN = {"none": "builds nothing: the base is served as it is"}
# Built and versioned, but a changed digest only warns: their output was not bit-for-bit the same
# between two installs of the same pins once (2026-12-07: a clean clone's `sparse` digest differed
# while every other method's matched). Later the same day five `sparse` builds, on this checkout's
# install and on a clean clone's, each in its own child process, all gave the recorded digest: the
# warning (in CI's log) says whether it differs again before the exemption goes.
NOT_REPRODUCIBLE = {"sparse"}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def test_every_method_is_recorded_or_skipped_by_design():
    assert set(SPECS) | set(SKIPPED_BY_DESIGN) == set(methods()), "a new method needs a tiny spec in SPECS"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_source("default"))
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "base"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)  # bf16, as most bases are saved
    tok.save_pretrained(path)
    return path


def output_digest(folder: Path) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes; whatever the sharding) and config.json
    without the library versions it names."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    where = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            where.update({k: f for k in st.keys()})
    assert where, f"no tensors written in {folder}"
    for name in sorted(where):
        with safe_open(str(where[name]), "pt") as st:
            t = st.get_tensor(name).contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    config = json.loads((folder / "config.json").read_text())
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    if isinstance(config.get("quantization_config"), dict):
        config["quantization_config"].pop("version", None)  # compressed-tensors' version
    h.update(json.dumps(config, sort_keys=True).encode())
    return h.hexdigest()


def build(name: str, base: Path, out_root: Path) -> str:
    spec = parse(SPECS[name])
    python = pipeline.optimizer_python() if spec.needs_optimizer_env else sys.executable
    out = out_root / name
    out.mkdir()
    pipeline._run_child(python, spec, base, out, None, timeout_s=600, code=code_versions(spec))
    return output_digest(out)


@pytest.fixture(scope="module")
def digests(tiny_base, tmp_path_factory) -> dict[str, str]:
    """Every spec built by the optimizer child, two at a time on one thread each (deterministic
    whatever the machine's core count)."""
    out_root = tmp_path_factory.mktemp("builds")
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: "1" for k in THREAD_VARS})
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {name: pool.submit(build, name, tiny_base, out_root) for name in SPECS}
            return {name: f.result() for name, f in futures.items()}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def library_versions() -> dict[str, dict[str, str]]:
    """The libraries the methods use, per environment (a change there may change outputs too)."""
    envs: dict[str, set[str]] = {}
    for cls in methods().values():
        env = "optimizer" if cls.needs_optimizer_env else "serving"
        envs.setdefault(env, set()).update(cls.libraries)
    pythons = {"optimizer": pipeline.optimizer_python(), "serving": sys.executable}
    return {env: pipeline._library_versions(pythons[env], tuple(sorted(names))) for env, names in sorted(envs.items())}


def test_each_method_s_output_matches_the_digest_recorded_for_its_version(digests):
    current = {name: {**code_versions(parse(SPECS[name])), "digest": d} for name, d in sorted(digests.items())}
    libraries = library_versions()
    if os.environ.get(RECORD_ENV) == "1":
        RECORDED.write_text(json.dumps({
            "about": "tests/test_build_digests.py: a digest of each method's tiny build, per method version "
                     "and BUILD_VERSION; re-record with SLIMSERVE_RECORD_DIGESTS=1",
            "libraries": libraries, "methods": current,
        }, indent=2, sort_keys=True) + "\n")
        return
    recorded = json.loads(RECORDED.read_text())
    problems = []
    for name, now in current.items():
        then = recorded["methods"].get(name)
        module = type(parse(SPECS[name])).__module__
        if then is None:
            problems.append(f"{name}: no digest recorded: record it ({RECORD_ENV}=1)")
        elif (then["method_version"], then["build_version"]) != (now["method_version"], now["build_version"]):
            problems.append(
                f"{name}: version {now['method_version']} (BUILD_VERSION {now['build_version']}) is not the recorded "
                f"{then['method_version']} ({then['build_version']}): re-record ({RECORD_ENV}=1)"
            )
        elif then["digest"] != now["digest"] and name not in NOT_REPRODUCIBLE:
            problems.append(
                f"{name}: its output changed but its version did not ({now['method_version']}, BUILD_VERSION "
                f"{BUILD_VERSION}): bump `version` of {module} (or BUILD_VERSION in optimizers/registry.py when "
                f"shared build code changed every method's output), then re-record ({RECORD_ENV}=1)"
            )
    for name in sorted(NOT_REPRODUCIBLE & set(current)):
        then = recorded["methods"].get(name) or {}
        if then.get("digest") not in (None, current[name]["digest"]):
            warnings.warn(f"{name}: digest {current[name]['digest']} differs from the recorded {then['digest']} "
                          f"(not compared: NOT_REPRODUCIBLE)")
    if problems and libraries != recorded.get("libraries"):
        problems.append(
            f"the libraries changed since the record ({recorded.get('libraries')} -> {libraries}): if only they "
            f"changed the output, re-record ({RECORD_ENV}=1) without a bump (the cache key holds library versions)"
        )
    assert not problems, "\n".join(problems)
