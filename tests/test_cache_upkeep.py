"""The artifact cache over time, on real files and real processes: what the key covers (slimserve's
own code, by its versions), a bounded wait for another builder that says who it is, stale leftovers cleaned, and a
size cap with least-recently-used eviction that never evicts an artifact in use; `slimserve cache`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slimserve.optimizers.build import pipeline
from slimserve.optimizers.cache.store import IN_USE, ArtifactCache, LockTimeout, hold, verify
from slimserve.optimizers.registry import BUILD_VERSION, code_versions, parse

MB = 1 << 20


def key(n: int) -> str:
    return f"{n:x}" * 64 if n < 16 else f"{n:064x}"


def build_of(size: int = MB, note: str = "x"):
    def build(tmp: Path) -> dict:
        (tmp / "model.safetensors").write_bytes(os.urandom(size))
        return {"note": note}
    return build


def used_at(path: Path, when: float) -> None:
    os.utime(path / IN_USE, (when, when))


# --- the key covers slimserve's own code ---------------------------------------------------------


def test_a_method_version_or_build_version_bump_changes_the_key(monkeypatch):
    spec = parse({"method": "structured", "mlp_keep": 0.5})
    same = {"method_version": 1, "build_version": 1}
    k = pipeline.cache_key("base", spec, {"torch": "2"}, None, same)
    assert pipeline.cache_key("base", spec, {"torch": "2"}, None, dict(same)) == k
    assert pipeline.cache_key("base", spec, {"torch": "2"}, None, {**same, "method_version": 2}) != k
    assert pipeline.cache_key("base", spec, {"torch": "2"}, None, {**same, "build_version": 2}) != k
    # By default the key takes this installation's versions: the method's own and the build code's.
    default = pipeline.cache_key("base", spec, {"torch": "2"})
    assert default == pipeline.cache_key("base", spec, {"torch": "2"}, None, code_versions(spec))
    monkeypatch.setattr(type(spec), "version", type(spec).version + 1)
    assert pipeline.cache_key("base", spec, {"torch": "2"}) != default
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "code_versions", lambda s: {"method_version": 1, "build_version": BUILD_VERSION + 1})
    assert pipeline.cache_key("base", spec, {"torch": "2"}) != default
    # Not slimserve's release: a release that changes no method's output rebuilds nothing.
    monkeypatch.setattr(pipeline.metadata, "version", lambda name: "99.0")
    assert pipeline.cache_key("base", spec, {"torch": "2"}, None, same) == k


def test_every_method_has_its_own_version():
    from typing import Literal

    from slimserve.optimizers.registry import Optimization, methods, register

    for name, cls in methods().items():
        assert type(vars(cls).get("version")) is int and cls.version >= 1, name

    class Unversioned(Optimization):
        method: Literal["unversioned"] = "unversioned"

    class Inherited(type(parse("rtn"))):  # a version inherited from another method is not its own
        method: Literal["inherited"] = "inherited"

    for cls in (Unversioned, Inherited):
        with pytest.raises(ValueError, match="must set `version = 1`"):
            register(cls)
    assert "unversioned" not in methods() and "inherited" not in methods()


def test_the_worker_refuses_to_build_with_other_code_than_the_key_names(tmp_path):
    with pytest.raises(pipeline.OptimizationFailed, match="other slimserve code"):
        pipeline._run_child(sys.executable, parse("structured"), tmp_path, tmp_path / "out", None, 120,
                            {"method_version": 999, "build_version": BUILD_VERSION})


# --- the build lock: bounded, says who holds it --------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from slimserve.optimizers.cache.store import BuildLock
lock = BuildLock(Path(sys.argv[1]))
lock.acquire(None, {"method": "structured", "base": "/models/base"})
print("locked", flush=True)
time.sleep(300)
"""


def start_holder(code: str, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() in ("locked", "held"), "the holder did not start"
    return p


def stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


def test_waiting_for_a_builder_is_bounded_and_names_it(tmp_path):
    k = key(1)
    holder = start_holder(HOLD_LOCK, str(tmp_path / f"{k}.lock"))
    try:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as e:
            ArtifactCache(tmp_path).get_or_build(k, build_of(), {"method": "structured"}, lock_timeout_s=1.5)
        assert 1.5 <= time.monotonic() - t0 < 10
        message = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "building structured of /models/base since" in message
        # A clean-up on open leaves a live builder's lock alone.
        assert (tmp_path / f"{k}.lock").exists()
    finally:
        stop(holder)
    # The holder died without cleaning up: the kernel released its lock; the next builder builds.
    path, _, hit = ArtifactCache(tmp_path).get_or_build(k, build_of(), {}, lock_timeout_s=1.5)
    assert not hit and path.is_dir()
    assert not (tmp_path / f"{k}.lock").exists()


def test_optimize_waits_twice_the_build_timeout_for_another_builder(tmp_path):
    spec = parse({"method": "structured", "mlp_keep": 0.5})
    base = pipeline.resolve_source("default")
    versions = pipeline._library_versions(sys.executable, spec.libraries)
    k = pipeline.cache_key(pipeline.base_digest(base, tmp_path), spec, versions, None, code_versions(spec))
    holder = start_holder(HOLD_LOCK, str(tmp_path / f"{k}.lock"))
    try:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match=f"pid {holder.pid}"):
            pipeline.optimize("default", spec, tmp_path, {"measure": False}, build_timeout_s=1)
        assert 2 <= time.monotonic() - t0 < 15
    finally:
        stop(holder)


# --- stale leftovers -----------------------------------------------------------------------------


def test_opening_the_cache_removes_stale_temporaries_but_not_a_live_builders(tmp_path):
    dead, live, old_style = key(2), key(3), key(4)
    (tmp_path / f".tmp-{dead}-abc123").mkdir()
    (tmp_path / f".tmp-{dead}-abc123" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".tmp-{dead}-abc123.heal-work").mkdir()  # KD healing's work folder
    (tmp_path / f"{dead}.lock").write_text('{"pid": 1}')  # its builder was killed: nobody holds it
    (tmp_path / f".tmp-{old_style[:12]}-zz9").mkdir()  # an older slimserve's name, no lock left
    (tmp_path / f".trash-{dead}-1234abcd").mkdir()  # a removal that was cut short
    (tmp_path / f"{key(5)}.lock").touch()  # a lock file of a build that ended badly
    memo_old, memo_new = tmp_path / ".base-digests.123.tmp", tmp_path / ".base-digests.456.tmp"
    memo_old.write_text("{}")
    memo_new.write_text("{}")
    os.utime(memo_old, (time.time() - 7200, time.time() - 7200))
    (tmp_path / f".tmp-{live}-def456").mkdir()
    holder = start_holder(HOLD_LOCK, str(tmp_path / f"{live}.lock"))
    try:
        ArtifactCache(tmp_path)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([f".tmp-{live}-def456", f"{live}.lock", memo_new.name])
    finally:
        stop(holder)
    ArtifactCache(tmp_path)  # its builder is gone now
    assert sorted(p.name for p in tmp_path.iterdir()) == [memo_new.name]


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def failing(tmp: Path) -> dict:
        (tmp / "part").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ArtifactCache(tmp_path).get_or_build(key(6), failing, {})
    assert list(tmp_path.iterdir()) == []


# --- size cap, LRU eviction, in-use protection ---------------------------------------------------


def fill(cache: ArtifactCache, n: int) -> list[Path]:
    """n artifacts of 1 MB, the first used longest ago."""
    paths = []
    for i in range(n):
        path, _, _ = cache.get_or_build(key(i + 1), build_of(note=str(i)), {"method": f"m{i}"})
        used_at(path, time.time() - 1000 + 10 * i)
        paths.append(path)
    return paths


def test_eviction_goes_by_last_use(tmp_path):
    cache = ArtifactCache(tmp_path)
    a, b, c = fill(cache, 3)
    # Serving b again (a cache hit) makes it the most recently used.
    assert cache.get_or_build(key(2), build_of(), {})[2] is True
    assert [e.key for e in cache.entries()] == [key(1), key(3), key(2)]
    evicted = cache.prune(int(1.5 * MB))
    assert [e.key for e in evicted] == [key(1), key(3)]
    assert not a.exists() and not c.exists() and b.exists()
    assert verify(b)  # the in-use marker is not part of the artifact


def test_the_cap_applies_after_each_build(tmp_path):
    cache = ArtifactCache(tmp_path, max_bytes=int(2.5 * MB))
    a, b = fill(cache, 2)
    path, _, hit = cache.get_or_build(key(9), build_of(), {})
    assert not hit and path.exists()  # the new one is never the one evicted
    assert not a.exists() and b.exists()
    assert sorted(e.key for e in cache.entries()) == sorted([key(2), key(9)])


HOLD_ARTIFACT = """
import sys, time
from slimserve.optimizers.cache.store import hold
h = hold(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


def test_an_artifact_in_use_is_never_evicted(tmp_path):
    cache = ArtifactCache(tmp_path)
    a, b, c = fill(cache, 3)
    replica = start_holder(HOLD_ARTIFACT, str(a))  # another process serves the oldest
    try:
        with hold(b):  # and this one the next
            entries = {e.key: e for e in cache.entries()}
            assert entries[key(1)].in_use and entries[key(2)].in_use and not entries[key(3)].in_use
            evicted = cache.prune(0)
            assert [e.key for e in evicted] == [key(3)]
            assert a.exists() and b.exists() and not c.exists()
        assert [e.key for e in cache.prune(0)] == [key(2)]  # released: evictable
        assert a.exists()
    finally:
        stop(replica)
    assert [e.key for e in cache.prune(0)] == [key(1)]
    with pytest.raises(FileNotFoundError):
        hold(a)  # evicted: not a cached artifact any more


def test_optimize_holds_what_it_returns(tmp_path, monkeypatch):
    """optimize() marks the artifact in use until its result is dropped (the replica keeps it)."""
    script = tmp_path / "fake_worker.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        from pathlib import Path
        out = Path(json.loads(sys.argv[1])["out"])
        (out / "config.json").write_text("{}")
        print("SLIMSERVE_RESULT " + json.dumps({"optimize_seconds": 0.1, "fake": True}))
    """))
    monkeypatch.setattr(pipeline, "_child_command", lambda python, request: [sys.executable, str(script), request])
    r = pipeline.optimize("default", {"method": "structured", "mlp_keep": 0.5}, tmp_path, {"measure": False})
    assert r.cache_hit is False and r.manifest.report.model_extra == {"fake": True} and r.hold is not None
    # The manifest names the versions of slimserve's code that built it (the key holds them too).
    assert r.manifest.slimserve == pipeline.slimserve_identity(parse("structured"))
    assert r.manifest.slimserve["method_version"] == parse("structured").version
    cache = ArtifactCache(tmp_path)
    assert cache.prune(0) == [] and r.path.exists()
    r.hold.release()
    assert [e.path for e in cache.prune(0)] == [r.path]


# --- slimserve cache ls / prune ------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "slimserve.serve.commands.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def test_cache_ls_and_prune_commands(tmp_path):
    root = tmp_path / "cache"
    cache = ArtifactCache(root)
    a, b, c = fill(cache, 3)
    (root / f".tmp-{key(7)}-dead00").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(f"cache_dir: {root}\ncache_max_gib: {2.5 * MB / (1 << 30)}\n"
                      "models:\n  - name: m\n    variants: [{name: a}]\n")
    with hold(c):
        out = cli("cache", "ls", "--cache-dir", str(root)).stdout
        lines = out.splitlines()
        assert lines[0].split()[:3] == ["key", "method", "base"]
        assert [l.split()[0] for l in lines[1:4]] == [key(3)[:12], key(2)[:12], key(1)[:12]]  # latest use first
        assert lines[1].split()[1] == "m2" and " yes " in lines[1] and " no " in lines[3]
        assert "3 artifact(s), 0.00 GiB" in out
        assert (root / f".tmp-{key(7)}-dead00").exists()  # ls changes nothing

        out = cli("cache", "prune", str(config)).stdout  # the config's cap: 2.5 MB
        assert f"evicted {key(1)[:12]}" in out and "2 artifact(s)" in out
        assert not a.exists() and not (root / f".tmp-{key(7)}-dead00").exists()

        out = cli("cache", "prune", "--cache-dir", str(root), "--max-gib", "0").stdout
        assert f"evicted {key(2)[:12]}" in out and "1 artifact(s)" in out  # c is in use
        assert c.exists() and not b.exists()
    out = cli("cache", "prune", "--cache-dir", str(root), "--max-gib", "0").stdout
    assert f"evicted {key(3)[:12]}" in out and "0 artifact(s)" in out
    assert "no artifact cache" in cli("cache", "ls", "--cache-dir", str(tmp_path / "nowhere")).stdout


def test_cache_ls_shows_builds_in_progress(tmp_path):
    k = key(8)
    holder = start_holder(HOLD_LOCK, str(tmp_path / f"{k}.lock"))
    try:
        out = cli("cache", "ls", "--cache-dir", str(tmp_path)).stdout
        assert f"building {k[:12]}: held by pid {holder.pid}" in out and "structured" in out
    finally:
        stop(holder)
