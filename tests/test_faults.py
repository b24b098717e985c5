"""A dying engine replica, end to end on the shared app: the stream it was serving ends with an
OpenAI error event (not a cut connection), other requests go on, Serve restarts the replica,
and no process of the dead engine is left behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from conftest import engine_info, own_processes, wait_for

pytestmark = pytest.mark.e2e


def engine_cores() -> dict[int, str]:
    """This test session's vLLM engine processes (other sessions' engines may run on this machine)."""
    return own_processes("VLLM::EngineCore")


def variant_states(base_url: str) -> dict[str, str]:
    cards = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]
    return {v["variant"]: v["state"] for v in cards[0]["metadata"]["variants"]}


def baseline_pid(base_url: str) -> int | None:
    """The baseline engine replica's process id, as it reports it (through Ray)."""
    info = engine_info("smollm2--baseline", timeout_s=5)
    return info.get("pid") if info else None


@pytest.mark.kills_engines
def test_a_replica_killed_mid_stream(main_app):
    cores_before = len(engine_cores())
    events: list[str] = []
    first_token = threading.Event()

    def stream():
        body = {"model": "smollm2", "prompt": "Tell a very long story.", "max_tokens": 400, "stream": True,
                "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", f"{main_app}/v1/completions", json=body,
                          headers={"x-slimserve-variant": "baseline"}, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_token.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first_token.wait(120), "no token streamed"
    pid = baseline_pid(main_app)
    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
    t.join(300)
    assert not t.is_alive()
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert "failed mid-stream" in error["message"] and "baseline" in error["message"]
    assert error["code"] == 503  # the replica was lost: worth a retry, not a 500
    assert len(events) < 400  # it really was cut short

    # The public name keeps answering: once the health probe has seen the baseline down, every
    # request goes to int8 (only ready variants get traffic).
    wait_for(lambda: variant_states(main_app)["baseline"] != "ready", 30, "the baseline seen down")
    checked = 0
    for i in range(4):
        down_before = variant_states(main_app)["baseline"] != "ready"
        r = httpx.post(f"{main_app}/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2,
                                                           "user": f"u{i}"}, timeout=120)
        assert r.status_code == 200, r.text
        if down_before and variant_states(main_app)["baseline"] != "ready":  # down all along: int8 only
            assert r.headers["x-slimserve-variant"] == "int8", (i, r.headers)
            checked += 1
    # A new replica and a vLLM start take far longer than a two-token request: the first, at least,
    # was sent while the baseline was down.
    assert checked >= 1
    # Serve restarts the replica; forced requests succeed again.
    t0 = time.monotonic()
    while True:
        r = httpx.post(f"{main_app}/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2},
                       headers={"x-slimserve-variant": "baseline"}, timeout=120)
        if r.status_code == 200:
            break
        # Down or restarting: a 503 that says so (never a 500).
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 < 400, "the baseline replica did not come back"
        time.sleep(3)
    assert baseline_pid(main_app) not in (None, pid)
    # No engine process of the killed replica is left (they would hold a core forever).
    deadline = time.monotonic() + 60
    while len(engine_cores()) > cores_before and time.monotonic() < deadline:
        time.sleep(2)
    assert len(engine_cores()) == cores_before, engine_cores()
