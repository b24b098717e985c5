"""optimize → verify → cache: the one entry point the on-load hook and the CLI call.

The optimization itself runs in a child process, in the *optimizer environment* (the one with
llm-compressor; see `optimizer_python`). Two reasons: llm-compressor and vLLM pin different
versions of compressed-tensors and transformers, and a child's exit hands back every byte that
calibration used before the engine sizes its KV cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import ArtifactCache, folder_digest, sha256_file
from .calibration import Calibration, load_text
from .models import resolve_source
from .quality import HeldOut, QualityGate, QualityGateFailed  # noqa: F401 (re-exported)
from .registry import Optimization, parse
from .worker import RESULT_PREFIX

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    path: Path  # the checkpoint the engine should load
    base: Path
    method: str
    cache_hit: bool | None  # None: nothing to cache (method `none`)
    seconds: float  # wall time of this call, lookup included
    manifest: dict[str, Any]


def optimizer_python() -> str:
    """The Python interpreter of the optimizer environment.

    $SLIMSERVE_OPTIMIZER_PYTHON if set; else `.venv-opt/bin/python` beside this environment's
    folder (the layout `make` builds); else this interpreter when llm-compressor imports here."""
    env = os.environ.get("SLIMSERVE_OPTIMIZER_PYTHON")
    if env:
        return env
    sibling = Path(sys.prefix).parent / ".venv-opt" / "bin" / "python"
    if sibling.exists():
        return str(sibling)
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    raise RuntimeError(
        "no optimizer environment: set SLIMSERVE_OPTIMIZER_PYTHON to a Python that has "
        "slimserve and llm-compressor installed (`make` builds one in .venv-opt)"
    )


def _library_versions(python: str, names: tuple[str, ...]) -> dict[str, str]:
    if not names:
        return {}
    code = (
        "import importlib.metadata as m, json, sys\n"
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run([python, "-c", code, *names], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def base_digest(base: Path, memo_dir: Path) -> str:
    """Content hash of a checkpoint folder. Per-file hashes are memoized by (path, size, mtime)
    so that a restart does not re-read many GB of weights."""
    memo_file = memo_dir / ".base-digests.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    known = len(memo)

    def memoized_sha256(p: Path) -> str:
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = sha256_file(p)
        return memo[key]

    digest = folder_digest(base, file_sha=memoized_sha256)
    if len(memo) > known:
        memo_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    return digest


def cache_key(base_hash: str, spec: Optimization, versions: dict[str, str], held_out: HeldOut | None = None) -> str:
    # Calibration text is named in the spec by path; its content goes into the key too.
    calibration = {
        name: value.digest() for name, value in spec if isinstance(value, Calibration)
    }
    key = {
        "base": base_hash, "spec": spec.model_dump(mode="json"), "calibration": calibration,
        "versions": versions, "held_out": held_out.model_dump() if held_out else None,
    }
    # Other inputs named by path (a student checkpoint): their content goes into the key too.
    inputs = getattr(spec, "input_digest", lambda: None)()
    if inputs is not None:
        key["inputs"] = inputs
    payload = json.dumps(key, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _run_child(python: str, spec: Optimization, base: Path, out: Path, held_out: HeldOut | None) -> dict[str, Any]:
    request = json.dumps({
        "spec": spec.model_dump(mode="json"), "base": str(base), "out": str(out),
        "held_out": held_out.model_dump() if held_out else None,
    })
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log.info("optimizing %s with %s in a child process (%s)", base.name, spec.method, python)
    # stderr is inherited so that progress bars and llm-compressor's log reach the replica's log.
    proc = subprocess.run(
        [python, "-m", "slimserve.optimizers.worker", request],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        else:
            print(line, file=sys.stderr)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"optimization {spec.method} of {base} failed (exit {proc.returncode}); see the log above")
    return result


def optimize(
    source: str,
    spec: Optimization | dict | str,
    cache_dir: str | os.PathLike,
    quality: QualityGate | dict | None = None,
) -> OptimizeResult:
    """Return the checkpoint to serve for `source` optimized by `spec`, building it if needed,
    and apply the quality gate (which may raise QualityGateFailed or fall back to the base)."""
    t0 = time.monotonic()
    spec = parse(spec)
    gate = QualityGate.model_validate(quality or {})
    base = resolve_source(source)
    quantized = json.loads((base / "config.json").read_text()).get("quantization_config")
    if quantized and spec.produces_artifact:
        raise ValueError(
            f"{source} is already quantized (quant_method {quantized.get('quant_method')!r}): "
            f"serve it as it is with `optimization: none` instead of {spec.method!r}"
        )
    if not spec.produces_artifact:
        return OptimizeResult(base, base, spec.method, None, time.monotonic() - t0, {"method": spec.method})
    python = optimizer_python() if spec.needs_optimizer_env else sys.executable
    versions = _library_versions(python, spec.libraries)
    held_out = gate.held_out if gate.measure else None
    if held_out is not None and held_out.text == "fortunes" and not held_out.available():
        if gate.max_ppl_ratio is not None:
            load_text(held_out.text)  # raises, saying what to install
        log.warning("quality not measured: Debian's fortunes-min is not installed (apt-get install fortunes-min)")
        held_out = None
    cache = ArtifactCache(cache_dir)
    key = cache_key(base_digest(base, cache.root), spec, versions, held_out)
    info = {"method": spec.method, "spec": spec.model_dump(mode="json"), "base": str(base), "versions": versions}
    path, manifest, hit = cache.get_or_build(key, lambda tmp: _run_child(python, spec, base, tmp, held_out), info)
    seconds = time.monotonic() - t0
    log.info("%s: %s in %.1f s -> %s", spec.method, "cache hit" if hit else "built", seconds, path)
    result = OptimizeResult(path, base, spec.method, hit, seconds, manifest)
    return _apply_gate(result, gate)


def _apply_gate(result: OptimizeResult, gate: QualityGate) -> OptimizeResult:
    q = result.manifest.get("report", {}).get("quality")
    if gate.max_ppl_ratio is None or q is None or q["ppl_ratio"] <= gate.max_ppl_ratio:
        return result
    message = (
        f"quality gate: {result.method} has perplexity {q['perplexity']:.2f} vs {q['base_perplexity']:.2f} "
        f"for the base (ratio {q['ppl_ratio']:.3f} > max_ppl_ratio {gate.max_ppl_ratio})"
    )
    if gate.on_quality_fail == "fail":
        raise QualityGateFailed(message + "; raise max_ppl_ratio, change the method, or set on_quality_fail: serve_base")
    log.warning("%s: serving the base model instead", message)
    result.manifest = {**result.manifest, "quality_gate": "failed: serving base"}
    result.path = result.base
    return result
