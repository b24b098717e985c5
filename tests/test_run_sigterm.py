"""`slimserve run` stopped the way Kubernetes and systemd stop it (SIGTERM): the same clean stop
as Ctrl-C, in bounded time, with no process of its own left; a run killed outright (SIGKILL)
does not keep the next one from starting, and the next one ends what it left.

Light on purpose: the only variant asks for more CPUs than the machine has, so Ray, Serve and
the ingress start but no vLLM engine does."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port

from slimserve.serve.commands.local import RAY_SERVE_ENV

pytestmark = [pytest.mark.standalone, pytest.mark.e2e]

CONFIG = """
models:
  - name: tiny
    deployment: {num_cpus_per_worker: 4096}   # never schedulable: no engine starts
    variants:
      - {name: base}
"""


def session_processes(sid: int) -> dict[int, str]:
    """Every process of session `sid`. `slimserve run` starts in a session of its own, and all it
    starts stays in it (Ray's workers take process groups of their own, not sessions)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid or fields[0] == "Z":
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[int(pid)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:100]
        except (OSError, IndexError, ValueError):
            continue
    return found


def wait_until_gone(sid: int, timeout_s: float = 30) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


class Run:
    """`slimserve run CONFIG` (or `command`) in its own session; its output read as it comes."""

    def __init__(self, config_path, port: int | None = None, command: list[str] | None = None):
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "slimserve.serve.commands.cli", "run", str(config_path),
                        "--port", str(port or free_port()), "--metrics-port", str(free_port())],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            # Without the test session's Ray Serve settings: `slimserve run` must set its own.
            env={k: v for k, v in os.environ.items() if k not in RAY_SERVE_ENV},
        )
        self.sid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"slimserve run exited ({self.proc.wait()}) before {text!r}:\n{''.join(self.output)[-3000:]}")
            self.output.append(line)
            if text in line:
                return
        pytest.fail(f"no {text!r} after {timeout_s} s:\n{''.join(self.output)[-3000:]}")

    def stop(self, timeout_s: float = 90) -> None:
        """SIGTERM, as Kubernetes stops a pod; then whatever of its session is left is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if wait_until_gone(self.sid, timeout_s=15):
            self.kill_all()

    def kill_all(self):
        for pid in session_processes(self.sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_sigterm_stops_run_cleanly_and_a_killed_run_does_not_block_the_next(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(CONFIG) + f"cache_dir: {tmp_path / 'artifacts'}\n")
    runs: list[Run] = []
    try:
        # 1. SIGTERM once Serve has the app (Ray's processes, Serve's actors, the ingress are up).
        first = Run(config)
        runs.append(first)
        first.wait_for("SlimServer:tiny--base")
        time.sleep(2)
        started = session_processes(first.sid)
        assert any("raylet" in cmd for cmd in started.values()), started
        assert any("DashboardAgent" in cmd for cmd in started.values()), started
        # Serve's controller and replicas run throughput-optimized (slimserve run's default).
        serve_actors = [pid for pid, cmd in started.items() if "ServeController" in cmd or "ServeReplica" in cmd]
        assert serve_actors, started
        for pid in serve_actors:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in environ, started[pid]
        t0 = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        rc = first.proc.wait(timeout=90)
        stopped_in = time.monotonic() - t0
        out = "".join(first.output) + "".join(iter(first.lines.get, None))
        assert rc in (0, 143), out[-3000:]
        assert "SIGTERM received" not in out  # Ray's C++ crash handler did not take it (exit 134)
        assert stopped_in < 60, stopped_in
        assert wait_until_gone(first.sid) == {}

        # 2. A run killed outright leaves what Ray does not clean up itself; the next run starts
        #    anyway (no "The current node timed out during startup"), and ends those leftovers.
        second = Run(config)
        runs.append(second)
        second.wait_for("SlimServer:tiny--base")
        second.proc.kill()
        second.proc.wait(timeout=30)
        time.sleep(3)
        left_by_second = session_processes(second.sid)  # with Ray 2.60: its DashboardAgent and RuntimeEnvAgent

        third = Run(config)
        runs.append(third)
        third.wait_for("SlimServer:tiny--base")
        assert wait_until_gone(second.sid, timeout_s=15) == {}
        if left_by_second:
            assert "left by an earlier run that did not stop" in "".join(third.output)
        third.proc.send_signal(signal.SIGTERM)
        assert third.proc.wait(timeout=90) in (0, 143)
        assert wait_until_gone(third.sid) == {}
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.proc.kill()
            run.kill_all()
