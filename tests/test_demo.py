"""`slimserve demo` as a user runs it: a subprocess that must answer, name the variant, report
time to first token, and leave no Ray or vLLM process behind — also when interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port

pytestmark = pytest.mark.standalone

LEFTOVER = re.compile(rb"raylet|gcs_server|ray::|EngineCore|VLLM|ServeReplica|ServeController")


def leftover_processes() -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if int(pid) != os.getpid() and LEFTOVER.search(cmd):
            found.append(f"{pid}: {cmd[:120]!r}")
    return found


def wait_for_no_leftovers(before: list[str], timeout_s: float = 30) -> list[str]:
    """Ray/vLLM processes that the demo started and left running (pre-existing ones aside)."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in leftover_processes() if p not in before]) and time.monotonic() < deadline:
        time.sleep(1)
    return left


@pytest.fixture
def before():
    return leftover_processes()


def test_demo_answers_names_the_variant_and_cleans_up(before):
    r = subprocess.run(
        [sys.executable, "-m", "slimserve.serve.cli", "demo", "--port", str(free_port())],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    answer = re.search(r"^answer:\s+(.+)$", r.stdout, re.M)
    variant = re.search(r"^variant: (\S+)$", r.stdout, re.M)
    ttft = re.search(r"^time to first token: (\d+) ms", r.stdout, re.M)
    assert answer and variant and ttft, r.stdout
    assert "Paris" in answer.group(1)
    assert variant.group(1) in {"baseline", "int8"}
    assert 0 < int(ttft.group(1)) < 30_000
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "ready in"):
        assert step in r.stderr
    assert wait_for_no_leftovers(before) == []


def test_demo_interrupted_while_engines_start_leaves_nothing_behind(before):
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimserve.serve.cli", "demo", "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
    assert wait_for_no_leftovers(before) == []
