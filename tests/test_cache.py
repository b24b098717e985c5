"""The artifact cache on real files and real processes: atomic builds, verification, one builder."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from slimserve.optimizers.cache.store import MANIFEST, ArtifactCache, CorruptArtifact, verify

KEY = "ab12" * 16


def write_artifact(tmp: Path, payload: bytes = b"w" * 4096) -> dict:
    (tmp / "model.safetensors").write_bytes(payload)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "config.json").write_text('{"a": 1}')
    return {"note": "built"}


def test_build_then_hit(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []
    path, manifest, hit = cache.get_or_build(KEY, lambda t: calls.append(1) or write_artifact(t), {"method": "x"})
    assert not hit and calls == [1]
    assert set(manifest["files"]) == {"model.safetensors", "sub/config.json"}
    assert manifest["report"] == {"note": "built"} and manifest["method"] == "x"
    path2, manifest2, hit2 = cache.get_or_build(KEY, lambda t: calls.append(1) or write_artifact(t), {})
    assert hit2 and path2 == path and calls == [1]
    # Nothing but the artifact is left in the cache root: the build's lock file goes with the build.
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra", "manifest"])
def test_damaged_artifact_is_rebuilt_not_served(tmp_path, damage, caplog):
    cache = ArtifactCache(tmp_path)
    path, _, _ = cache.get_or_build(KEY, write_artifact, {})
    weights = path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        weights.write_bytes(b"x" + weights.read_bytes()[1:])
    elif damage == "delete":
        weights.unlink()
    elif damage == "extra":
        (path / "evil.py").write_text("import os")
    else:
        (path / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptArtifact):
        verify(path)
    builds = []
    path2, manifest, hit = cache.get_or_build(KEY, lambda t: builds.append(1) or write_artifact(t), {})
    assert not hit and builds == [1]
    assert verify(path2)["files"] == manifest["files"]
    assert "corrupt cached artifact" in caplog.text


def test_invalid_key_cannot_escape_the_root(tmp_path):
    with pytest.raises(ValueError):
        ArtifactCache(tmp_path).path("../../etc")


def _slow_builder(root: str, counter: str, results: str) -> None:
    def build(tmp: Path) -> dict:
        with open(counter, "a") as f:
            f.write("build\n")
        time.sleep(1.5)  # long enough that the other process arrives while we build
        return write_artifact(tmp)

    path, manifest, hit = ArtifactCache(root).get_or_build(KEY, build, {})
    with open(results, "a") as f:
        f.write(json.dumps({"hit": hit, "path": str(path)}) + "\n")


def test_concurrent_builders_build_once(tmp_path):
    counter, results = tmp_path / "counter", tmp_path / "results"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_slow_builder, args=(str(tmp_path / "cache"), str(counter), str(results))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert counter.read_text().count("build") == 1
    outcomes = [json.loads(l) for l in results.read_text().splitlines()]
    assert sorted(o["hit"] for o in outcomes) == [False, True, True]
    assert len({o["path"] for o in outcomes}) == 1
