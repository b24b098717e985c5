"""An engine replica's start under Ray Serve LLM: a variant that failed to prepare for a
transient reason tries again (serve/config/retry.py, SlimServer._retry) and one that failed for a
deterministic reason does not; on GPU hosts the build runs without the node's engine-start lock,
which is held only for the engine's start (serve/engine/start_lock.py); a build that cannot fit Ray's
engine start timeout is refused (serve/config/start_budget.py), in the config and in the replica.

Real parts: the engine server (SlimServer on Ray Serve LLM's LLMServer.start), the on-load hook,
optimize() with the artifact cache, the optimizer's child process and the signal that kills it.
Stand-ins: the build is a tiny script (the first run is killed by SIGKILL, as the OOM killer
would; the second writes a small checkpoint), and the engine is a stand-in that runs the hook the
way vLLM's engine does without starting vLLM (minutes of CPU on this shared machine); Ray's
metrics are recorded in a list. LLMConfig makes its placement group in a local Ray instance
(started by Ray on first use, shut down after): `heavy`."""

from __future__ import annotations

import asyncio
import subprocess
import fcntl
import json
import os
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from slimserve.optimizers.build import pipeline
from slimserve.serve.engine import server as server_module
from slimserve.serve.engine import start_lock
from slimserve.serve.app import llm_config_for
from slimserve.serve.config.file import load_config
from slimserve.serve.config.retry import describe_retry
from slimserve.serve.engine.server import SlimServer
from slimserve.serve.handoff import VariantRoute
from slimserve.serve.http.health import HealthBoard
from slimserve.serve.http.model_cards import public_card
from slimserve.serve.http.split import Router

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after():
    yield
    import ray

    ray.shutdown()

BUILD = """
import json, os, signal, sys
from pathlib import Path
request, runs = json.loads(sys.argv[1]), Path(sys.argv[2])
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
if os.environ.get("LOCK_PROBE"):  # is the node's engine-start lock free while we build?
    import fcntl
    fd = os.open(os.environ["LOCK_PROBE"], os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        Path(os.environ["LOCK_PROBE"] + ".seen").write_text("free")
    except BlockingIOError:
        Path(os.environ["LOCK_PROBE"] + ".seen").write_text("held")
if len(runs.read_text()) == 1 and not os.environ.get("LOCK_PROBE"):
    print("allocating", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
out = Path(request["out"])
(out / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
print("SLIMSERVE_RESULT " + json.dumps({"optimize_seconds": 0.1, "scheme": "stand-in"}))
"""


class StandInEngine:
    """What Ray Serve LLM's VLLMEngine.start does before vLLM: the callback's hooks in order."""

    lock_held_at_engine_start: list[bool] = []

    def __init__(self, llm_config):
        self.llm_config = llm_config

    async def start(self):
        callback = self.llm_config.get_or_create_callback()
        await callback.run_callback("on_before_node_init")
        await callback.run_callback("on_after_node_init")
        StandInEngine.lock_held_at_engine_start.append(locked(start_lock.ENGINE_START_LOCK))

    async def check_health(self):
        return None


@pytest.fixture
def counted(monkeypatch):
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def inc(self, value=1, tags=None):
            calls.append((self.name, tags))

        def set(self, value, tags=None):
            pass

    monkeypatch.setattr(server_module, "metric", Recorder)
    return calls


def locked(path) -> bool:
    """Whether another process (or fd) holds the flock on `path` now."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def make_server(tmp_path, optimization, retry, accelerator="cpu"):
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    cfg = load_config({"cache_dir": str(tmp_path / "cache"), "models": [{
        "name": "m", "source": str(base),
        "variants": [{"name": "v", "optimization": optimization, "quality": {"measure": False},
                      "prepare_retry": retry, "build_timeout_s": 60, "engine_start_timeout_s": 60}]}]})
    llm_config = llm_config_for(cfg, cfg.models[0], cfg.models[0].variants[0], "cpu")
    # A GPU host's hook without a GPU placement group (none here): only the spec says gpu.
    llm_config.callback_config.callback_kwargs["accelerator"] = accelerator
    return SlimServer.sync_init(llm_config, engine_cls=StandInEngine)


def stand_in_builds(tmp_path, monkeypatch, source: str) -> None:
    """Every build runs `source` instead of the optimizer (it counts its runs in tmp_path/runs)."""
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(source))
    monkeypatch.setattr(pipeline, "_child_command",
                        lambda python, request: [sys.executable, str(script), request, str(tmp_path / "runs")])


def test_a_transient_failure_is_retried_and_then_served(tmp_path, monkeypatch, counted):
    stand_in_builds(tmp_path, monkeypatch, BUILD)

    async def scenario():
        server = make_server(tmp_path, {"method": "structured", "mlp_keep": 0.5}, {"attempts": 2, "backoff_s": 1.5})
        await server.start()  # the first build is killed: the replica stays up, without an engine
        info = await server.slimserve_info()
        assert "was killed by SIGKILL" in info["failed"]
        assert info["retrying"]["attempt"] == 1 and info["retrying"]["of"] == 2
        said = describe_retry(info["retrying"])
        assert said.startswith("retrying (attempt 1 of 2, next in ") and "killed by SIGKILL" in said, said
        await server.check_health()  # no engine to check while it waits: Serve must not kill it
        deadline = time.monotonic() + 60
        while (server.failure or server.retry) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        info = await server.slimserve_info()
        assert "failed" not in info and "retrying" not in info, info
        assert info["optimization"]["cache_hit"] is False and server.engine is not None
        # The child's report, read as a BuildReport, reaches the engine's record (a plain dict through Ray).
        assert info["optimization"]["report"] == {"optimize_seconds": 0.1, "scheme": "stand-in"}
        server._report_task.cancel()
        return info

    asyncio.run(scenario())
    assert (tmp_path / "runs").read_text() == "xx"  # built twice: the killed run, then the retry
    assert counted.count(("slimserve_optimization_retries_total", {"model": "m", "variant": "v"})) == 1


ALWAYS_KILLED = """
import os, signal, sys
from pathlib import Path
runs = Path(sys.argv[2])
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
print("allocating", file=sys.stderr, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, on every run: transient each time
"""


async def shown_in_v1_models(server) -> dict:
    """The variant's entry in the public card of /v1/models: the ingress's health board asks the
    replica's `slimserve_info` (called here directly, not through Ray) and the card is built."""

    class Handle:
        deployment_name = "SlimServer:m--v"
        slimserve_info = SimpleNamespace(remote=server.slimserve_info)

    status = SimpleNamespace(applications={"app": SimpleNamespace(deployments={
        "SlimServer:m--v": SimpleNamespace(status="HEALTHY", message="")})})
    board = HealthBoard({"m--v": Handle()}, "app", lambda: status)
    await board.refresh()
    return public_card("m", Router({"m": [VariantRoute("v", "m--v", 1.0)]}), board.state_of).metadata["variants"][0]


def test_a_failed_prepare_gives_up_after_its_retries_and_v1_models_shows_each_state(tmp_path, monkeypatch, counted):
    stand_in_builds(tmp_path, monkeypatch, ALWAYS_KILLED)

    async def scenario():
        server = make_server(tmp_path, {"method": "structured", "mlp_keep": 0.5}, {"attempts": 2, "backoff_s": 0.5})
        await server.start()
        shown = await shown_in_v1_models(server)
        assert shown["state"] == "loading" and shown["available"] is False, shown
        reason = shown["unavailable_because"]
        assert reason.startswith("loading: retrying (attempt 1 of 2, next in ") and "was killed by SIGKILL" in reason, reason
        assert str(tmp_path) not in reason  # the base's path, cut for clients
        deadline = time.monotonic() + 60
        while (server.retry or {}).get("attempt") != 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        shown = await shown_in_v1_models(server)
        assert shown["unavailable_because"].startswith("loading: retrying (attempt 2 of 2, "), shown
        await asyncio.wait_for(server._retry_task, 60)  # ends: no third retry
        assert server.retry is None and server.engine is None
        info = await server.slimserve_info()
        assert "retrying" not in info and info["failed"].endswith("\n(gave up after 2 of 2 retries)"), info
        shown = await shown_in_v1_models(server)
        assert shown["state"] == "failed" and shown["available"] is False, shown
        assert shown["unavailable_because"] == ("failed: failed to load: OptimizationFailed: optimization structured "
                                                "of …/base was killed by SIGKILL (out of memory?): allocating"), shown
        await server.check_health()  # given up, the replica stays up without an engine: the others serve on
        server._report_task.cancel()

    asyncio.run(scenario())
    assert (tmp_path / "runs").read_text() == "xxx"  # the first build and exactly 2 retries
    assert counted.count(("slimserve_optimization_retries_total", {"model": "m", "variant": "v"})) == 2


def test_a_deterministic_failure_is_not_retried(tmp_path, counted):
    async def scenario():
        # FP8 has no vLLM CPU kernels: that will not change on a retry.
        server = make_server(tmp_path, "fp8", {"attempts": 3, "backoff_s": 0.1})
        await server.start()
        assert server.failure and "no kernels" in server.failure
        assert server.retry is None and not hasattr(server, "_retry_task")
        server._report_task.cancel()

    asyncio.run(scenario())
    assert not [c for c in counted if c[0] == "slimserve_optimization_retries_total"]


def test_a_gpu_build_runs_without_the_engine_start_lock(tmp_path, monkeypatch, counted):
    """The lock is taken after the build, held while the engine starts, and given back."""
    lock = tmp_path / "engine-start.lock"
    monkeypatch.setattr(start_lock, "ENGINE_START_LOCK", lock)
    monkeypatch.setenv("LOCK_PROBE", str(lock))
    stand_in_builds(tmp_path, monkeypatch, BUILD)
    StandInEngine.lock_held_at_engine_start.clear()

    async def scenario():
        server = make_server(tmp_path, {"method": "structured", "mlp_keep": 0.5}, {"attempts": 0}, accelerator="gpu")
        await server.start()
        assert server.failure is None, server.failure
        assert "start_lock_wait_seconds" in server.timings
        server._report_task.cancel()

    asyncio.run(scenario())
    assert (tmp_path / "engine-start.lock.seen").read_text() == "free"  # the build did not hold it
    assert StandInEngine.lock_held_at_engine_start == [True]  # the engine's start did
    assert not locked(lock)  # and it was given back


def test_a_build_that_cannot_fit_rays_start_timeout_is_refused_in_the_config():
    from pydantic import ValidationError

    from slimserve.serve.config.schema import SlimserveConfig

    def config(build_s):
        return {"models": [{"name": "m", "deployment": {"env": {"RAYLLM_ENGINE_START_TIMEOUT_S": "400"}},
                            "variants": [{"name": "a", "build_timeout_s": 100, "engine_start_timeout_s": 100},
                                         {"name": "b", "build_timeout_s": build_s, "engine_start_timeout_s": 100}]}]}

    SlimserveConfig.model_validate(config(100))  # 3 x 100 + 100 fits 400
    with pytest.raises(ValidationError) as e:
        SlimserveConfig.model_validate(config(101))
    text = str(e.value)
    assert "variants.1.build_timeout_s: build_timeout_s 101 does not fit" in text and "at least 403" in text, text


def test_build_app_sets_rays_start_timeout_from_the_variant(tmp_path):
    cfg = load_config({"cache_dir": str(tmp_path), "models": [{"name": "m", "variants": [
        {"name": "v", "build_timeout_s": 20, "engine_start_timeout_s": 30}]}]})
    llm_config = llm_config_for(cfg, cfg.models[0], cfg.models[0].variants[0], "cpu")
    assert llm_config.runtime_env["env_vars"]["RAYLLM_ENGINE_START_TIMEOUT_S"] == "90"  # 3 x 20 + 30


def test_the_replica_refuses_a_build_its_ray_limit_cannot_hold():
    """The limit Ray Serve LLM really read in a process (its env var), checked before building."""
    code = textwrap.dedent("""
        from slimserve.serve.handoff import OnLoadSpec
        from slimserve.serve.engine.onload import check_start_budget
        spec = dict(model="m", variant="v", source="default", optimization={"method": "w8a8"}, cache_dir="/tmp",
                    accelerator="cpu", engine_start_timeout_s=2)
        check_start_budget(OnLoadSpec(**spec, build_timeout_s=1))  # 3 + 2 fits 5
        try:
            check_start_budget(OnLoadSpec(**spec, build_timeout_s=2))  # 6 + 2 does not
        except ValueError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAYLLM_ENGINE_START_TIMEOUT_S": "5"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "m/v: build_timeout_s 2 does not fit" in out.stdout and "RAYLLM_ENGINE_START_TIMEOUT_S=5" in out.stdout
