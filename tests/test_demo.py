"""`slimserve demo` as a user runs it: a subprocess that must answer, name the variant, report
time to first token, and leave no Ray or vLLM process behind — also when interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import RUN_MARKER_ENV, free_port, own_processes

pytestmark = pytest.mark.standalone

LEFTOVER = r"raylet|gcs_server|ray::|EngineCore|VLLM|ServeReplica|ServeController"


@pytest.fixture
def demo_env():
    """The demo's environment, with a marker of its own that every process it starts (Ray's,
    vLLM's) inherits: what it leaves behind is counted by that marker, not machine-wide (other
    Ray clusters and engines may run on this machine meanwhile)."""
    return {**os.environ, RUN_MARKER_ENV: uuid.uuid4().hex}


def wait_for_no_leftovers(env: dict, timeout_s: float = 30) -> dict[int, str]:
    """Ray/vLLM processes that the demo started and left running."""
    deadline = time.monotonic() + timeout_s
    while (left := own_processes(LEFTOVER, marker=env[RUN_MARKER_ENV])) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def test_demo_answers_names_the_variant_and_cleans_up(demo_env):
    r = subprocess.run(
        [sys.executable, "-m", "slimserve.serve.commands.cli", "demo", "--port", str(free_port())],
        capture_output=True, text=True, timeout=900, env=demo_env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    answer = re.search(r"^answer:\s+(.+)$", r.stdout, re.M)
    variant = re.search(r"^variant: (\S+)$", r.stdout, re.M)
    ttft = re.search(r"^time to first token: (\d+) ms   \(whole answer ([\d.]+) s, (\d+) chunks\)", r.stdout, re.M)
    assert answer and variant and ttft, r.stdout
    assert "Paris" in answer.group(1)
    assert variant.group(1) in {"baseline", "int8"}
    # The first token comes before the whole answer, which streamed in more than one chunk.
    assert 0 < int(ttft.group(1)) <= float(ttft.group(2)) * 1000 + 10 and int(ttft.group(3)) >= 2, ttft.group(0)
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "ready in"):
        assert step in r.stderr
    assert wait_for_no_leftovers(demo_env) == {}


def test_demo_interrupted_while_engines_start_leaves_nothing_behind(demo_env):
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimserve.serve.commands.cli", "demo", "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=demo_env,
    )
    try:
        for line in proc.stdout:  # wait until engines are being started
            if "[3/4]" in line:
                break
        time.sleep(10)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, 130, -signal.SIGINT)
    assert wait_for_no_leftovers(demo_env) == {}
