"""optimize → verify → cache: the one entry point the on-load hook and the CLI call.

The optimization itself runs in a child process, in the *optimizer environment* (the one with
llm-compressor; see `optimizer_python`). Two reasons: llm-compressor and vLLM pin different
versions of compressed-tensors and transformers, and a child's exit hands back every byte that
calibration used before the engine sizes its KV cache.
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from slimserve.optimizers.build import lifeline
from slimserve.optimizers.build.build_report import ArtifactManifest, BuildReport, field_errors
from slimserve.optimizers.cache.store import GIB, ArtifactCache, CacheHold, folder_digest, hold, sha256_file
from slimserve.optimizers.calibration import Calibration, load_text
from slimserve.optimizers.models import resolve_source
from slimserve.optimizers.quality import HeldOut, QualityGate, QualityGateFailed  # noqa: F401 (re-exported)
from slimserve.optimizers.registry import Optimization, code_versions, parse
from slimserve.optimizers.build.worker import RESULT_PREFIX

log = logging.getLogger(__name__)

DEFAULT_BUILD_TIMEOUT_S = 3600.0  # longest one optimization may run (a variant's build_timeout_s)
# Waiting for another process building the same artifact: up to this many build timeouts (it may
# have waited itself, or run with a longer timeout). serve/config/start_budget.py counts it in.
LOCK_WAIT_FACTOR = 2
STDERR_TAIL_LINES = 30  # last lines of the child's output kept for the failure message
_KILL_GRACE_S = 5.0  # SIGTERM to SIGKILL


class OptimizationFailed(RuntimeError):
    """The optimizer's child process failed; the message ends with its last lines of output."""


class OptimizationTimedOut(OptimizationFailed):
    """The optimizer's child process ran past its build timeout and was stopped."""


@dataclass
class OptimizeResult:
    path: Path  # the checkpoint the engine should load
    base: Path
    method: str
    cache_hit: bool | None  # None: nothing to cache (method `none`)
    seconds: float  # wall time of this call, lookup included
    manifest: ArtifactManifest | None  # the artifact's (read and checked); None: nothing built (method `none`)
    # Keeps the artifact from being evicted while it is referenced (see cache.hold); None when
    # nothing cached is served (method `none`, or the base served after a failed quality gate).
    hold: CacheHold | None = None
    quality_gate: str = "passed"  # or "failed: serving base" (on_quality_fail: serve_base)


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


def _library_versions(python: str, names: tuple[str, ...], withhold_env=()) -> dict[str, str]:
    if not names:
        return {}
    code = (
        "import importlib.metadata as m, json, sys\n"
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    # The optimizer environment's Python imports its site packages (.pth hooks included): it gets
    # the build child's environment, without the API and admin keys.
    out = subprocess.run([python, "-c", code, *names], check=True, capture_output=True, text=True,
                         env=child_environment(withhold_env))
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
        tmp = memo_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # builds may run in threads
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    return digest


def slimserve_identity(spec: Optimization) -> dict[str, Any]:
    """What the manifest says of the slimserve that built `spec`'s artifact: its version, and the
    versions of its code that the cache key holds (registry.code_versions)."""
    try:
        version = metadata.version("slimserve")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, **code_versions(spec)}


def cache_key(
    base_hash: str, spec: Optimization, versions: dict[str, str], held_out: HeldOut | None = None,
    code: dict[str, int] | None = None,
) -> str:
    """`code`: the versions of slimserve's code that builds it (default: this installation's,
    registry.code_versions). Not slimserve's release: a release that changes no method's output
    rebuilds nothing."""
    # Calibration text is named in the spec by path; its content goes into the key too.
    calibration = {
        name: value.digest() for name, value in spec if isinstance(value, Calibration)
    }
    key = {
        "base": base_hash, "spec": spec.model_dump(mode="json"), "calibration": calibration,
        "versions": versions, "held_out": held_out.model_dump() if held_out else None,
        # slimserve's own code builds (structured, student, sparse magnitude, KD healing) or
        # drives (llm-compressor's methods) every artifact: code that writes another output (a
        # method's `version` or BUILD_VERSION bumped), another artifact.
        "slimserve": code if code is not None else code_versions(spec),
    }
    # Other inputs named by path (a student checkpoint): their content goes into the key too.
    inputs = getattr(spec, "input_digest", lambda: None)()
    if inputs is not None:
        key["inputs"] = inputs
    payload = json.dumps(key, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _child_command(python: str, request: str) -> list[str]:
    return [python, "-m", "slimserve.optimizers.build.worker", request]


def _with_lifeline(command: list[str]) -> list[str]:
    """`command` run by lifeline.py, which kills it and all it started if this process dies."""
    return [sys.executable, str(Path(lifeline.__file__)), str(os.getpid()), "--", *command]


class _Tail:
    """The last `n` lines of a stream, as a terminal would show them (a progress bar redrawn
    with carriage returns is one line)."""

    def __init__(self, n: int):
        self.lines: collections.deque[str] = collections.deque(maxlen=n)
        self.partial = ""
        self.lock = threading.Lock()

    def feed(self, text: str) -> None:
        with self.lock:
            *done, self.partial = (self.partial + text).split("\n")
            for line in done:
                self.lines.append(self._redrawn(line))

    @staticmethod
    def _redrawn(line: str) -> str:
        parts = [p for p in line.rstrip("\r").split("\r")]
        return parts[-1] if parts else ""

    def text(self) -> str:
        with self.lock:
            lines = list(self.lines) + ([self._redrawn(self.partial)] if self.partial.strip() else [])
        lines = [l for l in lines if l.strip()][-self.lines.maxlen:]
        return "\n".join(lines) if lines else "(no output)"


def _forward(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the child's process group (the child and everything it started that is still
    there): SIGTERM, then SIGKILL what is left after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + _KILL_GRACE_S
        while time.monotonic() < deadline:
            proc.poll()  # reap the child itself, else it stays in the group as a zombie
            if not _group_alive(proc.pid):
                break
            time.sleep(0.05)
    proc.wait()


# Always withheld from the optimizer's child, whatever the config names: slimserve's default key variables.
SECRET_ENV_DEFAULTS = ("SLIMSERVE_API_KEYS", "SLIMSERVE_ADMIN_KEYS")


def child_environment(withhold_env=()) -> dict[str, str]:
    """The optimizer child's environment: this process's, offline, less the variables that hold
    API and admin keys (the child runs llm-compressor, transformers and their plugins: none of
    them needs a key, and none should be able to read one)."""
    withheld = set(SECRET_ENV_DEFAULTS) | set(withhold_env)
    env = {k: v for k, v in os.environ.items() if k not in withheld}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run_child(
    python: str, spec: Optimization, base: Path, out: Path, held_out: HeldOut | None,
    timeout_s: float | None = DEFAULT_BUILD_TIMEOUT_S, code: dict[str, int] | None = None,
    withhold_env: tuple[str, ...] | list[str] = (),
) -> BuildReport:
    """Run the method in a child process of its own process group; stop the whole group after
    `timeout_s`. Its output streams to this process's stderr (the replica's log) as it comes;
    the last STDERR_TAIL_LINES lines of its stderr end the message of a failure. Its report is
    checked here: one that does not read as a BuildReport fails the build, naming the fields."""
    request = json.dumps({
        "spec": spec.model_dump(mode="json"), "base": str(base), "out": str(out),
        "held_out": held_out.model_dump() if held_out else None, "code": code,
    })
    env = child_environment(withhold_env)
    log.info("optimizing %s with %s in a child process (%s, at most %s s)", base.name, spec.method, python, timeout_s)
    proc = subprocess.Popen(
        _with_lifeline(_child_command(python, request)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        # Its own process group: a timeout (here) or this process's death (lifeline) stops
        # everything it started.
        start_new_session=True,
    )
    tail, result = _Tail(STDERR_TAIL_LINES), {}

    def pump_stderr() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := proc.stderr.read1(1 << 16):
            text = decoder.decode(chunk)
            _forward(text)  # progress bars and llm-compressor's log reach the replica's log
            tail.feed(text)

    def pump_stdout() -> None:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith(RESULT_PREFIX):
                result["report"] = line[len(RESULT_PREFIX):]
            else:
                _forward(line)

    pumps = [threading.Thread(target=f, daemon=True) for f in (pump_stderr, pump_stdout)]
    for t in pumps:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # On a timeout, an error here (KeyboardInterrupt) and after a normal exit alike: nothing
        # the build started outlives it.
        _stop_group(proc)
        for t in pumps:
            t.join(timeout=10)  # a grandchild that left the group may hold the pipes: do not hang
    what = f"optimization {spec.method} of {base}"
    if timed_out:
        how = f"did not finish within {timeout_s:g} s (the variant's build_timeout_s) and was stopped"
    elif proc.returncode < 0:
        how = f"was killed by {signal.Signals(-proc.returncode).name}"
        if proc.returncode == -signal.SIGKILL:
            how += " (out of memory?)"
    elif proc.returncode:
        how = f"failed (exit {proc.returncode})"
    elif "report" not in result:
        how = "exited without a result"
    else:
        try:
            return BuildReport.model_validate_json(result["report"])
        except ValidationError as e:  # not JSON, or not a BuildReport: the build is not cached
            how = f"reported a malformed result ({field_errors(e, 'report.')})"
    # First line: what happened and the child's last words (usually the exception), for one-line
    # reports (/v1/models, the CLI); then the tail of its output.
    output = tail.text()
    message = f"{what} {how}: {output.splitlines()[-1]}\nlast lines of its output:\n{output}"
    raise (OptimizationTimedOut if timed_out else OptimizationFailed)(message)


def optimize(
    source: str,
    spec: Optimization | dict | str,
    cache_dir: str | os.PathLike,
    quality: QualityGate | dict | None = None,
    build_timeout_s: float | None = DEFAULT_BUILD_TIMEOUT_S,
    lock_timeout_s: float | None = None,
    cache_max_gib: float | None = None,
    withhold_env: tuple[str, ...] | list[str] = (),
) -> OptimizeResult:
    """Return the checkpoint to serve for `source` optimized by `spec`, building it if needed,
    and apply the quality gate (which may raise QualityGateFailed or fall back to the base).

    The build is stopped after `build_timeout_s` (OptimizationTimedOut); waiting for another
    process building the same artifact ends after `lock_timeout_s` (default: twice the build
    timeout; cache.LockTimeout). `cache_max_gib`: after a build, least recently used artifacts
    not in use are evicted until the cache fits (None: unbounded). The result holds the
    artifact (`result.hold`) against eviction for as long as it is referenced."""
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
        return OptimizeResult(base, base, spec.method, None, time.monotonic() - t0, None)
    python = optimizer_python() if spec.needs_optimizer_env else sys.executable
    versions = _library_versions(python, spec.libraries, withhold_env)
    held_out = gate.held_out if gate.measure else None
    if held_out is not None and held_out.text == "fortunes" and not held_out.available():
        if gate.max_ppl_ratio is not None:
            load_text(held_out.text)  # raises, saying what to install
        log.warning("quality not measured: Debian's fortunes-min is not installed (apt-get install fortunes-min)")
        held_out = None
    cache = ArtifactCache(cache_dir, max_bytes=None if cache_max_gib is None else int(cache_max_gib * GIB))
    code = code_versions(spec)
    key = cache_key(base_digest(base, cache.root), spec, versions, held_out, code)
    info = {"method": spec.method, "spec": spec.model_dump(mode="json"), "base": str(base), "versions": versions,
            "slimserve": slimserve_identity(spec)}
    if lock_timeout_s is None and build_timeout_s is not None:
        lock_timeout_s = LOCK_WAIT_FACTOR * build_timeout_s
    build = lambda tmp: _run_child(python, spec, base, tmp, held_out, build_timeout_s, code, withhold_env).to_json_dict()  # noqa: E731
    for attempt in (1, 2):
        # The manifest read as an ArtifactManifest; one that does not read is rebuilt (ArtifactCache.lookup).
        path, manifest, hit = cache.get_or_build(key, build, info, lock_timeout_s, read=ArtifactManifest.model_validate)
        try:
            held = hold(path)
            break
        except FileNotFoundError:  # evicted between the lookup and the hold (another process's cap)
            if attempt == 2:
                raise
    seconds = time.monotonic() - t0
    log.info("%s: %s in %.1f s -> %s", spec.method, "cache hit" if hit else "built", seconds, path)
    result = OptimizeResult(path, base, spec.method, hit, seconds, manifest, held)
    return _apply_gate(result, gate)


def _apply_gate(result: OptimizeResult, gate: QualityGate) -> OptimizeResult:
    q = result.manifest.report.quality if result.manifest else None
    if gate.max_ppl_ratio is None or q is None or q.ppl_ratio <= gate.max_ppl_ratio:
        return result
    message = (
        f"quality gate: {result.method} has perplexity {q.perplexity:.2f} vs {q.base_perplexity:.2f} "
        f"for the base (ratio {q.ppl_ratio:.3f} > max_ppl_ratio {gate.max_ppl_ratio})"
    )
    if gate.on_quality_fail == "fail":
        raise QualityGateFailed(message + "; raise max_ppl_ratio, change the method, or set on_quality_fail: serve_base")
    log.warning("%s: serving the base model instead", message)
    result.quality_gate = "failed: serving base"
    result.path = result.base
    if result.hold is not None:
        result.hold.release()
        result.hold = None
    return result
