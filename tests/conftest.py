"""Shared fixtures: one real Ray cluster (with Serve) per test session, real vLLM CPU engines."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest

# Nothing may come from a model hub, in this process or in any Ray worker it starts.
os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parent.parent
# Every process this test session starts (its Ray clusters, their workers and engines) inherits
# this marker in its environment: tests count their own processes by it, never machine-wide
# (other Ray clusters and engines may run on the same machine). A subprocess a test starts can
# be given a marker of its own (`own_processes(..., marker=)`).
RUN_MARKER_ENV = "SLIMSERVE_TEST_RUN"
os.environ[RUN_MARKER_ENV] = uuid.uuid4().hex
# Serve reports a replica that is not scheduled after 30 s by default; 5 s keeps the
# unschedulable-variant test short. Set before the session's cluster starts (its controller reads it).
os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_S", "5")
os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S", "5")
os.environ.setdefault("SLIMSERVE_HOME", str(REPO / ".cache" / "slimserve"))
# The session cluster runs Ray Serve the way `slimserve run` and the chart do (throughput-optimized).
from slimserve.serve.commands.local import use_ray_serve_env  # noqa: E402

use_ray_serve_env()


def pytest_collection_modifyitems(items):
    # One order constraint is real: `standalone` tests start their own Ray cluster (in this
    # process, or a subprocess that needs every core) and cannot run beside the session cluster,
    # which lives until the session ends: they run first. The rest only saves time, no test
    # depends on what another left: unit tests, then tests on the shared app (main_app redeploys
    # it if an earlier test released it), those that kill one of its engines after them (Serve
    # restarts it, ~1 min), then e2e tests that release the shared app for their own.
    def rank(item):
        if "standalone" in item.keywords:
            return 0
        if "e2e" not in item.keywords:
            return 1
        if "main_app" in getattr(item, "fixturenames", ()):
            return 2.5 if "kills_engines" in item.keywords else 2
        return 3

    items.sort(key=rank)


def own_processes(pattern: str, marker: str | None = None) -> dict[int, str]:
    """pid -> command line of the live processes matching `pattern` that carry this session's
    marker (or `marker`) in their environment."""
    needle = f"{RUN_MARKER_ENV}={marker or os.environ[RUN_MARKER_ENV]}".encode()
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not re.search(pattern, cmd) or needle not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, not yet reaped: holds no core
        except (OSError, IndexError):
            continue
        found[int(pid)] = cmd[:120]
    return found


def leftovers_after(pattern: str, timeout_s: float = 60, marker: str | None = None) -> dict[int, str]:
    """This run's processes matching `pattern` still alive after waiting up to `timeout_s` for them
    to end (a stopped Ray cluster's raylets, workers and engines take a moment)."""
    deadline = time.monotonic() + timeout_s
    while (left := own_processes(pattern, marker)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def process_alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie has exited (its parent, or init, reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()
# API keys for the authentication test, in the environment Ray's workers inherit (as a
# Kubernetes Secret puts them into the pods'); only used where a test's config names this variable.
TEST_API_KEYS_ENV = "SLIMSERVE_TEST_API_KEYS"
os.environ[TEST_API_KEYS_ENV] = "sk-test-one,sk-test-two"
# Admin keys for the rollout tests (the operator's routes), the same way.
os.environ["SLIMSERVE_TEST_ADMIN_KEYS"] = "sk-admin-test"


@pytest.fixture(scope="session")
def serve_url():
    """A real local Ray cluster with Serve's HTTP proxy on a free loopback port, and Ray's
    Prometheus endpoint on METRICS_PORT."""
    import ray
    from ray import serve

    if ray.is_initialized():  # some Ray APIs start a local cluster on first use: not this one
        ray.shutdown()
    ray.init(
        # One logical CPU more than there are cores: room for the placement bundle of a variant
        # that fails to load (test_ab_metrics.py) beside the two engines of the shared app.
        # Engines still get their own cores (VLLM_CPU_OMP_THREADS_BIND from the real cores).
        num_cpus=len(os.sched_getaffinity(0)) + 1,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=METRICS_PORT,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """An artifact cache that starts empty, so the first replica really builds its artifact."""
    return tmp_path_factory.mktemp("artifacts")


def wait_for(check, timeout_s: float, what: str):
    """The first truthy value of `check()`, tried every second; an HTTP error counts as not yet."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout_s:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, KeyError, IndexError) as e:
            last = e
        time.sleep(1)
    raise TimeoutError(f"{what}: not true after {timeout_s} s (last: {last!r})")


def deploy_and_wait(config: dict, name: str, timeout_s: float = 900, route_prefix: str = "/") -> None:
    from ray import serve

    from slimserve.serve.app import build_app

    serve.run_many(
        [serve.RunTarget(build_app(config), name=name, route_prefix=route_prefix)],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"{name} failed to deploy: {app.message} {app.deployments}")
        time.sleep(1)
    raise TimeoutError(f"{name} not running after {timeout_s} s")


_driver_loop: "asyncio.AbstractEventLoop | None" = None


def slimserve_info(deployment: str, app: str, timeout_s: float = 10) -> dict:
    """A replica's `slimserve_info`, read through Ray as an operator's script would. In Ray
    Serve's throughput-optimized mode a handle routes on the caller's event loop (no router
    thread of its own), so this process keeps one loop running for its handles (Serve caches
    them and shuts them down on that loop)."""
    global _driver_loop
    import asyncio
    import threading

    from ray import serve

    if _driver_loop is None:
        _driver_loop = asyncio.new_event_loop()
        threading.Thread(target=_driver_loop.run_forever, daemon=True, name="serve-handles").start()

    async def read():
        return await serve.get_deployment_handle(deployment, app_name=app).slimserve_info.remote()

    return asyncio.run_coroutine_threadsafe(asyncio.wait_for(read(), timeout_s), _driver_loop).result()


def engine_info(model_id: str, app: str = "main", timeout_s: float = 10) -> dict | None:
    """The full record a variant's engine replica keeps (checkpoint path, pid, ...), read through
    Ray as an operator would; API clients see a public subset in /v1/models. None when no replica
    answers in time."""
    try:
        return slimserve_info(f"SlimServer:{model_id}", app, timeout_s)
    except Exception:
        return None


# How far an engine's log-probabilities may be from transformers' fp32 ones on the same checkpoint:
# the engine computes in the checkpoint's dtype (bf16: 8 bits of mantissa) with its own kernels.
LOGPROB_TOLERANCE = 0.15


def check_engine_computes_the_checkpoint(client, model: str, prompt: str, checkpoint, headers=None) -> str:
    """The engine's next-token distribution for `prompt` is the checkpoint's, as transformers
    computes it in fp32: the engine's top-5 tokens are among transformers' top-10, each with the
    same log-probability within LOGPROB_TOLERANCE, and its greedy token is transformers' argmax
    or ties with it within that tolerance (bf16 can swap two near-equal tokens). Returns the
    engine's greedy token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    comp = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, logprobs=5,
                                     extra_headers=headers or {})
    served = comp.choices[0].text
    engine_top = comp.choices[0].logprobs.top_logprobs[0]
    tok = AutoTokenizer.from_pretrained(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        logprobs = hf(tok(prompt, return_tensors="pt").input_ids).logits[0, -1].log_softmax(-1)
    top = logprobs.topk(10)
    reference = {tok.decode([i]): lp for lp, i in zip(top.values.tolist(), top.indices.tolist())}
    assert set(engine_top) <= set(reference), (engine_top, reference)
    gaps = {t: abs(lp - reference[t]) for t, lp in engine_top.items()}
    assert max(gaps.values()) < LOGPROB_TOLERANCE, (gaps, engine_top, reference)
    assert reference[served] > max(reference.values()) - LOGPROB_TOLERANCE, (served, reference)
    return served


def undeploy(name: str) -> None:
    from ray import serve

    serve.delete(name)  # waits until the replicas (and their engines) are gone


MAIN_APP = "main"
# The app most end-to-end tests share: SmolLM2 as bf16 (70 %) and W8A8 built on load (30 %).
MAIN_CONFIG = {
    "models": [
        {
            "name": "smollm2",
            "source": "default",
            "engine": {"max_model_len": 1024},
            # Small bounds, so that the load test (16 users) sees requests shed with 429.
            "deployment": {"max_ongoing_requests": 4, "max_queued_requests": 4},
            "variants": [
                {"name": "baseline", "weight": 70},
                {"name": "int8", "weight": 30, "optimization": {"method": "w8a8"}},
            ],
        }
    ],
    # A small default max_tokens: a request without one is cut after 48 tokens, not 1024 (~35 s on CPU).
    "ingress": {"health_probe_interval_s": 2, "limits": {"default_max_tokens": 48}},
}


def main_config(session_cache: Path, ingress: dict | None = None, **model_overrides) -> dict:
    """MAIN_CONFIG with the session's cache and optional changes to the ingress and the model
    entry (a test that redeploys with other weights or a shadow variant gets the same engines)."""
    import copy

    cfg = copy.deepcopy(MAIN_CONFIG)
    cfg["cache_dir"] = str(session_cache)
    cfg["models"][0].update(model_overrides)
    cfg["ingress"].update(ingress or {})
    return cfg


@pytest.fixture(scope="session")
def _main_app_session(serve_url):
    yield serve_url
    from ray import serve

    if MAIN_APP in serve.status().applications:
        undeploy(MAIN_APP)


@pytest.fixture
def main_app(_main_app_session, session_cache):
    """The shared app, deployed if it is not (first use, or a test that needed every core
    released it): tests pass in any order; the ordering above only saves redeploys."""
    from ray import serve

    app = serve.status().applications.get(MAIN_APP)
    if app is None or app.status != "RUNNING":
        deploy_and_wait(main_config(session_cache), MAIN_APP)
    return _main_app_session


def release_main_app() -> None:
    """For tests that need every core for their own app: the shared app goes (the tests that use
    it are ordered before these)."""
    from ray import serve

    if MAIN_APP in serve.status().applications:
        undeploy(MAIN_APP)
