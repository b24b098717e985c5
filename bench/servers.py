"""Stopping a benchmarked server started in its own process group, and the Ray cluster it may
have started (shared by the bench scripts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # `ray stop` of this interpreter's Ray (no PATH lookup: the bench may run outside a venv).
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
