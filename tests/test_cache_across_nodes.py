"""One artifact cache across Ray nodes. `cache_volume: shared` is checked, not assumed
(serve/engine/cache_volume.py): build_app leaves a token in the cache folder and every engine
replica finds the same token before any build; two folders stand for two nodes' mounts here.
And a build another node is running is never cleaned up as stale, even on a volume whose locks
do not reach across nodes (a lock file naming another host stands for that node's builder)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from slimserve.optimizers.cache.upkeep import REMOTE_BUILD_GRACE_S, CacheUpkeep
from slimserve.serve.app import llm_config_for
from slimserve.serve.config.file import load_config
from slimserve.serve.engine.cache_volume import MARKER, CacheVolumeError, check_volume, volume_token


def test_the_token_is_written_once_and_kept(tmp_path):
    tokens: list = []
    threads = [threading.Thread(target=lambda: tokens.append(volume_token(str(tmp_path / "cache")))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(tokens)) == 1 and tokens[0] == (tmp_path / "cache" / MARKER).read_text()
    assert volume_token(str(tmp_path / "cache")) == tokens[0]  # a restart keeps it
    check_volume(str(tmp_path / "cache"), tokens[0], "m/v")  # the same volume: nothing to say


def test_a_node_without_the_shared_volume_is_told_what_to_do(tmp_path):
    token = volume_token(str(tmp_path / "head-mount"))
    with pytest.raises(CacheVolumeError) as e:
        check_volume(str(tmp_path / "worker-local"), token, "smollm2/int8")
    message = str(e.value)
    assert message.startswith("smollm2/int8: the artifact cache")
    assert "missing" in message and "ReadWriteMany" in message and "cache_volume: node_local" in message
    other = tmp_path / "another-volume"
    volume_token(str(other))
    with pytest.raises(CacheVolumeError, match="holds another token"):
        check_volume(str(other), token, "smollm2/int8")


def test_the_engine_gets_the_token_in_shared_mode_only(tmp_path):
    base = {"cache_dir": str(tmp_path / "c"), "models": [{"name": "m", "variants": [{"name": "baseline"}]}]}
    for mode, expected in (("shared", True), ("node_local", False)):
        cfg = load_config({**base, "cache_volume": mode})
        llm = llm_config_for(cfg, cfg.models[0], cfg.models[0].variants[0], "cpu",
                             volume_token=volume_token(cfg.cache_dir, cfg.cache_volume))
        sent = llm.callback_config.callback_kwargs["cache_volume_token"]
        assert (sent is not None) == expected and (not expected or sent == volume_token(cfg.cache_dir))


def leftover_build(root, key: str, host: str, started: float):
    """What a builder leaves while it runs: its temporary folder and its lock file (no flock here:
    the lock of a process on another node, on a volume that does not carry flock)."""
    tmp = root / f".tmp-{key}-abc123"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"half written")
    (root / f"{key}.lock").write_text(json.dumps({"pid": 4242, "host": host, "started": started}))
    return tmp


def test_another_nodes_build_in_progress_is_never_removed(tmp_path):
    root = tmp_path / "cache"
    now = time.time()
    running = leftover_build(root, "a" * 64, "gpu-worker-7", now - 600)
    dead_remote = leftover_build(root, "b" * 64, "gpu-worker-3", now - REMOTE_BUILD_GRACE_S - 60)
    dead_here = leftover_build(root, "c" * 64, socket.gethostname(), now - 600)
    removed = CacheUpkeep(root, clean=False).clean_stale()
    assert running.is_dir() and (root / f"{'a' * 64}.lock").is_file()
    assert not dead_remote.exists() and not dead_here.exists()
    assert set(removed) >= {dead_remote.name, dead_here.name, f"{'b' * 64}.lock", f"{'c' * 64}.lock"}
