"""Verifying cached artifacts (optimizers/cache/store.py), with real files, real locks held by real
other processes: files are hashed once per artifact and content; a corrupt artifact is never
served and is rebuilt under the build lock, never deleted while a running engine holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from slimserve.optimizers.cache import store as cache_module
from slimserve.optimizers.cache.store import ArtifactCache, CorruptArtifact, verify

KEY = "cd34" * 16


def write_artifact(tmp, payload: bytes = b"w" * 4096) -> dict:
    (tmp / "model.safetensors").write_bytes(payload)
    (tmp / "config.json").write_text('{"a": 1}')
    return {}


@pytest.fixture
def hashes(monkeypatch):
    seen = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda p, *a: seen.append(p.name) or real(p, *a))
    return seen


def test_an_artifact_is_hashed_once_per_content(tmp_path, hashes):
    cache = ArtifactCache(tmp_path)
    path, _, _ = cache.get_or_build(KEY, write_artifact, {})
    hashes.clear()
    for _ in range(3):  # replica starts
        assert cache.get_or_build(KEY, write_artifact, {})[2]
    assert hashes == []
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, written again: hashed again, still good
    assert cache.get_or_build(KEY, write_artifact, {})[2]
    assert sorted(hashes) == ["config.json", "model.safetensors"]


def test_a_change_hidden_behind_the_old_mtime_is_still_found(tmp_path):
    cache = ArtifactCache(tmp_path)
    path, _, _ = cache.get_or_build(KEY, write_artifact, {})
    weights = path / "model.safetensors"
    st = weights.stat()
    time.sleep(0.01)
    weights.write_bytes(b"x" + weights.read_bytes()[1:])  # same size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime back (ctime moves on)
    with pytest.raises(CorruptArtifact):
        verify(path)


@pytest.mark.parametrize("files", [None, ["model.safetensors"], {"model.safetensors": {"size": 4096}},
                                   {"model.safetensors": {"sha256": "0" * 64, "size": -1}}])
def test_a_manifest_whose_files_do_not_read_is_a_corrupt_artifact_rebuilt(tmp_path, files):
    """The files' digests are read typed (CacheManifest): a malformed list is a corrupt artifact
    (rebuilt, listed with an unknown method), never a crash."""
    import json

    cache = ArtifactCache(tmp_path)
    path, _, _ = cache.get_or_build(KEY, write_artifact, {"method": "rtn"})
    manifest = json.loads((path / cache_module.MANIFEST).read_text())
    if files is None:
        del manifest["files"]
    else:
        manifest["files"] = files
    (path / cache_module.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifact, match="manifest missing or unreadable"):
        verify(path)
    (entry,) = cache.entries()
    assert entry.manifest is None and entry.method == "?" and entry.slimserve_version == "-"
    builds = []
    _, manifest, hit = cache.get_or_build(KEY, lambda t: builds.append(1) or write_artifact(t), {"method": "rtn"})
    assert not hit and builds == [1] and set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert [e.method for e in cache.entries()] == ["rtn"]


HOLDER = """
import sys, time
from slimserve.optimizers.cache.store import hold
h = hold(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


def test_a_corrupt_artifact_in_use_is_rebuilt_beside_not_deleted(tmp_path):
    cache = ArtifactCache(tmp_path)
    path, _, _ = cache.get_or_build(KEY, write_artifact, {})
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # a running engine serves it
        (path / "model.safetensors").write_bytes(b"truncated")
        builds = []
        path2, _, hit = cache.get_or_build(KEY, lambda t: builds.append(1) or write_artifact(t, b"n" * 4096), {})
        assert not hit and builds == [1] and path2 == path
        assert (path2 / "model.safetensors").read_bytes() == b"n" * 4096  # the rebuilt one is served
        (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(f".corrupt-{KEY}-")]
        assert (aside / "model.safetensors").read_bytes() == b"truncated"  # the holder's files are still there
        ArtifactCache(tmp_path)  # opening the cache cleans stale leftovers: not one still held
        assert aside.exists()
    finally:
        holder.kill()
        holder.wait()
    ArtifactCache(tmp_path)
    assert not aside.exists()  # released: removed


LOCKER = """
import sys, time
from pathlib import Path
from slimserve.optimizers.cache.store import BuildLock
lock = BuildLock(Path(sys.argv[1]))
lock.acquire(None, {"method": "test"})
print("locked", flush=True)
time.sleep(300)
"""


def test_a_corrupt_artifact_is_not_removed_without_the_build_lock(tmp_path):
    cache = ArtifactCache(tmp_path)
    path, _, _ = cache.get_or_build(KEY, write_artifact, {})
    (path / "model.safetensors").write_bytes(b"truncated")
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(tmp_path / f"{KEY}.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"  # another replica is rebuilding it
        assert cache.lookup(KEY) is None  # not served ...
        assert path.exists()  # ... and not removed under the builder's feet
        with pytest.raises(cache_module.LockTimeout):
            cache.get_or_build(KEY, write_artifact, {}, lock_timeout_s=0.5)
    finally:
        locker.kill()
        locker.wait()
